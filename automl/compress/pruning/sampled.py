"""``allocation: sampled`` -- how many channels each structure group loses, picked among random
allocations that all reach the same MAC target, by the loss each leaves on calibration batches.

EagleEye (Li et al., ECCV 2020): a pruned network's accuracy before fine-tuning predicts its accuracy
after it only once BatchNorm works from statistics of the pruned network, not the dense one's running
statistics. We score each candidate with BatchNorm in training mode (each batch normalised by its own
statistics, nothing updated) and dropout off: running statistics re-estimated on a few batches blow up
on channels that were constant there (a variance near 0 divides by sqrt(eps)), batch statistics do not.

A candidate is a multiplier per group on the shared level (uniform in [1 - spread, 1 + spread]);
candidate 0 is the uniform allocation (every multiplier 1), so the choice is never worse than uniform
on the calibration loss. The chosen multipliers are kept for the method's later events (schedules,
hard-mode re-ranking), so a ramp reaches the chosen allocation."""
from __future__ import annotations

import random
import time
from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.compress.pruning.allocation import allocate
from automl.compress.pruning.channels import zero_channels
from automl.errors import ConfigError

Keep = Dict[str, torch.Tensor]


def multiplier_keeper(scores: Mapping[str, torch.Tensor], multipliers: Optional[Mapping[str, float]],
                      fixed: Mapping[str, float], grids, *, max_ratio: float = 0.9) -> Callable[[float], Keep]:
    """keep_at(level): each unit pruned at level x its multiplier (capped), units in ``fixed`` at their
    own level, on their grids. No multipliers: the uniform allocation."""
    def keep_at(level: float) -> Keep:
        levels = {u: min(max_ratio, level * (multipliers or {}).get(u, 1.0)) for u in scores}
        levels.update(fixed)
        return allocate(scores, level, "uniform", fixed=levels, max_ratio=max_ratio, grids=grids)
    return keep_at


def random_multipliers(units: List[str], count: int, seed: int, spread: float) -> List[Dict[str, float]]:
    """``count`` candidates, the first uniform (all 1.0), the rest drawn from a private generator."""
    rng = random.Random(seed)
    return [{u: 1.0 for u in units}] + [{u: rng.uniform(1 - spread, 1 + spread) for u in units}
                                        for _ in range(count - 1)]


def batch_stat_loss(model: nn.Module, masks: Mapping[str, torch.Tensor], batches, loss_fn=F.cross_entropy) -> float:
    """Mean loss over ``batches`` of ``model`` with the masked channels zeroed (a copy), BatchNorm
    normalising by each batch's statistics (no running statistics updated) and dropout off."""
    pruned = zero_channels(model, masks)
    pruned.train()
    for m in pruned.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    with torch.no_grad():
        losses = [float(loss_fn(pruned(x), y)) for x, y in batches]
    return sum(losses) / max(len(losses), 1)


def pick_multipliers(candidates: List[Dict[str, float]], resolve: Callable[[Dict[str, float]], Optional[Keep]],
                     loss_of: Callable[[Keep], float]) -> Dict[str, object]:
    """The candidate whose keep (``resolve``: its keep at the MAC target, None when out of reach)
    leaves the lowest loss; with the uniform one's loss and the count scored, for the stats."""
    best, scored, uniform_loss = None, 0, None
    for i, mult in enumerate(candidates):
        keep = resolve(mult)
        if keep is None:
            continue
        loss = loss_of(keep)
        scored += 1
        if i == 0:
            uniform_loss = loss
        if loss == loss and (best is None or loss < best[1]):  # a NaN loss never wins
            best = (mult, loss)
    if best is None:
        return {"multipliers": candidates[0], "loss": float("nan"), "uniform_loss": uniform_loss, "scored": scored}
    return {"multipliers": best[0], "loss": best[1], "uniform_loss": uniform_loss, "scored": scored}


def sample_allocation(method, model: nn.Module, scores, fixed: Mapping[str, float], spread: float) -> Dict[str, object]:
    """For StructuredPruning ``method`` (its units, grids, calibration batches, MAC-target solver and
    producer masks): the candidate whose pruned ``model`` has the lowest batch-statistics loss, with
    the stats (``pick_multipliers``) and the seconds it took."""
    started = time.perf_counter()

    def resolve(multipliers):
        try:
            return method._keep_for_target(scores, multiplier_keeper(scores, multipliers, fixed, method.grids))[0]
        except ConfigError:  # this candidate cannot reach the target: not scored
            return None

    loss_fn = getattr(method.ctx.task, "loss", F.cross_entropy)
    batches = [(x, y) for x, y in method._calibration() if len(x) > 1]  # batch statistics need 2 samples
    candidates = random_multipliers(list(method.units), method.config.candidates, method.ctx.seed, spread)
    picked = pick_multipliers(candidates, resolve,
                              lambda keep: batch_stat_loss(model, method._producer_masks(keep), batches, loss_fn))
    return {**picked, "seconds": time.perf_counter() - started}
