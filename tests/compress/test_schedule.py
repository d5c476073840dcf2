"""Compression scheduler: epoch windows, penalties only when active, LR formulas, YAML parsing and errors."""
import math

import pytest
import torch
import torch.nn as nn
import yaml

from automl.compress.regularization.penalties import Regularizer, RegularizerConfig
from automl.compress.schedule import (CompressionScheduler, LRConfig, LRPolicy, Policy, PolicySpec,
                                      RegularizationPolicy, build_scheduler, check_schedule_epochs,
                                      cosine_decay, parse_schedule, schedule_to_dict, step_decay)
from automl.errors import ConfigError, UnknownNameError
from automl.io import parse_yaml
from automl.validate import Where

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

EPOCHS, STEPS = 10, 2


class Recorder(Policy):
    def __init__(self):
        self.events = []

    def on_epoch_begin(self, epoch):
        self.events.append(("begin", epoch))

    def on_minibatch_begin(self):
        self.events.append(("mb_begin", None))

    def penalty(self):
        self.events.append(("penalty", None))
        return None

    def on_minibatch_end(self):
        self.events.append(("mb_end", None))

    def on_epoch_end(self, epoch):
        self.events.append(("end", epoch))


def run(sched, epochs=EPOCHS, steps=STEPS, loss_fn=lambda: torch.tensor(1.0)):
    """The training-loop call order; returns the loss after before_backward per (epoch, step)."""
    losses = {}
    for epoch in range(epochs):
        sched.on_epoch_begin(epoch)
        for step in range(steps):
            sched.on_minibatch_begin(epoch, step)
            losses[epoch, step] = sched.before_backward(epoch, step, loss_fn())
            sched.on_minibatch_end(epoch, step)
        sched.on_epoch_end(epoch)
    return losses


@pytest.mark.parametrize("start, end, freq, expected", [
    (0, None, 1, list(range(10))),
    (2, 5, 1, [2, 3, 4]),          # end exclusive
    (1, 8, 3, [1, 4, 7]),
    (3, None, 2, [3, 5, 7, 9]),    # open end: until training ends
    (0, 1, 5, [0]),
    (9, 12, 1, [9]),
])
def test_scheduler_fires_on_exactly_the_named_epochs(start, end, freq, expected):
    rec = Recorder()
    sched = CompressionScheduler()
    sched.add(rec, start_epoch=start, end_epoch=end, frequency=freq)
    run(sched)
    assert [e for kind, e in rec.events if kind == "begin"] == expected
    assert [e for kind, e in rec.events if kind == "end"] == expected
    for kind in ("mb_begin", "penalty", "mb_end"):
        assert sum(k == kind for k, _ in rec.events) == STEPS * len(expected)
    # order inside one active epoch
    first = rec.events[: 2 + 3 * STEPS]
    assert [k for k, _ in first] == ["begin"] + ["mb_begin", "penalty", "mb_end"] * STEPS + ["end"]


def test_bad_windows_rejected_by_add():
    sched = CompressionScheduler()
    for kwargs in ({"start_epoch": 3, "end_epoch": 3}, {"frequency": 0}, {"start_epoch": -1}):
        with pytest.raises(ValueError):
            sched.add(Recorder(), **kwargs)


def test_duck_typed_pruner_and_sticky_minibatch_end():
    class Pruner:  # only the two hooks a pruning handler wrapper would have
        every_step_after_start = True

        def __init__(self):
            self.epochs, self.steps = [], 0

        def on_epoch_begin(self, epoch):
            self.epochs.append(epoch)

        def on_minibatch_end(self):
            self.steps += 1

    pruner = Pruner()
    sched = CompressionScheduler()
    sched.add(pruner, start_epoch=2, end_epoch=6, frequency=2)
    run(sched)
    assert pruner.epochs == [2, 4]
    assert pruner.steps == STEPS * (EPOCHS - 2)  # masks re-applied in every step from epoch 2 on


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_regularizer_penalty_added_only_in_active_epochs():
    model = tiny_model()
    reg = Regularizer(RegularizerConfig(kind="group_lasso", groups="filter", strength=0.1, layers=("0",)))
    sched = CompressionScheduler()
    sched.add(RegularizationPolicy(reg, model), start_epoch=1, end_epoch=5, frequency=2)
    losses = run(sched, epochs=6)
    expected_penalty = float(reg.penalty(model))
    assert expected_penalty > 0
    for (epoch, _), loss in losses.items():
        extra = expected_penalty if epoch in (1, 3) else 0.0
        assert float(loss) == pytest.approx(1.0 + extra)
    # the penalty carries gradients into the selected layer only
    loss = sched.before_backward(1, 0, torch.tensor(0.0))
    loss.backward()
    assert model[0].weight.grad is not None and model[2].weight.grad is None
    assert sched.entries[0].policy.last_report["0"]["groups"] == 4.0


