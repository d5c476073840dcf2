"""Turn a SearchSpace into concrete configs: Optuna define-by-run (for Ray Tune) or random sampling."""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from automl.spaces.domains import Fixed
from automl.spaces.schema import SearchSpace


def resolve(space: SearchSpace, pick: Callable) -> Dict:
    """Walk parameters in order, skipping those whose conditions fail; ``pick(param)`` gives a value."""
    values: Dict = {}
    for p in space.params:
        if all(c.holds(values) for c in p.conditions):
            values[p.name] = pick(p)
    return values


class DefineByRun:
    """The define-by-run function OptunaSearch calls; returns the fixed values (Optuna keeps the rest).

    A class rather than a closure so Ray Tune can pickle the searcher state for resume.
    """

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> Dict:
        values = resolve(self.space, lambda p: p.domain.suggest(trial, p.name))
        return {p.name: values[p.name] for p in self.space.params
                if isinstance(p.domain, Fixed) and p.name in values}


def define_by_run(space: SearchSpace) -> DefineByRun:
    return DefineByRun(space)


def sample_config(space: SearchSpace, seed: int = 0) -> Dict:
    """A random flat config (uniform per domain), for tests and profile validation."""
    rng = np.random.default_rng(seed)
    return resolve(space, lambda p: p.domain.sample(rng))
