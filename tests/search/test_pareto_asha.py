"""Pareto-aware early stopping: rung decisions on (accuracy so far, predicted cost)."""
import math
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from automl.io import parse_yaml
from automl.search.pareto_asha import COST_KEY, ParetoASHA, front_ranks, predicted_cost, promoted
from automl.spaces import parse_space
from automl.spaces.adapter import sample_config


def test_front_ranks_peel_non_dominated_fronts():
    points = [(0.9, 10.0), (0.8, 5.0), (0.85, 12.0), (0.7, 6.0), (0.95, 20.0)]
    assert front_ranks(points) == [0, 0, 1, 1, 0]


def test_a_fast_less_accurate_trial_goes_on_where_asha_would_stop_it():
    recorded = [(0.90, 10.0), (0.88, 12.0), (0.86, 11.0)]
    assert promoted((0.70, 2.0), recorded, reduction_factor=3)   # cheapest: on the first front
    assert not promoted((0.80, 13.0), recorded, reduction_factor=3)  # worse on both
    assert promoted((0.95, 50.0), recorded, reduction_factor=3)  # most accurate
    assert not promoted((0.80, math.inf), recorded, reduction_factor=3)  # no cost known: accuracy decides


def _trial(tid):
    return SimpleNamespace(trial_id=tid)


def test_scheduler_stops_dominated_trials_at_the_rung():
    sched = ParetoASHA(metric="accuracy", mode="max", max_t=9, grace_period=1, reduction_factor=3)
    results = {"a": (0.9, 10.0), "b": (0.88, 12.0), "c": (0.86, 11.0), "fast": (0.6, 1.0), "bad": (0.5, 20.0)}
    actions = {}
    for tid, (acc, cost) in results.items():
        sched.on_trial_add(None, _trial(tid))
        actions[tid] = sched.on_trial_result(None, _trial(tid), {"training_iteration": 1, "accuracy": acc,
                                                                 COST_KEY: cost})
    assert actions["fast"] == TrialScheduler.CONTINUE and actions["bad"] == TrialScheduler.STOP
    assert actions["a"] == TrialScheduler.CONTINUE
    last = sched.on_trial_result(None, _trial("a"), {"training_iteration": 9, "accuracy": 0.95, COST_KEY: 10.0})
    assert last == TrialScheduler.STOP  # max_t reached: done, as in ASHA


def test_cost_is_predicted_before_training_from_the_deployed_shape():
    text = """
version: 1
task: digits
arch: {family: cnn, width: {choice: [8, 32]}, depth: 2}
train: {epochs: 3}
objectives: {accuracy: max, latency_ms: min}
budget: {scheduler: pareto}
"""
    space = parse_space(parse_yaml(text, "p.yaml"), "p.yaml")
    task = space.build_task()
    config = sample_config(space)
    narrow = predicted_cost(space, {**config, "arch.width": 8}, task)
    wide = predicted_cost(space, {**config, "arch.width": 32}, task)
    assert 0 < narrow < wide  # MACs without a profile
    assert predicted_cost(space, {**config, "arch.width": "bad"}, task) is None


def test_unknown_scheduler_is_refused():
    from automl.errors import ConfigError

    with pytest.raises(ConfigError, match="scheduler"):
        parse_space(parse_yaml("version: 1\ntask: digits\narch: {family: cnn}\nobjectives: {accuracy: max}\n"
                               "budget: {scheduler: hyperband}\n", "x.yaml"), "x.yaml")
