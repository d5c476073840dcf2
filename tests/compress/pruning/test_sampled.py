"""allocation: sampled -- random allocations at the MAC target, the lowest batch-statistics loss kept."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.compress import ApplyContext
from automl.compress.pruning.sampled import batch_stat_loss, pick_multipliers, random_multipliers
from automl.compress.pruning.structured import StructuredPruning, StructuredPruningConfig
from automl.errors import ConfigError
from automl.tasks import get_task


@pytest.fixture(scope="module")
def task():
    return get_task("digits")


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_candidates_start_uniform_and_are_seeded():
    first = random_multipliers(["a", "b"], 5, seed=3, spread=0.7)
    assert len(first) == 5 and first[0] == {"a": 1.0, "b": 1.0}
    assert all(0.3 <= v <= 1.7 for c in first[1:] for v in c.values())
    assert first == random_multipliers(["a", "b"], 5, seed=3, spread=0.7)
    assert first != random_multipliers(["a", "b"], 5, seed=4, spread=0.7)


def test_the_lowest_loss_wins_and_unreachable_or_nan_candidates_do_not():
    candidates = [{"u": 1.0}, {"u": 0.5}, {"u": 1.5}, {"u": 1.2}]
    losses = {1.0: 2.0, 0.5: float("nan"), 1.5: 0.1, 1.2: 1.0}
    picked = pick_multipliers(candidates, lambda m: None if m["u"] == 1.5 else m["u"], lambda keep: losses[keep])
    assert picked["multipliers"] == {"u": 1.2} and picked["loss"] == 1.0
    assert picked["uniform_loss"] == 2.0 and picked["scored"] == 3


def test_batch_statistics_ignore_stale_running_statistics_and_change_nothing():
    model = cnn().eval()
    with torch.no_grad():  # stale statistics: eval mode would be far off
        model[1].running_var.fill_(1e-6)
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    reference = copy.deepcopy(model).train()
    reference[9].eval()  # dropout off
    with torch.no_grad():
        expected = F.cross_entropy(reference(x), y).item()
    assert batch_stat_loss(model, {}, [(x, y)]) == pytest.approx(expected, rel=1e-5)
    masks = {"3": torch.arange(32).reshape(32, 1, 1, 1).expand(32, 16, 3, 3) < 16, "4": torch.arange(32) < 16}
    assert batch_stat_loss(model, masks, [(x, y)]) != pytest.approx(expected, rel=1e-3)
    assert not model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def run(task, **config):
    handler = StructuredPruning(StructuredPruningConfig(**{"criterion": "l1", "finetune_epochs": 0, "round_to": 4,
                                                           **config}), start_epoch=0)
    ctx = ApplyContext(task=task, work_dir=None, epochs=0, seed=0, steps_per_epoch=1)
    model = handler.prepare(cnn(), ctx)
    handler.on_epoch_start(model, 0, ctx)
    return handler, handler.finalize(model, ctx)


def test_the_chosen_allocation_is_the_one_deployed(task):
    handler, thinned = run(task, mac_reduction=2.0, allocation="sampled", candidates=12)
    stats = handler.stats
    assert stats["sampled_scored"] == 12 and stats["mac_reduction"] == pytest.approx(2.0, rel=0.05)
    assert stats["sampled_loss"] < stats["sampled_uniform_loss"]  # a random allocation beat uniform here
    # the thinned model leaves, on the same calibration batches, the loss the choice was made on
    assert batch_stat_loss(thinned, {}, handler.batches) == pytest.approx(stats["sampled_loss"], rel=1e-4)
    uniform, _ = run(task, mac_reduction=2.0, allocation="uniform")
    assert stats["channels_kept"] != uniform.stats["channels_kept"]
    assert not math.isnan(stats["sampled_loss"])


def test_sampled_needs_a_mac_target(task):
    with pytest.raises(ConfigError, match="one MAC target") as info:
        run(task, ratio=0.5, allocation="sampled")
    assert info.value.key == "allocation"
