"""Pareto-aware early stopping: ASHA's rungs, decided on (accuracy so far, predicted cost).

ASHA on accuracy alone stops the small, fast candidates first -- the ones a Pareto front needs. Here
each trial's cost is predicted before it trains, from its deployed shape (``build_candidate``, the
model with the config's pruning and exits applied, random weights): latency from the hardware profile
when the search has a measured one, else the candidate's MACs. The trial reports it with every epoch.
At a rung, a trial goes on when it is on the first non-dominated front of the trials recorded there
(itself included), or within the best 1/reduction_factor of them ranked by front, then accuracy.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence, Tuple

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

COST_KEY = "predicted_cost"
LOG = logging.getLogger(__name__)
Point = Tuple[float, float]  # (reward, cost): reward larger is better, cost smaller


def predicted_cost(space, config, task, costing=None) -> Optional[float]:
    """Latency (ms) from a measured profile, else MACs, of ``config``'s deployed shape; None when the
    candidate cannot be built or priced (the scheduler then ranks the trial by accuracy alone)."""
    from automl.hardware.candidates import build_candidate
    from automl.hardware.predict import predict_model
    from automl.modelstats import count_macs

    try:
        cand = build_candidate(space, config, task=task)
        if cost_basis(costing) == "latency_ms":
            return predict_model(costing.profile, cand.model, cand.example, cand.precision,
                                 space=space.source).latency_ms
        return float(count_macs(cand.model, cand.example[:1]))
    except Exception as exc:  # the cost is advisory: the trial itself fails if its model is broken
        LOG.warning("no predicted cost for this trial (%s: %s); early stopping ranks it by accuracy alone",
                    type(exc).__name__, str(exc)[:300])
        return None


def cost_basis(costing) -> str:
    """What every trial of a search is priced by (one unit for the whole search)."""
    return "latency_ms" if costing is not None and not costing.profile.modelled else "macs"


def _dominates(a: Point, b: Point) -> bool:
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def front_ranks(points: Sequence[Point]) -> List[int]:
    """Non-dominated sorting: 0 for the first front, 1 for the next ..."""
    ranks, left, rank = [0] * len(points), set(range(len(points))), 0
    while left:
        front = {i for i in left if not any(_dominates(points[j], points[i]) for j in left if j != i)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def promoted(point: Point, recorded: Sequence[Point], reduction_factor: float) -> bool:
    """Whether ``point`` goes on past a rung where ``recorded`` are the earlier trials' points."""
    points = [*recorded, point]
    ranks = front_ranks(points)
    if ranks[-1] == 0:
        return True
    order = sorted(range(len(points)), key=lambda i: (ranks[i], -points[i][0]))
    keep = math.ceil(len(points) / reduction_factor)
    return order.index(len(points) - 1) < keep


class _ParetoBracket(_Bracket):
    def on_result(self, trial, cur_iter: int, cur_rew) -> str:
        action = TrialScheduler.CONTINUE
        for milestone, recorded in self._rungs:
            if cur_iter < milestone or trial.trial_id in recorded:
                continue
            if recorded and not promoted(cur_rew, list(recorded.values()), self.rf):
                action = TrialScheduler.STOP
            recorded[trial.trial_id] = cur_rew
            break
        return action


class ParetoASHA(AsyncHyperBandScheduler):
    """ASHA whose rung decisions are Pareto ranks on (``metric``, ``COST_KEY``)."""

    def __init__(self, *, metric: str, mode: str, max_t: int, grace_period: int, reduction_factor: float,
                 time_attr: str = "training_iteration"):
        super().__init__(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor, brackets=1)
        self._brackets = [_ParetoBracket(grace_period, max_t, reduction_factor, 0)]

    def _point(self, result) -> Point:
        cost = result.get(COST_KEY)
        cost = math.inf if cost is None or not math.isfinite(float(cost)) else float(cost)
        return self._metric_op * float(result[self._metric]), cost

    def on_trial_result(self, tune_controller, trial, result) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t and self._stop_last_trials:
            action = TrialScheduler.STOP
        else:
            action = self._trial_info[trial.trial_id].on_result(trial, result[self._time_attr], self._point(result))
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        if self._time_attr in result and self._metric in result:
            self._trial_info[trial.trial_id].on_result(trial, result[self._time_attr], self._point(result))
        self._trial_info.pop(trial.trial_id, None)
