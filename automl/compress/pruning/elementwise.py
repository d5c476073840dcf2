"""Element-wise pruners besides target sparsity (magnitude.py): an absolute threshold, a threshold of
s standard deviations per layer (Han et al. 2015), and activation statistics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn as nn

from automl.compress.base import register_method
from automl.compress.layers import BATCHNORMS
from automl.compress.pruning.base import PruningConfig, PruningMethod
from automl.compress.pruning.criteria import ActivationStats
from automl.compress.pruning.magnitude import magnitude_masks
from automl.configs import option
from automl.errors import ConfigError
from automl.modelstats import eval_mode

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish)


def threshold_masks(weights: Dict[str, torch.Tensor], thresholds: Dict[str, float]) -> Dict[str, torch.Tensor]:
    """Keep |w| >= t (per layer)."""
    return {n: w.detach().abs() >= thresholds[n] for n, w in weights.items()}


@dataclass(frozen=True)
class ThresholdPruningConfig(PruningConfig):
    threshold: float = option(1e-2, low=0.0, doc="weights with |w| below this are pruned")


@register_method("threshold", "pruning", ThresholdPruningConfig)
class ThresholdPruning(PruningMethod):
    level_kind, level_field = "scale", "threshold"

    def _masks(self, weights, levels, model):
        return threshold_masks(weights, levels)


@dataclass(frozen=True)
class SensitivityPruningConfig(PruningConfig):
    sensitivity: float = option(1.0, low=0.0, high=10.0,
                                doc="prune |w| < sensitivity x std of the layer's weights")


@register_method("sensitivity", "pruning", SensitivityPruningConfig)
class SensitivityPruning(PruningMethod):
    """Threshold = s x std(w) per layer. The std is taken once, at the first event, so the
    threshold does not shrink as zeros accumulate (as in Distiller's SensitivityPruner)."""

    level_kind, level_field = "scale", "sensitivity"

    def _masks(self, weights, levels, model):
        if not hasattr(self, "stds"):
            self.stds = {n: float(w.detach().float().std()) for n, w in weights.items()}
        return threshold_masks(weights, {n: levels[n] * self.stds[n] for n in weights})


def activation_site(model: nn.Module, layer_name: str) -> nn.Module:
    """The module whose output best shows how often ``layer_name``'s units fire: the last of the
    BatchNorm/activation modules registered right after it in the same parent, else the layer."""
    parent_name, _, child = layer_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    siblings = list(parent.named_children())
    index = [n for n, _ in siblings].index(child)
    site = siblings[index][1]
    for _, module in siblings[index + 1:]:
        if not isinstance(module, BATCHNORMS + ACTIVATIONS):
            break
        site = module
    return site


@torch.no_grad()
def unit_activity(model: nn.Module, layers: Dict[str, nn.Module], batches) -> Dict[str, torch.Tensor]:
    """Share of inputs for which each output unit (channel) of each layer is active (> 0 after the
    following BN/activation), measured in eval mode so BN statistics do not move."""
    stats = {n: ActivationStats() for n in layers}
    handles = [stats[n].attach(activation_site(model, n), relu=True) for n in layers]
    try:
        with eval_mode(model):
            for x, _ in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: 1.0 - s.apoz() for n, s in stats.items()}


@dataclass(frozen=True)
class ActivationPruningConfig(PruningConfig):
    ratio: float = option(0.5, low=0.0, high=1.0, high_open=True, doc="share of weights set to zero per layer")
    calib_batches: int = option(8, low=1, high=10_000, doc="training batches used to measure unit activity")


@register_method("activation", "pruning", ActivationPruningConfig)
class ActivationPruning(PruningMethod):
    """Score = |w| x activity of the unit the weight feeds: weights into rarely active units go first."""

    def _masks(self, weights, levels, model):
        task = getattr(self.ctx, "task", None)
        if task is None:
            raise ConfigError("activation pruning needs training data to measure unit activity",
                              key="method", value="activation", fix="run it through a task (automl apply/search)")
        loader = task.train_loader(batch_size=128, seed=self.ctx.seed)
        batches = [b for _, b in zip(range(self.config.calib_batches), loader)]
        activity = unit_activity(model, self.layers, batches)
        masks = {}
        for n, w in weights.items():
            rate = activity[n].to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
            masks[n] = magnitude_masks({n: w.detach().abs() * rate}, levels[n])[n]
        return masks
