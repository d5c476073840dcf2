"""``budget.strategy``: the joint search, and the two baselines it is measured against.

- joint: architecture, training and compression parameters sampled together (the space as written);
- random: the same space, sampled uniformly at random (Optuna's RandomSampler, seeded);
- sequential: what a user chaining separate tools does -- an architecture search first (every
  compression method fixed to ``none``, so trials score the uncompressed model) over half the trials,
  then a compression search over the other half on the best architectures of the first phase: those
  of its Pareto front, most accurate first, at most ``SEQUENTIAL_ARCHITECTURES``. A second-phase
  trial names the first-phase trial whose architecture and training settings it compresses in its
  ``sequential.architecture`` parameter (a column of trials.csv).

Phases are derived spaces; the run's journal tells which phase a finished trial belonged to, so a
resumed search continues in the phase it was stopped in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Sequence

from automl.compress import CATEGORIES
from automl.errors import AutoMLError
from automl.search.outputs import front_rows
from automl.spaces import SearchSpace
from automl.spaces.conditions import Condition
from automl.spaces.domains import Choice, Fixed
from automl.spaces.schema import Param

STRATEGIES = ("joint", "sequential", "random")
SEQUENTIAL_PARAM = "sequential.architecture"
SEQUENTIAL_ARCHITECTURES = 3


@dataclass(frozen=True)
class Phase:
    name: str
    space: SearchSpace  # what this phase samples
    trials: int         # its share of budget.trials
    finished: List[Dict]  # journaled trials of this phase


def phase_of(row: Dict) -> str:
    return "compression" if SEQUENTIAL_PARAM in row.get("config", {}) else "architecture"


def first_phase_trials(space: SearchSpace) -> int:
    return max(1, space.budget.trials // 2)


def architecture_space(space: SearchSpace) -> SearchSpace:
    """The space with every compression category's method fixed to ``none``: its trials train and
    deploy the uncompressed model (options conditional on a method are never sampled)."""
    methods = {f"{c}.method" for c in CATEGORIES}
    params = tuple(dataclasses.replace(p, domain=Fixed("none")) if p.name in methods else p for p in space.params)
    return dataclasses.replace(space, params=params)


def best_architectures(rows: Sequence[Dict], space: SearchSpace, limit: int = SEQUENTIAL_ARCHITECTURES) -> List[Dict]:
    """The first phase's Pareto front (feasible, completed trials), most accurate first."""
    front = sorted(front_rows(rows, space), key=lambda r: (-r["metrics"].get("accuracy", 0.0), r["trial_id"]))
    picked, seen = [], set()
    for row in front:
        key = tuple(sorted((k, str(v)) for k, v in row["config"].items() if _architectural(k)))
        if key not in seen:
            seen.add(key)
            picked.append(row)
    return picked[:limit]


def _architectural(name: str) -> bool:
    return name.startswith(("arch.", "train."))


def compression_space(space: SearchSpace, picked: Sequence[Dict]) -> SearchSpace:
    """The space with its architecture and training parameters tied to one of ``picked`` (sampled as
    ``sequential.architecture``, the picked trial's id); compression parameters stay free."""
    ids = tuple(r["trial_id"] for r in picked)
    params = [Param(SEQUENTIAL_PARAM, Choice(ids))]
    for p in space.params:
        if not _architectural(p.name):
            params.append(p)
            continue
        for row in picked:  # one fixed copy per picked trial; exactly one holds in a given config
            if p.name in row["config"]:
                params.append(Param(p.name, Fixed(row["config"][p.name]),
                                    (Condition(SEQUENTIAL_PARAM, "eq", row["trial_id"]),)))
    return dataclasses.replace(space, params=tuple(params))


def phases(space: SearchSpace, finished: Sequence[Dict]) -> List[Phase]:
    """The phases still to run (or to finish), given the journaled trials."""
    if space.budget.strategy != "sequential":
        return [Phase(space.budget.strategy, space, space.budget.trials, list(finished))]
    first = [r for r in finished if phase_of(r) == "architecture"]
    second = [r for r in finished if phase_of(r) == "compression"]
    n_first = first_phase_trials(space)
    out = []
    if len(first) < n_first:
        out.append(Phase("architecture", architecture_space(space), n_first, first))
    out.append(Phase("compression", None, space.budget.trials - n_first, second))  # built once phase 1 is done
    return out


def compression_phase(space: SearchSpace, phase: Phase, first_rows: Sequence[Dict]) -> Phase:
    picked = best_architectures(first_rows, architecture_space(space))
    if not picked:
        raise AutoMLError(f"budget.strategy sequential: none of the {len(first_rows)} architecture trials completed "
                          "within the constraints, so there is no architecture to compress. Fix: raise budget.trials, "
                          "loosen constraints, or look at trials.csv for why they failed")
    return dataclasses.replace(phase, space=compression_space(space, picked))
