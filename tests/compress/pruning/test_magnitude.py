"""Magnitude pruning: exact masks and the handler lifecycle with hard masks."""
import pytest
import torch
import torch.nn as nn

from automl.compress import ApplyContext, get_method
from automl.compress.pruning.magnitude import MagnitudePruning, MagnitudePruningConfig, magnitude_masks
from automl.errors import LifecycleError, UnknownNameError


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_global_scope_one_threshold():
    weights = {"a": t(1.0, 2.0, 3.0, 4.0), "b": t(10.0, 20.0, 30.0, 40.0)}
    masks = magnitude_masks(weights, 0.5, "global")
    assert masks["a"].tolist() == [False, False, False, False]
    assert masks["b"].tolist() == [True, True, True, True]


def test_layer_scope_prunes_each_tensor():
    weights = {"a": t(1.0, 2.0, 3.0, 4.0), "b": t(40.0, 10.0, 30.0, 20.0)}
    masks = magnitude_masks(weights, 0.5, "layer")
    assert masks["a"].tolist() == [False, False, True, True]
    assert masks["b"].tolist() == [True, False, True, False]


def test_magnitude_uses_absolute_values():
    masks = magnitude_masks({"w": t(-5.0, 1.0, -2.0, 3.0)}, 0.5)
    assert masks["w"].tolist() == [True, False, False, True]


@pytest.mark.parametrize("n, ratio, dropped", [(10, 0.33, 3), (7, 0.6, 4), (10, 0.3, 3), (4, 0.1, 0),
                                               (100, 0.95, 95), (9, 0.5, 4)])
def test_exact_count_dropped(n, ratio, dropped):
    w = torch.arange(1, n + 1, dtype=torch.float32)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    mask = magnitude_masks({"w": w}, ratio)["w"]
    assert int((~mask).sum()) == dropped == round(ratio * n)
    if dropped:  # the dropped ones are the smallest
        assert w[~mask].abs().max() < w[mask].abs().min()


def test_ties_broken_stably_by_position():
    masks = magnitude_masks({"w": t(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)}, 0.5)
    assert masks["w"].tolist() == [False, False, False, True, True, True]
    masks = magnitude_masks({"a": t(2.0, 1.0), "b": t(1.0, 1.0, 3.0)}, 0.4)  # drop 2 of three 1.0s
    assert masks["a"].tolist() == [True, False] and masks["b"].tolist() == [False, True, True]


def test_masks_keep_shapes_and_dtype():
    weights = {"conv": torch.randn(4, 2, 3, 3), "fc": torch.randn(10, 8)}
    masks = magnitude_masks(weights, 0.25, "global")
    assert masks["conv"].shape == (4, 2, 3, 3) and masks["fc"].shape == (10, 8)
    assert masks["conv"].dtype == torch.bool
    total = 72 + 80
    assert total - sum(int(m.sum()) for m in masks.values()) == round(0.25 * total)


def test_ratio_zero_keeps_all():
    masks = magnitude_masks({"w": t(0.0, 1.0, -1.0)}, 0.0)
    assert masks["w"].all()


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        magnitude_masks({"w": t(1.0, 2.0)}, ratio)


def test_masks_do_not_modify_weights():
    w = t(3.0, -1.0, 2.0)
    magnitude_masks({"w": w}, 0.5)
    assert w.tolist() == [3.0, -1.0, 2.0]


# --- handler lifecycle -----------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def ctx(tmp_path, epochs=4):
    return ApplyContext(task=None, work_dir=tmp_path, epochs=epochs)


def sparsity(tensor):
    return float((tensor == 0).sum()) / tensor.numel()


def train_step(model, optimizer):
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_registered_under_magnitude():
    info = get_method("magnitude")
    assert info.handler_cls is MagnitudePruning and info.config_cls is MagnitudePruningConfig


def test_calls_before_prepare_raise(tmp_path):
    handler = MagnitudePruning(MagnitudePruningConfig(ratio=0.5))
    model = Net()
    with pytest.raises(LifecycleError, match=r"after_step\(\) called in state 'new'"):
        handler.after_step(model)
    with pytest.raises(LifecycleError, match="on_epoch_start"):
        handler.on_epoch_start(model, 0, ctx(tmp_path))
    with pytest.raises(LifecycleError, match="finalize"):
        handler.finalize(model, ctx(tmp_path))
    with pytest.raises(LifecycleError, match="deploy"):
        handler.deploy(None, ctx(tmp_path))


