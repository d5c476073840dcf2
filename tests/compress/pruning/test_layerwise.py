"""Layer-wise (block) pruning: which blocks may go, exact param/MAC drops, scoring, errors, end to end."""
import onnx
import pytest
import torch
import torch.nn as nn
import yaml

from automl.compress import ApplyContext, get_method
from automl.compress.pruning.layerwise import (BlockInfo, LayerPruningConfig, blocks_to_remove, choose_blocks,
                                               contribution_scores, is_residual, removable_blocks, remove_blocks)
from automl.errors import ConfigError, UnknownNameError
from automl.modelstats import count_macs, count_params
from automl.recipe import Recipe, apply_recipe
from automl.recipe.from_config import start_epoch_for
from automl.recipe.schema import Stage
from automl.settings import TrainSettings

RESNET = {"width": 8, "stages": 2, "blocks": 2}


def _resnet(task, **params):
    torch.manual_seed(0)
    return task.build_model("resnet", {**RESNET, **params})


def _handler(config, start_epoch=None):
    return get_method("layer", category="pruning").handler_cls(config, start_epoch=start_epoch)


def _ctx(task, tmp_path, epochs=1):
    return ApplyContext(task=task, work_dir=tmp_path, epochs=epochs, seed=0)


def test_resnet_candidates_are_identity_shortcut_blocks(task):
    model = _resnet(task)
    found = dict(removable_blocks(model, task.example_input(1)))
    # stages.1.0 downsamples with a projection shortcut; stems, stages and leaf layers never qualify
    assert list(found) == ["stages.0.0", "stages.0.1", "stages.1.1"]
    assert all(info.kind == "residual" and info.members == (name,) for name, info in found.items())
    assert found["stages.1.1"].params == count_params(model.stages[1][1])
    assert not is_residual(model.stages[1][0]) and is_residual(model.stages[0][0])
    assert not is_residual(model.stages[0])  # a Sequential of blocks is not itself residual
    with_se = dict(removable_blocks(_resnet(task, se=True), task.example_input(1)))
    assert list(with_se) == ["stages.0.0", "stages.0.1", "stages.1.1"]


def test_mobilenetv2_candidates_are_the_residual_blocks(task):
    torch.manual_seed(0)
    model = task.build_model("mobilenetv2", {"width_mult": 0.5, "expansion": 2, "stages": 2, "blocks": 2})
    found = [n for n, _ in removable_blocks(model, task.example_input(1))]
    residual = [n for n, m in model.named_modules() if getattr(m, "residual", False) is True]
    assert found == residual == ["stages.0.0", "stages.0.1", "stages.1.1"]


def test_plain_cnn_blocks_only_when_asked(task):
    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 8, "depth": 3, "growth": 1.0, "pooling": "none"})
    assert removable_blocks(model, task.example_input(1)) == []
    found = dict(removable_blocks(model, task.example_input(1), plain=True))
    # block 0 maps 1 -> 8 channels; blocks 1 and 2 keep 8 channels at stride 1
    assert list(found) == ["features.3", "features.6"]
    assert found["features.3"].members == ("features.3", "features.4", "features.5")
    before = model(task.example_input(2)).shape
    remove_blocks(model, [("features.3", found["features.3"])])
    assert isinstance(model.features[4], nn.Identity) and model(task.example_input(2)).shape == before


def test_removal_drops_exactly_the_blocks_params_and_macs(task):
    model = _resnet(task).eval()
    example = task.example_input(2)
    found = dict(removable_blocks(model, example[:1]))
    block = model.stages[1][1]
    block_params = count_params(block)
    block_macs = count_macs(block, torch.randn(1, 16, 4, 4))  # stage 1 runs on 16 x 4 x 4
    params, macs, shape = count_params(model), count_macs(model, example[:1]), model(example).shape
    assert remove_blocks(model, [("stages.1.1", found["stages.1.1"])]) == block_params
    assert isinstance(model.stages[1][1], nn.Identity)
    assert model(example).shape == shape
    assert count_params(model) == params - block_params
    assert count_macs(model, example[:1]) == macs - block_macs


class Scaled(nn.Module):
    """x + s * x through a 1x1 conv: contribution is exactly |s| for any input."""

    def __init__(self, s, shortcut_const=False):
        super().__init__()
        self.branch = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.constant_(self.branch.weight, s)
        self.const = shortcut_const

    def forward(self, x):
        return self.branch(x) + 1.0 if self.const else torch.add(x, self.branch(x))


def test_contribution_scores_and_residual_rule_on_constructed_blocks():
    model = nn.Sequential(Scaled(0.5), Scaled(-0.1), Scaled(0.3, shortcut_const=True))
    found = dict(removable_blocks(model, torch.randn(1, 1, 4, 4)))
    assert list(found) == ["0", "1"]  # "2" adds a constant, not its input
    torch.manual_seed(0)
    scores = contribution_scores(model, found, [torch.randn(5, 1, 4, 4), torch.randn(3, 1, 4, 4)])
    assert scores["0"] == pytest.approx(0.5) and scores["1"] == pytest.approx(0.1)
    assert choose_blocks(scores, 1, found) == ["1"]


