"""Magnitude pruning: zero the smallest-|w| weights once (one-shot), keep them zero while fine-tuning."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from automl.compress.base import Method, register_method
from automl.compress.layers import select_layers
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
    if n_drop:
        keep[torch.argsort(flat, stable=True)[:n_drop]] = False
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset:offset + w.numel()].view_as(w)
        offset += w.numel()
    return masks


@dataclass(frozen=True)
class MagnitudePruningConfig:
    ratio: float = option(0.5, low=0.0, high=1.0, high_open=True, doc="share of weights set to zero")
    finetune_epochs: int = option(2, low=0, high=10_000, doc="epochs trained after pruning")
    scope: str = option("global", choices=("global", "layer"), doc="one threshold or one per layer")
    layers: Tuple[str, ...] = option(("re:.*",), doc="layer names or 're:' patterns (Conv/Linear)")


@register_method("magnitude", "pruning", MagnitudePruningConfig)
class MagnitudePruning(Method):
    """One-shot at ``start_epoch`` (or at finalize when no epoch is left), hard masks afterwards."""

    def _prepare(self, model, ctx):
        self.layers = select_layers(model, self.config.layers)
        self.masks = None

    def _prune(self, model):
        weights = {n: m.weight for n, m in self.layers.items()}
        self.masks = magnitude_masks(weights, self.config.ratio, self.config.scope)
        self._apply()

    def _apply(self):
        with torch.no_grad():
            for name, module in self.layers.items():
                module.weight.mul_(self.masks[name])

    def _on_epoch_start(self, model, epoch, ctx):
        if self.masks is None and epoch >= (self.start_epoch or 0):
            self._prune(model)

    def _after_step(self, model):
        if self.masks is not None:
            self._apply()

    def _finalize(self, model, ctx):
        if self.masks is None:
            self._prune(model)
        self._apply()
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        self.stats = {"pruned_layers": len(self.masks), "pruned_sparsity": 1.0 - kept / max(total, 1)}
        return model
