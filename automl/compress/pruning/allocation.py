"""How much to prune where: per-unit keep decisions for structured pruning, and a bisection on the
level that hits a MAC-reduction target.

A *unit* is what is decided as one: a structure group (``thinning.coupled_groups``) or a layer. Units
are named by strings; scores are 1-D tensors, one per structure (higher = keep).

  uniform  every unit loses the share ``level`` of its structures.
  global   each unit's scores are divided by their mean, then all structures are ranked together and
           the lowest ``level`` share of all of them goes (every unit keeps at least one).
  energy   ratio_i = k * share_i / sensitivity_i with share_i = cost_i / sum(cost), capped at
           ``max_ratio``; k makes sum(ratio_i * cost_i) = level * sum(cost). To first order this removes
           the cost uniform pruning at ``level`` removes, taken where it is expensive and cheap in
           accuracy. ``costs`` are MACs today; a hardware profile's latency or energy per unit fits as is.
  sampled  random per-unit multipliers on the level, the one whose pruned model loses least on
           calibration batches kept (sampled.py; structured pruning with a MAC target only).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from automl.compress.pruning.criteria import rank_to_keep
from automl.errors import ConfigError
from automl.modelstats import count_macs, layer_macs  # noqa: F401  (layer_macs re-exported)
from automl.registry import unknown_name

ALLOCATIONS = ("uniform", "global", "energy", "sampled")  # sampled: picked in sampled.py, uniform here
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _check_level(level: float, key: str = "ratio", high: float = 1.0, closed: bool = False) -> float:
    ok = isinstance(level, (int, float)) and not isinstance(level, bool) and (
        0.0 <= level <= high if closed else 0.0 <= level < high)
    if not ok:
        raise ConfigError(f"a pruning level must be in [0, {high:g}{']' if closed else ')'}", key=key,
                          value=level, fix="use a share such as 0.5")
    return float(level)


def uniform_ratios(units: Sequence[str], level: float) -> Dict[str, float]:
    """The same ratio for every unit."""
    level = _check_level(level)
    return {u: level for u in units}


def global_keep(scores: Mapping[str, torch.Tensor], level: float) -> Dict[str, torch.Tensor]:
    """Keep-masks from one ranking of all structures after dividing each unit's scores by their mean.

    -inf scores (structures that must go first, e.g. already pruned in hard mode) stay -inf and do
    not count in the mean. Every unit keeps its best structure."""
    level = _check_level(level)
    normed = []
    for s in scores.values():
        s = s.detach().float().clone()
        if torch.isnan(s).any():
            raise ConfigError("scores contain NaN", value=int(torch.isnan(s).sum()),
                              fix="check the model for NaN weights, gradients or activations")
        finite = s[torch.isfinite(s)]
        mean = float(finite.abs().mean()) if finite.numel() else 0.0
        normed.append(s / mean if mean > 0 else s)
    flat = torch.cat(normed)
    # each unit's best structure is not a candidate, so no unit disappears
    starts = torch.tensor([0] + [s.numel() for s in normed[:-1]]).cumsum(0)
    best = torch.stack([torch.argmax(s) for s in normed]) + starts
    candidates = torch.ones(flat.numel(), dtype=torch.bool)
    candidates[best] = False
    n_drop = min(int(round(level * flat.numel())), int(candidates.sum()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if n_drop:
        order = torch.argsort(flat.masked_fill(~candidates, float("inf")), stable=True)
        keep[order[:n_drop]] = False
    out, offset = {}, 0
    for name, s in zip(scores, normed):
        out[name] = keep[offset:offset + s.numel()].clone()
        offset += s.numel()
    return out


def energy_ratios(costs: Mapping[str, float], level: float, sensitivity: Optional[Mapping[str, float]] = None,
                  *, max_ratio: float = 0.9) -> Dict[str, float]:
    """Per-unit ratios proportional to cost share / sensitivity, scaled so that the cost removed
    (sum ratio_i * cost_i) is ``level`` of the total; units over ``max_ratio`` are capped and the rest
    rescaled (water-filling). Units missing from ``sensitivity`` get the mean of the given values."""
    level = _check_level(level, high=max_ratio, closed=True)
    costs = {u: float(c) for u, c in costs.items()}
    bad = {u: c for u, c in costs.items() if not c >= 0}
    if bad or not costs or sum(costs.values()) <= 0:
        raise ConfigError("energy allocation needs non-negative unit costs with a positive total",
                          key="costs", value=bad or costs, fix="give each unit its MACs, latency or energy")
    sens = dict(sensitivity or {})
    unknown = [u for u in sens if u not in costs]
    if unknown:
        raise unknown_name("unit in sensitivity", unknown[0], costs, key="sensitivity")
    if any(not v >= 0 for v in sens.values()):
        raise ConfigError("sensitivities must be non-negative", key="sensitivity", value=sens,
                          fix="give e.g. the accuracy drop of each unit at a probe level")
    default = sum(sens.values()) / len(sens) if sens else 1.0
    sens = {u: sens.get(u, default) for u in costs}
    floor = 1e-3 * max(sens.values()) if max(sens.values()) > 0 else 1.0
    total = sum(costs.values())
    weight = {u: (c / total) / max(sens[u], floor) for u, c in costs.items()}
    ratios, capped = {}, set()
    while True:
        free = [u for u in costs if u not in capped]
        budget = level * total - sum(max_ratio * costs[u] for u in capped)
        denom = sum(weight[u] * costs[u] for u in free)
        k = budget / denom if denom > 0 else 0.0
        ratios = {u: (max_ratio if u in capped else k * weight[u]) for u in costs}
        over = [u for u in free if ratios[u] > max_ratio]
        if not over:
            return ratios
        capped.update(over)


def rounded_count(kept: int, total: int, round_to: int, cap: Optional[int] = None) -> int:
    """``kept`` moved to the nearest multiple of ``round_to`` in [round_to, total] (or to ``total``
    itself; ties go up), then capped at ``cap`` (already-removed structures cannot come back)."""
    if round_to <= 1:
        return min(kept, total if cap is None else cap)
    options = [m for m in range(round_to, total + 1, round_to)] + [total]
    best = min(options, key=lambda m: (abs(m - kept), -m))
    return min(best, total if cap is None else cap)


def round_keep(scores: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor], round_to: int
               ) -> Dict[str, torch.Tensor]:
    """Each unit keeps its best ``rounded_count`` structures. CPU kernels work on blocks of channels
    (8 with AVX2, 16 with AVX-512 in onnxruntime), so other counts can run slower than the dense
    model: here 23/45/45 channels ran 2x slower than 32/64/64, 16/48/48 1.85x faster."""
    out = {}
    for u, k in keep.items():
        s = scores[u].detach().float()
        n = rounded_count(int(k.sum()), s.numel(), round_to, cap=int(torch.isfinite(s).sum()) or 1)
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[torch.argsort(s, descending=True, stable=True)[:n]] = True
        out[u] = mask if n != int(k.sum()) else k
    return out


def _blocks(grid, n: int):
    step, blocks = grid
    return step, [list(b) for b in blocks] if blocks else [list(range(n))]


def grid_keep(scores: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor], grids: Mapping[str, tuple]
              ) -> Dict[str, torch.Tensor]:
    """Each unit with a grid (step, blocks) keeps its best structures in every block (``blocks``:
    index tuples partitioning the unit, e.g. the groups of a grouped conv; () = one block), the same
    number in each: the unit's kept count shared out, then moved to the step grid as in
    ``rounded_count`` (never below one step, never above what is still alive in any block)."""
    out = {}
    for u, k in keep.items():
        if u not in grids:
            out[u] = k
            continue
        s = scores[u].detach().float()
        step, blocks = _blocks(grids[u], s.numel())
        size = len(blocks[0])
        alive = min(int(torch.isfinite(s[b]).sum()) for b in blocks) or 1
        n = rounded_count(max(int(round(int(k.sum()) / len(blocks))), 1), size, step, cap=alive)
        if len(blocks) == 1 and n == int(k.sum()):
            out[u] = k
            continue
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        for b in blocks:
            idx = torch.tensor(b, dtype=torch.long)
            mask[idx[torch.argsort(s[idx], descending=True, stable=True)[:n]]] = True
        out[u] = mask
    return out


def top_up(scores: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor], grids: Mapping[str, tuple],
           macs_of: Callable[[Dict[str, torch.Tensor]], float], target_macs: float, *, max_ratio: float = 0.9,
           tol: float = 0.02) -> Dict[str, torch.Tensor]:
    """Remove one more grid step (``step`` structures in every block of one unit) at a time until
    ``macs_of(keep) <= target_macs``: each time from the unit whose step costs least, in its scores
    (divided by the unit's mean, as ``global_keep`` does) per MAC saved; a step that lands within
    ``tol`` below the target MACs is taken first, one that overshoots more only when no other is
    left (the smallest). No unit goes below
    ``1 - max_ratio`` of its structures. Uniform levels move every unit at once, so the MACs they
    reach jump (one channel of every 12-channel DenseNet group is 8%); this closes the gap."""
    keep = {u: k.clone() for u, k in keep.items()}
    norm = {}
    for u, s in scores.items():
        finite = s.detach().float()[torch.isfinite(s)]
        norm[u] = float(finite.abs().mean()) if finite.numel() and float(finite.abs().mean()) > 0 else 1.0
    current = macs_of(keep)
    while current > target_macs:
        best = None
        for u, k in keep.items():
            s = scores[u].detach().float()
            step, blocks = _blocks(grids.get(u, (1, ())), k.numel())
            kept = int(k[blocks[0]].sum())
            if kept - step < max(step, (1 - max_ratio) * len(blocks[0])):
                continue
            cand, cost = k.clone(), 0.0
            for b in blocks:
                idx = torch.tensor(b, dtype=torch.long)[k[b]]
                drop = idx[torch.argsort(s[idx], stable=True)[:step]]
                cand[drop] = False
                cost += float(s[drop].clamp(min=0).sum()) / norm[u]
            saved = current - macs_of({**keep, u: cand})
            if saved <= 0:
                continue
            after = current - saved  # first a step that lands in [target (1 - tol), target], then any
            rank = ((0 if after >= target_macs * (1 - tol) else 2, saved) if after <= target_macs  # short one,
                    else (1, cost / saved))  # the cheapest per MAC; overshooting: the smallest step
            if best is None or rank < best[0]:
                best = (rank, u, cand, current - saved)
        if best is None:
            break
        _, u, keep[u], current = best
    return keep


def keep_for_mac_target(keep_at: Callable[[float], Dict[str, torch.Tensor]], macs_of: Callable, base_macs: float,
                        target: float, scores, grids, *, tol: float = 0.02, high: float = 0.9, max_iter: int = 30,
                        check_only: bool = False) -> Tuple[Dict[str, torch.Tensor], float, float]:
    """(keep, level, factor) for dense MACs / kept MACs = ``target``: bisection on the shared level;
    when no level lands within ``tol``, the last level below the target plus ``top_up``, so the
    result reaches the target (overshooting by at most one unit's grid step) instead of stopping
    short of it. Raises ConfigError with the reachable factor (at level ``high``) when it is below;
    ``check_only``: only that check, returning (the keep at ``high``, ``high``, its factor)."""
    deepest = keep_at(high)
    top = base_macs / max(macs_of(deepest), 1e-12)
    if top < target * (1 - tol):
        raise ConfigError(f"the MAC target is out of reach: pruning at level {high:g} reduces MACs only "
                          f"{top:.2f}x", key="mac_reduction", value=target,
                          fix=f"ask for at most {top:.2f}, or select more layers")
    if check_only:
        return deepest, high, top
    lo, hi = 0.0, high
    for _ in range(max_iter):
        mid = (lo + hi) / 2
        keep = keep_at(mid)
        factor = base_macs / max(macs_of(keep), 1e-12)
        if abs(factor / target - 1) <= tol:
            return keep, mid, factor
        lo, hi = (mid, hi) if factor < target else (lo, mid)
    keep = top_up(scores, keep_at(lo), grids, macs_of, base_macs / target, max_ratio=high, tol=tol)
    return keep, lo, base_macs / max(macs_of(keep), 1e-12)


def allocate(scores: Mapping[str, torch.Tensor], level: float, allocation: str = "uniform", *,
             costs: Optional[Mapping[str, float]] = None, sensitivity: Optional[Mapping[str, float]] = None,
             fixed: Optional[Mapping[str, float]] = None, max_ratio: float = 0.9, round_to: int = 1,
             grids: Optional[Mapping[str, tuple]] = None) -> Dict[str, torch.Tensor]:
    """Keep-masks for every unit: those in ``fixed`` at their own ratio, the rest by ``allocation``;
    with ``grids`` ({unit: (step, blocks)}) every unit's kept count then goes on its grid
    (``grid_keep``), else with ``round_to`` > 1 it is rounded (``round_keep``)."""
    if grids:
        keep = allocate(scores, level, allocation, costs=costs, sensitivity=sensitivity, fixed=fixed,
                        max_ratio=max_ratio)
        return grid_keep(scores, keep, grids)
    if round_to > 1:
        keep = allocate(scores, level, allocation, costs=costs, sensitivity=sensitivity, fixed=fixed,
                        max_ratio=max_ratio)
        return round_keep(scores, keep, round_to)
    if allocation not in ALLOCATIONS:
        raise unknown_name("allocation", allocation, ALLOCATIONS, key="allocation")
    fixed = dict(fixed or {})
    keep = {u: rank_to_keep(scores[u], r) for u, r in fixed.items()}
    shared = {u: s for u, s in scores.items() if u not in fixed}
    if not shared:
        return keep
    if allocation == "global":
        keep.update(global_keep(shared, level))
        return keep
    if allocation == "energy":
        if costs is None or any(u not in costs for u in shared):
            missing = [u for u in shared if costs is None or u not in costs]
            raise ConfigError("energy allocation needs a cost for every unit", key="costs", value=missing[:5],
                              fix="pass costs={unit: MACs or latency}")
        ratios = energy_ratios({u: costs[u] for u in shared}, level, sensitivity, max_ratio=max_ratio)
    else:
        ratios = uniform_ratios(list(shared), level)
    keep.update({u: rank_to_keep(shared[u], ratios[u]) for u in shared})
    return keep


def ratio_for_mac_target(model: nn.Module, example: torch.Tensor, target_factor: float,
                         prune_fn: Callable[[float], object], *, tol: float = 0.02, low: float = 0.0,
                         high: float = 0.9, max_iter: int = 40, base_macs: Optional[int] = None
                         ) -> Tuple[float, float]:
    """(level, achieved factor): bisection on ``level`` so that dense MACs / pruned MACs is within
    ``tol`` (relative) of ``target_factor`` (2.0 = half the MACs).

    ``prune_fn(level)`` returns the pruned model (its MACs are counted on ``example``) or directly its
    MAC count. Pruning removes whole structures, so the factor moves in steps; when no level lands
    within ``tol`` the closest one found is returned."""
    if isinstance(target_factor, bool) or not isinstance(target_factor, (int, float)) or not target_factor > 1:
        raise ConfigError("a MAC reduction target must be a factor above 1", key="mac_reduction",
                          value=target_factor, fix="use e.g. 2.0 for half the MACs")
    base = count_macs(model, example) if base_macs is None else int(base_macs)

    def factor(level: float) -> float:
        pruned = prune_fn(level)
        macs = pruned if isinstance(pruned, (int, float)) else count_macs(pruned, example)
        return base / max(float(macs), 1e-12)

    best = (low, factor(low))
    top = factor(high)
    if top < target_factor * (1 - tol):
        raise ConfigError(f"the MAC target is out of reach: pruning at level {high:g} reduces MACs only "
                          f"{top:.2f}x", key="mac_reduction", value=target_factor,
                          fix=f"ask for at most {top:.2f}, or select more layers")
    lo, hi = low, high
    for _ in range(max_iter):
        mid = (lo + hi) / 2
        f = factor(mid)
        if abs(f / target_factor - 1) < abs(best[1] / target_factor - 1):
            best = (mid, f)
        if abs(f / target_factor - 1) <= tol:
            break
        lo, hi = (mid, hi) if f < target_factor else (lo, mid)
    return best