def test_order_after_prepare(tmp_path):
    handler = MagnitudePruning(MagnitudePruningConfig(ratio=0.5))
    model = Net()
    handler.prepare(model, ctx(tmp_path))
    with pytest.raises(LifecycleError, match="prepare"):
        handler.prepare(model, ctx(tmp_path))
    with pytest.raises(LifecycleError, match="deploy"):
        handler.deploy(None, ctx(tmp_path))
    handler.finalize(model, ctx(tmp_path))
    with pytest.raises(LifecycleError, match=r"after_step\(\) called in state 'finalized'"):
        handler.after_step(model)
    assert handler.deploy("artifact", ctx(tmp_path)) == "artifact"
    assert handler.state == "deployed"


def test_prepare_with_unknown_layer(tmp_path):
    handler = MagnitudePruning(MagnitudePruningConfig(layers=("conv1",)))
    with pytest.raises(UnknownNameError, match="nearest layer names: conv"):
        handler.prepare(Net(), ctx(tmp_path))


def test_prune_at_start_epoch_and_hard_masks(tmp_path):
    model = Net()
    bn_before = model.bn.weight.detach().clone()
    c = ctx(tmp_path)
    handler = MagnitudePruning(MagnitudePruningConfig(ratio=0.75, scope="layer"), start_epoch=2)
    assert handler.prepare(model, c) is model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    for epoch in (0, 1):
        handler.on_epoch_start(model, epoch, c)
        assert sparsity(model.conv.weight) == 0.0 and sparsity(model.fc.weight) == 0.0
        train_step(model, optimizer)
        handler.after_step(model)
        assert sparsity(model.conv.weight) == 0.0

    handler.on_epoch_start(model, 2, c)
    assert sparsity(model.conv.weight) == round(0.75 * 36) / 36
    assert sparsity(model.fc.weight) == round(0.75 * 192) / 192
    zero_conv = model.conv.weight == 0
    zero_fc = model.fc.weight == 0

    for epoch in (2, 3):
        if epoch == 3:
            handler.on_epoch_start(model, epoch, c)  # does not prune a second time
        train_step(model, optimizer)
        # The optimizer moved the pruned weights (momentum) ...
        assert not (model.fc.weight[zero_fc] == 0).all()
        handler.after_step(model)
        # ... and after_step puts them back to exactly zero.
        assert torch.equal(model.conv.weight == 0, zero_conv)
        assert torch.equal(model.fc.weight == 0, zero_fc)

    assert sparsity(model.bn.weight) == 0.0 and not torch.equal(model.bn.weight, bn_before)  # untouched
    assert handler.finalize(model, c) is model
    assert handler.stats["pruned_layers"] == 2
    assert handler.stats["pruned_sparsity"] == pytest.approx((27 + 144) / (36 + 192))
    assert torch.equal(model.fc.weight == 0, zero_fc)


def test_finalize_prunes_when_no_epoch_started(tmp_path):
    model = Net()
    c = ctx(tmp_path)
    handler = MagnitudePruning(MagnitudePruningConfig(ratio=0.5, layers=("fc",)))
    handler.prepare(model, c)
    handler.finalize(model, c)
    assert sparsity(model.fc.weight) == 0.5
    assert sparsity(model.conv.weight) == 0.0
    assert handler.stats == {"pruned_layers": 1, "pruned_sparsity": 0.5, "pruning_events": 1}


def test_start_epoch_none_prunes_at_first_epoch(tmp_path):
    model = Net()
    c = ctx(tmp_path)
    handler = MagnitudePruning(MagnitudePruningConfig(ratio=0.5, scope="global"))
    handler.prepare(model, c)
    handler.on_epoch_start(model, 0, c)
    total = 36 + 192
    zeros = int((model.conv.weight == 0).sum() + (model.fc.weight == 0).sum())
    assert zeros == total // 2
    handler.finalize(model, c)
    assert handler.stats["pruned_sparsity"] == 0.5


def test_masks_match_a_stable_sort_with_many_ties():
    """The linear-time threshold drops exactly what a stable argsort of |w| would (ties in position order)."""
    import torch

    from automl.compress.pruning.magnitude import magnitude_masks

    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randint(-3, 4, (7, 5), generator=g).float(), "b": torch.randint(-3, 4, (11,), generator=g).float()}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    for ratio in (0.1, 0.33, 0.5, 0.9):
        n_drop = int(round(ratio * flat.numel()))
        expected = torch.ones_like(flat, dtype=torch.bool)
        expected[torch.argsort(flat, stable=True)[:n_drop]] = False
        masks = magnitude_masks(weights, ratio)
        assert torch.equal(torch.cat([masks["a"].flatten(), masks["b"].flatten()]), expected)
