"""Early exit on models we did not write: torch.fx cuts the forward where one tensor carries all the
work so far; positions are module names; the exits train, calibrate and deploy like a family's."""

import pytest
import torch
import torch.nn as nn

from byom_models import GRAPHS
from automl.compress.early_exit.model import EarlyExitConfig, early_exit_from_config
from automl.compress.early_exit.split import split_model
from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe
from repo_paths import BYOM_MODELS

GRAPH = f"{BYOM_MODELS}:graph"
X = torch.randn(3, 1, 8, 8)


@pytest.mark.parametrize("kind", sorted(GRAPHS))
def test_blocks_compose_to_the_model(kind):
    model = GRAPHS[kind]().eval()
    blocks, head, cuts = split_model(model, X)
    assert len(blocks) == len(cuts) + 1
    h = X
    for block in blocks:
        h = block(h)
    torch.testing.assert_close(head(h), model(X))
    weights = {id(p) for p in model.parameters()}
    assert all(id(p) in weights for b in blocks for p in b.parameters())  # shared, not copied


def test_no_cut_inside_a_skip_connection():
    _, _, cuts = split_model(GRAPHS["residual"]().eval(), X)
    assert [c.names[0] for c in cuts] == ["stem"]  # a and b are bypassed by the residual add
    with pytest.raises(ConfigError, match="skip") as info:
        early_exit_from_config(EarlyExitConfig(positions=("a",)), GRAPHS["residual"](), X)
    assert "stem" in str(info.value) and "Fix:" in str(info.value)


def test_positions_by_module_name():
    model = GRAPHS["grouped"]()
    ee = early_exit_from_config(EarlyExitConfig(positions=("g", "stem")), model, X)
    assert ee.exit_after == [0, 1] and len(ee.all_exits(X)) == 3
    assert early_exit_from_config(EarlyExitConfig(exits=1), GRAPHS["grouped"](), X).exit_after == [1]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        if x.sum() > 0:  # a Python branch on a tensor's value: fx cannot trace it
            x = -x
        return self.head(self.conv(x).mean((2, 3)))


def test_untraceable_forward_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="torch.fx could not trace") as info:
        early_exit_from_config(EarlyExitConfig(exits=1), Branchy(), X)
    assert "Fix:" in str(info.value)


@pytest.mark.slow
def test_user_model_with_exits_trains_calibrates_and_deploys(task, tmp_path):
    recipe = Recipe.from_dict({
        "version": 1, "task": "digits", "model": {"builder": GRAPH, "kwargs": {"kind": "dense"}},
        "train": {"epochs": 3, "lr": 0.01, "batch_size": 64},
        "stages": [{"method": "exits", "config": {"positions": ["stem"], "max_accuracy_drop": 0.02}}]})
    result = apply_recipe(recipe, tmp_path, task=task)
    m = result.metrics
    assert m["exit_after"] == "0" and m["accuracy"] > 0.5
    shares = [float(s) for s in m["exit_fractions_val"].split(",")]
    assert sum(shares) == pytest.approx(1.0, abs=0.01)
    # the typed deploy information a profile prices the segments by: one share per early exit
    assert result.artifact.exit_shares == pytest.approx(shares[:-1], abs=1e-3)
    assert len(result.artifact.deployed_files()) >= 2  # one graph per segment
