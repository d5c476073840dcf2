"""An accuracy predictor for a supernet search (as APQ fits one on sub-networks scored with inherited
weights): gradient-boosted trees over the candidate's searched parameters, fitted on the candidates the
search has measured, predicting what measuring costs (validation accuracy on inherited weights, and the
shipped size, which depends on the weights the stages keep). Latency and energy are never predicted here:
the profile prices every candidate exactly as it prices a measured one.

Features: a numeric parameter is its value (its log on a log domain), a choice one indicator per value;
a parameter its ``when`` left out takes a value below every real one (MISSING), which a tree splits off."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

from automl.spaces.domains import Choice, Fixed, FloatRange, IntRange

TARGETS = ("accuracy", "size_kb")
MISSING = -1e9
HOLDOUT = 0.2  # share of the measured candidates kept out of the fit that reports the predictor's quality


class CandidatePredictor:
    """Fitted on measured candidates' configs and metrics; predicts ``TARGETS`` for a new config."""

    def __init__(self, space, seed: int = 0):
        self.seed = seed
        self.columns: List[tuple] = []  # (param name, None for a number or the choice value, log)
        for p in space.params:
            if isinstance(p.domain, Choice):
                self.columns += [(p.name, repr(v), False) for v in p.domain.values]
            elif isinstance(p.domain, (IntRange, FloatRange)):
                self.columns.append((p.name, None, bool(p.domain.log)))
            elif not isinstance(p.domain, Fixed):
                raise TypeError(f"unknown domain {p.domain!r}")
        self.models: Dict[str, object] = {}
        self.quality: Dict[str, Dict[str, float]] = {}

    def encode(self, configs: Sequence[Dict]) -> np.ndarray:
        out = np.full((len(configs), len(self.columns)), MISSING)
        for i, config in enumerate(configs):
            for j, (name, value, log) in enumerate(self.columns):
                if name not in config:
                    continue
                if value is not None:
                    out[i, j] = float(repr(config[name]) == value)
                else:
                    v = float(config[name])
                    out[i, j] = math.log(v) if log and v > 0 else v
        return out

    def fit(self, configs: Sequence[Dict], metrics: Sequence[Dict]) -> Dict[str, Dict[str, float]]:
        """Fit one model per target; ``quality`` (and the return value) holds, per target, the Kendall tau
        and mean absolute error on a held-out share of the candidates, from a fit without them."""
        x = self.encode(configs)
        order = np.random.default_rng(self.seed).permutation(len(configs))
        cut = max(1, int(len(configs) * HOLDOUT))
        test, train = order[:cut], order[cut:]
        for target in TARGETS:
            y = np.array([float(m.get(target, np.nan)) for m in metrics])
            known = ~np.isnan(y)
            if known.sum() < 5:
                continue
            held = [i for i in test if known[i]]
            fit = [i for i in train if known[i]]
            if len(held) >= 5 and len(fit) >= 5:
                guess = self._model().fit(x[fit], y[fit]).predict(x[held])
                self.quality[target] = {"kendall_tau": _kendall(guess, y[held]),
                                        "mae": float(np.mean(np.abs(guess - y[held]))), "held_out": len(held)}
            self.models[target] = self._model().fit(x[known], y[known])
        return self.quality

    def predict(self, configs: Sequence[Dict]) -> List[Dict[str, float]]:
        x = self.encode(configs)
        columns = {t: m.predict(x) for t, m in self.models.items()}
        return [{t: float(v[i]) for t, v in columns.items()} for i in range(len(configs))]

    def _model(self):
        from sklearn.ensemble import GradientBoostingRegressor

        # few hundred samples: shallow trees, small leaves; its predict runs all trees in one compiled call
        # (a fraction of a millisecond per candidate)
        return GradientBoostingRegressor(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8,
                                         min_samples_leaf=3, random_state=self.seed)


def _kendall(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return float(tau) if np.isfinite(tau) else 0.0


__all__ = ["CandidatePredictor", "TARGETS"]
