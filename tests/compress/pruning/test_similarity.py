"""Data-free similarity pruning (Srinivas & Babu): the saliency, the greedy twins, the exact fold of
duplicated channels, and the `structured` criterion on graphs it can and cannot fold."""
import pytest
import torch
import torch.nn as nn

from byom_models import GRAPHS
from automl.compress import ApplyContext
from automl.compress.pruning import similarity as S
from automl.compress.pruning.criteria import similarity
from automl.compress.pruning.structured import StructuredPruning, StructuredPruningConfig
from automl.compress.pruning.thinning import coupled_groups
from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe
from automl.tasks import get_task


@pytest.fixture(scope="module")
def task():
    return get_task("digits")


class NoData:
    """The digits task with its data taken away: only the example input is left."""

    def __init__(self, task):
        self.example_input, self.num_classes = task.example_input, task.num_classes

    def train_loader(self, *_, **__):
        raise AssertionError("a data-free criterion read training data")


def twinned(seed=0):
    """conv-BN-ReLU x2 -> flatten -> Linear-ReLU -> Linear, with planted twins: conv channel 5 = 2
    (BN included), channel 7 = 1 at half scale and shift, and hidden neuron 9 = 4."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
        conv, bn = m[3], m[4]
        conv.weight[5], conv.bias[5] = conv.weight[2], conv.bias[2]
        for t in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, t)[5] = getattr(bn, t)[2]
        # channel 7: conv output halved, BN undoes it -> the same normalised activation as channel 1
        conv.weight[7], conv.bias[7] = conv.weight[1] / 2, conv.bias[1] / 2
        bn.running_mean[7], bn.running_var[7] = bn.running_mean[1] / 2, bn.running_var[1] / 4
        bn.weight[7], bn.bias[7] = bn.weight[1], bn.bias[1]
        bn.eps = 0.0
        m[7].weight[9], m[7].bias[9] = m[7].weight[4], m[7].bias[4]
    return m


def test_saliency_is_lowest_for_duplicated_and_unread_channels():
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    a = torch.tensor([[1.0], [2.0], [1.0], [0.0]])
    s = similarity(w, a)
    assert s[0] == 0 and s[1] == 0  # each the other's twin
    assert s[3] == 0  # nothing reads it
    assert s[2] == pytest.approx(10.0)  # nearest twin at squared distance 10, <a^2> = 1
    assert similarity(torch.ones(1, 3), torch.ones(1, 2)).isinf().all()
    with pytest.raises(ConfigError, match="one incoming and one outgoing row"):
        similarity(torch.ones(3, 2), torch.ones(2, 2))


def test_greedy_twins_fold_outgoing_weights_before_the_next_choice():
    w = torch.tensor([[0.0], [0.0], [1.0], [10.0]], dtype=torch.float64)
    a = torch.tensor([[1.0], [1.0], [1.0], [1.0]], dtype=torch.float64)
    merges = S.twins(w, a, torch.ones(4, dtype=torch.bool), keep=2)
    # 1 -> 0 (identical; the later one goes); then 2 is cheaper to drop into 0 than 0, now carrying
    # two channels' outgoing weights, into 2
    assert merges == [(1, 0), (2, 0)]


def test_planted_twins_go_first_without_touching_data(task):
    """conv (BN folded in) and Linear-after-flatten groups: the planted twins are among the removed."""
    model, x = twinned(), torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
    groups = {g.root: g for g in coupled_groups(model, x[:1])}
    assert all(S.foldable(g.members) == "" for g in groups.values())
    handler = StructuredPruning(StructuredPruningConfig(
        ratio=0.25, criterion="similarity", round_to=1, finetune_epochs=0, layers=("3", "7")), start_epoch=0)
    ctx = ApplyContext(task=NoData(task), work_dir=None, epochs=0, seed=0, steps_per_epoch=1)
    model = handler.prepare(model, ctx)
    handler.on_epoch_start(model, 0, ctx)
    thinned = handler.finalize(model, ctx)
    assert handler.stats["channels_kept"] == {"3": "6/8", "7": "12/16"}
    assert handler.stats["similarity_merges"] == 6 and handler.stats["similarity_unfolded_groups"] == 0
    assert thinned[3].out_channels == 6 and thinned[7].out_features == 12
    assert not handler.last_keep["3"][[5, 7]].any() and not handler.last_keep["7"][9]  # the planted twins went
    with torch.no_grad():
        assert thinned.eval()(x).shape == ref.shape


def test_only_the_twins_go_when_only_twins_are_removed(task):
    model, x = twinned(), torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
    handler = StructuredPruning(StructuredPruningConfig(
        ratio=0.25, criterion="similarity", round_to=1, finetune_epochs=0, layers=("3",),
        per_layer={"3": 2 / 8}), start_epoch=0)
    ctx = ApplyContext(task=NoData(task), work_dir=None, epochs=0, seed=0, steps_per_epoch=1)
    model = handler.prepare(model, ctx)
    handler.on_epoch_start(model, 0, ctx)
    kept = handler.last_keep["3"]
    assert kept.tolist() == [True] * 5 + [False, True, False]  # channels 5 and 7, the planted twins
    thinned = handler.finalize(model, ctx)
    with torch.no_grad():
        assert torch.allclose(thinned.eval()(x), ref, atol=1e-5)
    l1 = StructuredPruning(StructuredPruningConfig(ratio=0.25, criterion="l1", round_to=1, finetune_epochs=0,
                                                   layers=("3",)), start_epoch=0)
    plain = l1.prepare(twinned(), ctx)
    l1.on_epoch_start(plain, 0, ctx)
    with torch.no_grad():
        assert not torch.allclose(l1.finalize(plain, ctx).eval()(x), ref, atol=1e-3)


@pytest.mark.parametrize("kind", sorted(GRAPHS))
def test_every_user_graph_is_pruned_or_refused_and_thins_exactly(task, kind):
    model = GRAPHS[kind]().eval()
    handler = StructuredPruning(StructuredPruningConfig(ratio=0.5, criterion="similarity", round_to=1,
                                                       finetune_epochs=0), start_epoch=0)
    ctx = ApplyContext(task=NoData(task), work_dir=None, epochs=0, seed=0, steps_per_epoch=1)
    try:
        model = handler.prepare(model, ctx)
    except ConfigError as exc:
        assert "structure group" in exc.message
        return
    handler.on_epoch_start(model, 0, ctx)
    thinned = handler.finalize(model, ctx)
    assert handler.stats["thinned_parity"] < 1e-4
    assert handler.stats["similarity_merges"] + handler.stats["similarity_unfolded_groups"] > 0
    assert thinned(task.example_input(2)).shape == (2, 10)


@pytest.mark.parametrize("config", [{"thin": False}, {"granularity": "kernel"}, {"mode": "soft"}])
def test_similarity_is_refused_where_it_cannot_fold(task, config):
    handler = StructuredPruning(StructuredPruningConfig(criterion="similarity", finetune_epochs=0, **config),
                                start_epoch=0)
    ctx = ApplyContext(task=task, work_dir=None, epochs=0, seed=0, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="thinned channels in hard mode") as err:
        handler.prepare(twinned(), ctx)
    assert err.value.key == "criterion"


def test_similarity_after_training_beats_magnitude_without_fine_tuning(tmp_path):
    """The bench's claim in small: an MLP trained on digits, a quarter of its neurons removed, no fine-tune."""
    def accuracy(criterion):
        recipe = Recipe.from_dict({
            "version": 1, "task": "digits", "arch": {"family": "mlp", "width": 64, "depth": 2},
            "train": {"epochs": 4, "lr": 0.005, "seed": 0},
            "stages": [{"method": "structured", "start_epoch": 4, "config": {
                "ratio": 0.25, "criterion": criterion, "round_to": 1, "finetune_epochs": 0}}]})
        return apply_recipe(recipe, tmp_path / criterion).metrics["accuracy"]
    assert accuracy("similarity") > accuracy("l1")


def test_only_plain_groups_fold():
    conv, dw, bn, bn2, lin = (nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.BatchNorm2d(4),
                              nn.Linear(4, 2))
    idx = tuple(range(4))
    member = lambda m, side: (m, side, idx, idx)  # noqa: E731
    assert S.foldable([member(conv, "out"), member(bn, "out"), member(lin, "in")]) == ""
    assert "more than one layer" in S.foldable([member(conv, "out"), member(lin, "out"), member(lin, "in")])
    assert "grouped/depthwise one" in S.foldable([member(dw, "out"), member(lin, "in")])
    assert "more than one BatchNorm" in S.foldable([member(conv, "out"), member(bn, "out"), member(bn2, "out"),
                                                    member(lin, "in")])
    assert "reads its channels" in S.foldable([member(conv, "out"), member(dw, "in")])