def test_step_lr_matches_formula_per_epoch():
    params = [nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params, "lr": 0.8}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    sched = CompressionScheduler()
    sched.add(LRPolicy(opt, LRConfig(kind="step", gamma=0.5, step=2), start_epoch=1, end_epoch=None),
              start_epoch=1)
    seen = []
    for epoch in range(7):
        sched.on_epoch_begin(epoch)
        seen.append([g["lr"] for g in opt.param_groups])
    expected = [0.8, 0.8, 0.8, 0.4, 0.4, 0.2, 0.2]  # epoch 0 untouched, then 0.8 * 0.5^floor((e-1)/2)
    assert [s[0] for s in seen] == pytest.approx(expected)
    assert [s[1] for s in seen] == pytest.approx([e / 8 for e in expected])  # each group from its own lr0
    assert step_decay(1.0, 7, 1, 0.1, 3) == pytest.approx(0.01)


def test_cosine_lr_matches_torch_and_endpoints():
    assert cosine_decay(1.0, 2, 2, 6) == 1.0
    assert cosine_decay(1.0, 4, 2, 6, 0.2) == pytest.approx(0.6)  # halfway: the mean of the two ends
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=5, eta_min=0.01)
    policy = LRPolicy(opt, LRConfig(kind="cosine", min_lr=0.01), start_epoch=0, end_epoch=5)
    for epoch in range(5):
        policy.on_epoch_begin(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    with pytest.raises(ValueError, match="end epoch"):
        LRPolicy(opt, LRConfig(kind="cosine"), start_epoch=0, end_epoch=None)


RECIPE = """
schedule:
  - {policy: regularization, kind: group_lasso, groups: filter, strength: 1e-4, layers: ["re:features.*"], start_epoch: 0, end_epoch: 6}
  - {policy: lr, kind: step, gamma: 0.5, step: 2, start_epoch: 6}
  - {policy: regularization, kind: bn_scale_l1, strength: 1e-3, frequency: 2}
"""


def test_yaml_parse_and_round_trip():
    data = parse_yaml(RECIPE, "r.yaml")
    specs = parse_schedule(data["schedule"], Where("r.yaml", "schedule"))
    assert [s.policy for s in specs] == ["regularization", "lr", "regularization"]
    reg, lr, bn = specs
    assert reg.config == RegularizerConfig(kind="group_lasso", groups="filter", strength=1e-4,
                                           layers=("re:features.*",))
    assert (reg.start_epoch, reg.end_epoch, reg.frequency) == (0, 6, 1)
    assert lr.config == LRConfig(kind="step", gamma=0.5, step=2) and lr.end_epoch is None
    assert bn.frequency == 2
    dumped = schedule_to_dict(specs)
    assert "groups" not in dumped[2] and "min_lr" not in dumped[1]  # keys a kind does not use stay out
    again = parse_schedule(yaml.safe_load(yaml.safe_dump(dumped)), Where("again.yaml", "schedule"))
    assert again == specs
    assert parse_schedule(None, Where()) == []


def err(text, match=None):
    with pytest.raises(ConfigError) as info:
        parse_schedule(parse_yaml(text)["schedule"], Where("r.yaml", "schedule"))
    if match:
        assert match in str(info.value), str(info.value)
    return info.value


def test_misspelt_key_gets_did_you_mean():
    e = err("schedule:\n  - {policy: lr, kind: step, strat_epoch: 2}")
    assert e.file == "r.yaml" and e.key == "schedule.0.strat_epoch"
    assert "did you mean 'start_epoch'" in e.fix


def test_start_not_before_end_names_key_and_values():
    e = err("schedule:\n  - {policy: lr, start_epoch: 4, end_epoch: 4}")
    assert e.key == "schedule.0.end_epoch" and e.value == 4 and "start_epoch (4)" in e.message


@pytest.mark.parametrize("entry, key, match", [
    ("{policy: lr, frequency: 0}", "schedule.0.frequency", "out of range"),
    ("{policy: lr, start_epoch: -1}", "schedule.0.start_epoch", "out of range"),
    ("{policy: lr, start_epoch: '1'}", "schedule.0.start_epoch", "expected an integer"),
    ("{policy: regularisation}", "schedule.0.policy", "did you mean 'regularization'"),
    ("{kind: step}", "schedule.0.policy", "missing required key"),
    ("{policy: regularization, kind: group_laso}", "schedule.0.kind", "did you mean 'group_lasso'"),
    ("{policy: regularization, strength: -1.0}", "schedule.0.strength", "out of range"),
    ("{policy: regularization, kind: l1, groups: filter}", "schedule.0.groups", "not used by kind 'l1'"),
    ("{policy: lr, kind: cosine, gamma: 0.5}", "schedule.0.gamma", "not used by kind 'cosine'"),
    ("[1, 2]", "schedule.0", "expected a mapping"),
])
def test_bad_entries(entry, key, match):
    e = err(f"schedule:\n  - {entry}", match)
    assert e.key == key


def test_overlapping_lr_policies_rejected():
    e = err("schedule:\n  - {policy: lr, start_epoch: 0, end_epoch: 4}\n  - {policy: lr, start_epoch: 3}",
            "overlaps the lr policy at schedule.0")
    assert e.key == "schedule.1.start_epoch"
    parse_schedule(parse_yaml("schedule:\n  - {policy: lr, end_epoch: 3}\n  - {policy: lr, start_epoch: 3}")
                   ["schedule"], Where())  # touching windows are fine (end exclusive)


def test_check_against_training_epochs():
    specs = [PolicySpec("lr", LRConfig(), 0, 12)]
    with pytest.raises(ConfigError) as info:
        check_schedule_epochs(specs, 10, Where("r.yaml", "schedule"))
    assert info.value.key == "schedule.0.end_epoch"
    with pytest.raises(ConfigError, match="starts after training ends"):
        check_schedule_epochs([PolicySpec("lr", LRConfig(), 10)], 10, Where())
    check_schedule_epochs([PolicySpec("lr", LRConfig(), 0, 10)], 10, Where())


def test_build_scheduler_binds_policies_and_names_bad_layers():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    text = ("schedule:\n  - {policy: regularization, kind: l1, strength: 0.5, layers: ['2'], end_epoch: 2}\n"
            "  - {policy: lr, kind: cosine, start_epoch: 2}")
    specs = parse_schedule(parse_yaml(text)["schedule"], Where("r.yaml", "schedule"))
    sched = build_scheduler(specs, model, opt, epochs=6)
    assert sched.entries[1].end_epoch is None and sched.entries[1].policy.end_epoch == 6  # cosine spans 2..6
    l1 = float(model[2].weight.abs().sum())
    assert float(sched.before_backward(0, 0, torch.tensor(0.0))) == pytest.approx(0.5 * l1)
    assert float(sched.before_backward(2, 0, torch.tensor(0.0))) == 0.0
    sched.on_epoch_begin(4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 4)))
    bad = parse_schedule([{"policy": "regularization", "layers": ["fc"]}], Where("r.yaml", "schedule"))
    with pytest.raises(UnknownNameError) as info:
        build_scheduler(bad, model, opt, epochs=6, where=Where("r.yaml", "schedule"))
    assert info.value.file == "r.yaml" and info.value.key == "schedule.0.layers" and "nearest" in info.value.fix
