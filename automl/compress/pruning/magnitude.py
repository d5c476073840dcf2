"""Target-sparsity pruning by magnitude (per layer or one global threshold), AGP, which is the same
ranking on Zhu & Gupta's gradual schedule, and OBD, which ranks by second-order saliency instead."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from automl.compress.base import register_method
from automl.compress.pruning.base import PruningConfig, PruningMethod
from automl.compress.pruning.channels import _param
from automl.compress.pruning.fisher import diagonal_fisher, obd_saliency
from automl.configs import option


def magnitude_masks(weights: Dict[str, torch.Tensor], ratio: float, scope: str = "global"
                    ) -> Dict[str, torch.Tensor]:
    """Boolean keep-masks that drop the ``ratio`` share of smallest magnitudes.

    ``global`` ranks all weights together (one threshold); ``layer`` prunes each tensor by ``ratio``.
    Ties at the threshold are broken by position so exactly round(ratio * n) weights go.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if scope == "layer":
        return {n: magnitude_masks({n: w}, ratio, "global")[n] for n, w in weights.items()}
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    n_drop = int(round(ratio * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_drop:  # what a stable argsort would drop, in linear time: all below the threshold, then ties in order
        threshold = torch.kthvalue(flat, n_drop).values
        keep = flat >= threshold
        ties = torch.nonzero(flat == threshold).flatten()
        keep[ties[:n_drop - int((~keep).sum())]] = False
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset:offset + w.numel()].view_as(w)
        offset += w.numel()
    return masks


@dataclass(frozen=True)
class MagnitudePruningConfig(PruningConfig):
    ratio: float = option(0.5, low=0.0, high=1.0, high_open=True, doc="share of weights set to zero")
    scope: str = option("global", choices=("global", "layer"), doc="one threshold or one per layer")


@register_method("magnitude", "pruning", MagnitudePruningConfig)
class MagnitudePruning(PruningMethod):
    """Smallest |w| first. Layers named in ``per_layer`` are pruned to their own ratio, the rest by ``scope``."""

    def _masks(self, weights, levels, model):
        own = set(self.overrides) | (set(weights) if self.config.scope == "layer" else set())
        masks = {n: magnitude_masks({n: weights[n]}, levels[n])[n] for n in own}
        shared = {n: w for n, w in weights.items() if n not in own}
        if shared:  # the layers without an override share one level and one threshold
            masks.update(magnitude_masks(shared, levels[next(iter(shared))], "global"))
        return masks


@dataclass(frozen=True)
class AGPConfig(MagnitudePruningConfig):
    schedule: str = option("agp", choices=("agp",), doc="automated gradual pruning (cubic ramp)")
    ramp_epochs: int = option(3, low=1, high=10_000, doc="epochs over which the sparsity ramps up")
    finetune_epochs: int = option(5, low=0, high=10_000, doc="epochs trained from the first pruning event on")


@register_method("agp", "pruning", AGPConfig)
class AGPPruning(MagnitudePruning):
    """Magnitude ranking on the cubic schedule s_t = s_f (1 - (1 - t/T)^3) (Zhu & Gupta 2017)."""


@dataclass(frozen=True)
class OBDPruningConfig(MagnitudePruningConfig):
    calib_batches: int = option(32, low=1, high=10_000, doc="training batches of 16 samples for the Fisher estimate")


@register_method("obd", "pruning", OBDPruningConfig)
class OBDPruning(MagnitudePruning):
    """Optimal Brain Damage (LeCun et al. 1990): smallest 0.5 * F_ii * w_i^2 first, the diagonal Hessian
    taken as the empirical Fisher on training batches (fisher.py). Ranked as magnitude ranks |w|."""

    def _masks(self, weights, levels, model):
        params = {n: _param(self.layers[n], "weight") for n in weights}
        fisher = diagonal_fisher(model, getattr(self.ctx, "task", None), params, batches=self.config.calib_batches,
                                 seed=self.ctx.seed)
        return super()._masks({n: obd_saliency(w, fisher[n]) for n, w in weights.items()}, levels, model)
