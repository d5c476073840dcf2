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


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Exact hypervolume of minimisation points (any dimension) below ``ref``, by slicing on the first
    coordinate; pass a front (a few dozen points), not every trial."""
    points = [p for p in points if all(v < r for v, r in zip(p, ref))]
    if not points:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in points)
    xs = sorted({p[0] for p in points})
    volume = 0.0
    for i, x in enumerate(xs):
        upper = xs[i + 1] if i + 1 < len(xs) else ref[0]
        slab = [p[1:] for p in points if p[0] <= x]
        volume += (upper - x) * hypervolume(slab, ref[1:])
    return volume


REFERENCE = 1.05  # per objective, after scaling to [0, 1]: the front's extreme points still count


def scaled_hypervolumes(metrics: Sequence[Mapping], objectives: Dict[str, str]) -> List[float]:
    """Hypervolume of the first 1, 2, ... rows (in the order given), every objective scaled to [0, 1] by
    the range over all rows (best = 0), reference point REFERENCE: 0 is nothing, REFERENCE**n the
    ideal point."""
    keys = list(objectives)
    rows = [m for m in metrics if _finite(m, keys)]
    if not rows:
        return []
    lows = {k: min(float(m[k]) for m in rows) for k in keys}
    span = {k: max(float(m[k]) for m in rows) - lows[k] or 1.0 for k in keys}
    points = [[_scaled(float(m[k]), lows[k], span[k], objectives[k]) for k in keys] for m in rows]
    out, front = [], []
    for p in points:
        if not any(all(a <= b for a, b in zip(q, p)) for q in front):
            front = [q for q in front if not all(a <= b for a, b in zip(p, q))] + [p]
        out.append(hypervolume(front, [REFERENCE] * len(keys)))
    return out


def _scaled(value: float, low: float, span: float, mode: str) -> float:
    return (low + span - value) / span if mode == "max" else (value - low) / span
