"""Pruning, regularization and the recipe's schedule inside the real training loop (digits)."""
import pytest
import torch

from automl.compress import ApplyContext
from automl.errors import ConfigError
from automl.recipe import Recipe
from automl.recipe.apply import train_with_stages

BASE = """version: 1
task: digits
arch: {family: cnn, width: 32, depth: 3, kernel: 3, pooling: stride}
train: {epochs: %d, lr: 0.005, batch_size: 32}
"""


def train(task, text, epochs=12):
    recipe = Recipe.loads(BASE % epochs + text)
    ctx = ApplyContext(task=task, work_dir=".", epochs=recipe.train.epochs)
    model, handlers = train_with_stages(recipe, task, ctx)
    return model, handlers, task.evaluate(model, task.val_loader())


def test_ninety_percent_sparsity_costs_at_most_one_point(task):
    torch.set_num_threads(1)
    _, _, dense = train(task, "stages: []\n")
    model, handlers, pruned = train(task, "stages: [{method: agp, start_epoch: 7, config: "
                                          "{ratio: 0.9, finetune_epochs: 5, ramp_epochs: 3}}]\n")
    assert handlers[0].stats["pruned_sparsity"] == pytest.approx(0.9, abs=1e-3)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.9, abs=1e-3)
    assert dense - pruned <= 0.01, (dense, pruned)


def test_group_lasso_stage_shrinks_filter_norms(task):
    def filter_norms(model):
        w = model.features[3].weight.detach()
        return w.flatten(1).norm(dim=1)

    plain, _, _ = train(task, "stages: []\n", epochs=3)
    reg, handlers, acc = train(task, "stages: [{method: group_lasso, config: {strength: 0.02, groups: filter}}]\n",
                               epochs=3)
    assert filter_norms(reg).sum() < 0.7 * filter_norms(plain).sum()
    assert 0.0 <= handlers[0].stats["regularized_below_threshold"] <= 1.0


def test_regularizer_stops_at_end_epoch(task):
    _, handlers, _ = train(task, "stages: [{method: l1, config: {strength: 1e-3, end_epoch: 1}}]\n", epochs=2)
    h = handlers[0]
    assert h.epoch == 1 and not h.active()
    h.epoch = 0
    assert h.active()


def test_schedule_policies_fire_on_their_epochs(task, monkeypatch):
    from automl.compress import schedule as sched

    calls = []
    monkeypatch.setattr(sched.RegularizationPolicy, "on_epoch_begin",
                        lambda self, epoch: calls.append(epoch), raising=False)
    text = ("stages: []\nschedule:\n"
            "- {policy: regularization, kind: l1, strength: 1e-4, start_epoch: 1, end_epoch: 5, frequency: 2}\n"
            "- {policy: lr, kind: step, gamma: 0.5, step: 1, start_epoch: 4}\n")
    recipe = Recipe.loads(BASE % 6 + text)
    assert Recipe.loads(BASE % 6 + "stages: []\n").schedule == ()
    ctx = ApplyContext(task=task, work_dir=".", epochs=6)
    train_with_stages(recipe, task, ctx)
    assert calls == [1, 3]  # epochs 1..4, every 2nd
    # round trip keeps the schedule
    again = Recipe.from_dict(recipe.to_dict())
    assert again.schedule == recipe.schedule


def test_lr_policy_replaces_cosine(task, monkeypatch):
    seen = []
    text = "stages: []\nschedule:\n- {policy: lr, kind: step, gamma: 0.5, step: 1, start_epoch: 1}\n"
    recipe = Recipe.loads(BASE % 3 + text)
    ctx = ApplyContext(task=task, work_dir=".", epochs=3)
    original = task.train_epoch

    def spy(model, optimizer, loader, **kw):
        seen.append(optimizer.param_groups[0]["lr"])
        return original(model, optimizer, loader, **kw)

    monkeypatch.setattr(task, "train_epoch", spy)
    train_with_stages(recipe, task, ctx)
    assert seen == pytest.approx([0.005, 0.005, 0.0025])  # decays count from the start epoch


def test_schedule_beyond_training_is_an_error():
    with pytest.raises(ConfigError, match=r"schedule\.0\.start_epoch: starts after training ends \(3 epochs\)"):
        Recipe.loads(BASE % 3 + "schedule: [{policy: regularization, kind: l1, start_epoch: 3}]\n", "r.yaml")