def test_count_and_choice_helpers():
    assert blocks_to_remove(2, 5) == 2 and blocks_to_remove(0.5, 6) == 3 and blocks_to_remove(0.01, 6) == 1
    assert blocks_to_remove(0, 3) == 0
    blocks = {n: BlockInfo("residual", (n,), 1, ()) for n in ("a", "a.b", "c")}
    # "a.b" is scored lowest, so its parent "a" cannot also go
    assert choose_blocks({"a": 0.2, "a.b": 0.1, "c": 0.3}, 2, blocks) == ["a.b", "c"]


@pytest.mark.parametrize("criterion", ["contribution", "bn_scale"])
def test_near_identity_block_goes_first(task, tmp_path, criterion):
    model = _resnet(task)
    with torch.no_grad():  # the residual branch of stages.0.1 now outputs zero: relu(x + 0) = x
        model.stages[0][1].bn2.weight.zero_()
    handler = _handler(LayerPruningConfig(blocks=1, criterion=criterion, calib_batches=2))
    ctx = _ctx(task, tmp_path)
    handler.prepare(model, ctx)
    model = handler.finalize(model, ctx)  # no epoch ran: finalize removes
    assert handler.scores["stages.0.1"] == 0.0
    assert min(handler.scores, key=handler.scores.get) == "stages.0.1"
    assert isinstance(model.stages[0][1], nn.Identity)
    stats = handler.stats
    assert stats["removed_blocks"] == "stages.0.1" and stats["pruned_blocks"] == 1 and stats["candidate_blocks"] == 3
    assert stats["params_before"] - stats["params_after"] == 1184
    assert stats["macs_after"] < stats["macs_before"]


def test_removal_waits_for_the_start_epoch_and_random_is_seeded(task, tmp_path):
    config = LayerPruningConfig(blocks=0.67, criterion="random", layers=("re:stages\\..*",))
    chosen = []
    for _ in range(2):
        model, handler = _resnet(task), _handler(config, start_epoch=2)
        ctx = _ctx(task, tmp_path, epochs=3)
        handler.prepare(model, ctx)
        handler.on_epoch_start(model, 1, ctx)
        assert handler.removed is None and count_params(model) == handler.before[0]
        handler.on_epoch_start(model, 2, ctx)
        assert len(handler.removed) == 2
        assert all(isinstance(model.get_submodule(n), nn.Identity) for n in handler.removed)
        chosen.append(handler.removed)
    assert chosen[0] == chosen[1]


def test_config_errors(task, tmp_path):
    ctx = _ctx(task, tmp_path)
    with pytest.raises(UnknownNameError) as err:
        _handler(LayerPruningConfig(layers=("stages.0.2",))).prepare(_resnet(task), ctx)
    assert "layers" in str(err.value) and "stages.0.1" in str(err.value) and "'stages.0.2'" in str(err.value)
    with pytest.raises(UnknownNameError, match="nearest block names: stages.1.1"):
        _handler(LayerPruningConfig(layers=("re:stages\\.1\\.0",))).prepare(_resnet(task), ctx)
    with pytest.raises(ConfigError, match="only 1 removable blocks match"):
        _handler(LayerPruningConfig(blocks=2, layers=("stages.1.1",))).prepare(_resnet(task), ctx)
    with pytest.raises(ConfigError, match="whole number"):
        _handler(LayerPruningConfig(blocks=1.5)).prepare(_resnet(task), ctx)
    cnn = task.build_model("cnn", {"width": 8, "depth": 2})
    with pytest.raises(ConfigError, match="no removable block.*plain: true"):
        _handler(LayerPruningConfig()).prepare(cnn, ctx)


def test_apply_recipe_exports_a_smaller_resnet(task, tmp_path):
    config = LayerPruningConfig(blocks=2, finetune_epochs=1)
    assert start_epoch_for(config, 2) == 1
    recipe = Recipe(task="digits", family="resnet", arch=dict(RESNET),
                    train=TrainSettings(epochs=2, lr=5e-3, batch_size=64), stages=(Stage("layer", config, 1),))
    assert Recipe.loads(yaml.safe_dump(recipe.to_dict())) == recipe
    result = apply_recipe(recipe, tmp_path, task=task)
    m = result.metrics
    assert m["pruned_blocks"] == 2 and len(m["removed_blocks"].split(",")) == 2
    assert m["macs"] == m["macs_after"] < m["macs_before"] and m["params"] == m["params_after"] < m["params_before"]
    # the bypassed blocks are gone from the deployed graph, not just zeroed
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(result.artifact.path)).graph.node)
    assert convs == 1 + 2 * 4 + 1 - 2 * 2  # stem + 4 blocks x 2 + projection - removed
    assert m["accuracy"] > 0.5
