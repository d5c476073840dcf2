"""Pareto math over plain rows; pure functions, no Ray."""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence


def _finite(row: Mapping, keys) -> bool:
    for k in keys:
        v = row.get(k)
        if v is None or isinstance(v, bool):
            return False
        try:
            if not math.isfinite(float(v)):
                return False
        except (TypeError, ValueError):
            return False
    return True


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a dominates b: no worse in every objective and better in one (values already 'larger is better')."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(rows: Sequence[Mapping], objectives: Dict[str, str]) -> List[int]:
    """Indices of the non-dominated rows, in input order.

    Rows with a missing, NaN or infinite objective are dropped. Identical points do not dominate
    each other, so ties are all kept.
    """
    for mode in objectives.values():
        if mode not in ("max", "min"):
            raise ValueError(f"objective mode must be 'max' or 'min', got {mode!r}")
    keys = list(objectives)
    points = {i: [float(r[k]) if objectives[k] == "max" else -float(r[k]) for k in keys]
              for i, r in enumerate(rows) if _finite(r, keys)}
    return [i for i, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != i)]


def feasible(metrics: Mapping, constraints: Dict[str, Dict[str, float]]) -> bool:
    """True when every constrained metric is within its bounds (pure; used for the front too)."""
    for metric, bound in constraints.items():
        value = metrics.get(metric)
        if value is None or not math.isfinite(float(value)):
            return False
        if "max" in bound and value > bound["max"]:
            return False
        if "min" in bound and value < bound["min"]:
            return False
    return True
