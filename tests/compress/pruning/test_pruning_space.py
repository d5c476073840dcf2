"""The example pruning space: every pruning method it offers runs end to end through apply_recipe."""

import pytest
import torch

from automl.recipe import apply_recipe, recipe_from_config
from automl.spaces import load_space
from automl.tasks import get_task
from repo_paths import REPO

SPACE = REPO / "search_spaces" / "digits_resnet_pruning.yaml"

BASE = {"arch.width": 32, "arch.stages": 2, "arch.blocks": 2, "arch.se": True, "train.epochs": 3, "train.lr": 5e-3,
        "train.batch_size": 32, "regularization.method": "none", "regularization.end_epoch": 2,
        "pruning.method": "none", "pruning.finetune_epochs": 1, "quantization.method": "none",
        "quantization.mode": "static"}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"pruning.method": "agp", "pruning.ratio": 0.8, "regularization.method": "group_lasso",
     "regularization.strength": 1e-4},
    {"pruning.method": "structured", "pruning.mac_reduction": 2.0, "pruning.criterion": "taylor",
     "pruning.allocation": "global", "regularization.method": "bn_scale_l1", "regularization.strength": 1e-4},
    {"pruning.method": "layer", "pruning.blocks": 2},
], ids=["agp+group_lasso", "structured+bn_scale_l1", "layer"])
def test_space_methods_run(overrides, tmp_path):
    torch.set_num_threads(1)
    space = load_space(SPACE)
    recipe = recipe_from_config(space, {**BASE, **overrides})
    result = apply_recipe(recipe, tmp_path, task=get_task("digits"))
    m = result.metrics
    dense_macs = m.get("dense_macs", m.get("macs_before", m["macs"]))
    if overrides["pruning.method"] == "agp":
        assert m["pruned_sparsity"] == pytest.approx(0.8, abs=0.01)
    else:
        assert m["macs"] < dense_macs
    if overrides["pruning.method"] == "structured":
        # the nearest point of the 16-channel grid at or beyond the target
        assert dense_macs / 2.6 < m["macs"] <= dense_macs / 2 * 1.02
    assert m["accuracy"] > 0.5


def test_shared_option_checked_against_the_methods_its_condition_allows(tmp_path):
    from automl.errors import ConfigError

    text = SPACE.read_text()
    load_space(SPACE)  # criterion values of `structured` pass although `layer` has other choices
    bad = text.replace("criterion: {choice: [l1, fpgm, taylor, bn_scale]", "criterion: {choice: [l1, contribution]")
    path = tmp_path / "s.yaml"
    path.write_text(bad)
    with pytest.raises(ConfigError, match=r"compression\.pruning\.criterion\.choice\.1: not one of the allowed values"):
        load_space(path)
