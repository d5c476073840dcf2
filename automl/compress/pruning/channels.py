"""Channel-level helpers of the thinned structured path: masks that zero a whole output channel, the
slices of a layer's tensors that belong to each channel, and the parity check of a thinned model
against the masked one it replaces."""
from __future__ import annotations

import copy
from typing import Dict, Mapping

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from automl.compress.pruning.masks import MaskSet, _StraightThroughMask
from automl.compress.pruning.thinning import NORMS, PRUNABLE
from automl.modelstats import eval_mode


class ChannelMaskSet(MaskSet):
    """A MaskSet whose layers also lose the bias (conv/linear bias, BN beta) of every fully masked
    output channel, with the weight's mode rules, so a masked channel outputs exactly zero."""

    def __init__(self, layers, *, mode: str = "hard"):
        super().__init__(layers, mode=mode)
        self.biases = {n: m for n, m in layers.items() if isinstance(getattr(m, "bias", None), torch.Tensor)}
        if mode == "dual":
            for m in self.biases.values():
                parametrize.register_parametrization(m, "bias", _StraightThroughMask(torch.ones_like(
                    m.bias, dtype=torch.bool)))
        self._apply_biases()

    @torch.no_grad()
    def _apply_biases(self):
        for name, m in self.biases.items():
            mask = self.layers[name].mask
            keep = mask.reshape(mask.shape[0], -1).any(1)
            if self.mode == "dual":
                m.parametrizations.bias[0].mask.copy_(keep)
            else:
                m.bias.mul_(keep.to(m.bias.device))

    def apply(self):
        super().apply()
        self._apply_biases()

    def update(self, new_masks):
        super().update(new_masks)
        self._apply_biases()

    def _remove_all(self, make_permanent: bool):
        for m in getattr(self, "biases", {}).values():
            if self.mode == "dual":
                parametrize.remove_parametrizations(m, "bias", leave_parametrized=make_permanent)
        if make_permanent and self.mode != "dual" and hasattr(self, "biases"):
            self._apply_biases()
        super()._remove_all(make_permanent)


def _param(module: nn.Module, name: str):
    """The trainable tensor behind ``module.<name>`` (the dense copy when it is parametrized)."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name, None)


def _slices(module, side: str, idxs, t: torch.Tensor) -> torch.Tensor:
    """(len(idxs), features) rows of ``t`` (weight, grad or bias) belonging to each channel."""
    idx = torch.tensor(idxs, dtype=torch.long)
    if side == "out" or t.dim() == 1:
        return t.index_select(0, idx).reshape(len(idxs), -1)
    groups = getattr(module, "groups", 1)
    if groups > 1 and module.groups != module.out_channels:  # grouped conv: columns of own group's filters
        per, out_per = module.in_channels // groups, module.out_channels // groups
        return torch.stack([t[(i // per) * out_per:(i // per + 1) * out_per, i % per].flatten() for i in idxs])
    return t.index_select(1, idx).transpose(0, 1).reshape(len(idxs), -1)


def _norm_after(model: nn.Module, name: str):
    """The norm registered right after layer ``name`` in the same parent, or None."""
    parent_name, _, child = name.rpartition(".")
    siblings = list((model.get_submodule(parent_name) if parent_name else model).named_children())
    index = [n for n, _ in siblings].index(child)
    follower = siblings[index + 1][1] if index + 1 < len(siblings) else None
    return follower if isinstance(follower, NORMS) else None


def zero_channels(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy with every producer's masked output channels zeroed (weight rows, bias, BN gamma
    and beta), as ChannelMaskSet does while training: what the thinned model must compute."""
    masked = copy.deepcopy(model)
    layers = dict(masked.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            m = layers[name]
            m.weight.mul_(mask.to(m.weight.dtype))
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.mul_(mask.reshape(mask.shape[0], -1).any(1).to(m.bias.dtype))
    return masked


def parity(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest |a(x) - b(x)| relative to max(1, |a(x)|), both in eval mode (modes restored)."""
    with eval_mode(a), eval_mode(b), torch.no_grad():
        ya, yb = a(x), b(x)
    if ya.shape != yb.shape:
        return float("inf")
    return float((ya - yb).abs().max() / max(1.0, float(ya.abs().max())))


def channel_keep(masks: Dict[str, torch.Tensor], layers: Mapping[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """{conv/linear name: output channels kept} from weight-shaped producer masks."""
    return {n: k.reshape(k.shape[0], -1).any(1) for n, k in masks.items() if isinstance(layers.get(n), PRUNABLE)}


class MacModel:
    """MACs of the model thinned with a {unit: keep} decision, exact (conv/linear MACs scale with
    the kept share of their output and, except depthwise convs, input channels) and fast: the
    channels each layer loses are one matrix-vector product per unit (the bisection and
    ``allocation.top_up`` evaluate it hundreds of times)."""

    def __init__(self, groups: Mapping[str, object], layer_macs: Mapping[str, int], layers: Mapping[str, nn.Module]):
        names = {id(m): n for n, m in layers.items()}
        order = [n for n in layer_macs if n in layers]
        slot = {n: i for i, n in enumerate(order)}
        sizes = [(layers[n].out_features, layers[n].in_features) if isinstance(layers[n], nn.Linear)
                 else (layers[n].out_channels, layers[n].in_channels) for n in order]
        self.macs = torch.tensor([float(layer_macs[n]) for n in order], dtype=torch.float64)
        self.n_out = torch.tensor([s[0] for s in sizes], dtype=torch.float64)
        self.n_in = torch.tensor([s[1] for s in sizes], dtype=torch.float64)
        self.depthwise = torch.tensor([getattr(layers[n], "groups", 1) == s[0] > 1 for n, s in zip(order, sizes)])
        self.units = {}
        for u, group in groups.items():
            rows, counts = [], []
            for m, side, _, classes in group.members:
                n = names.get(id(m))
                if n not in slot:
                    continue
                row = torch.zeros(group.channels, dtype=torch.float64)
                row.index_add_(0, torch.tensor(classes, dtype=torch.long),
                               torch.ones(len(classes), dtype=torch.float64))
                rows.append(2 * slot[n] + (side == "in"))
                counts.append(row)
            if rows:
                self.units[u] = (torch.stack(counts), torch.tensor(rows, dtype=torch.long))

    def __call__(self, keep: Mapping[str, torch.Tensor]) -> int:
        removed = torch.zeros(2 * len(self.macs), dtype=torch.float64)
        for u, (counts, rows) in self.units.items():
            removed.index_add_(0, rows, counts @ (~keep[u]).to(torch.float64))
        frac = (1 - removed[0::2] / self.n_out) * torch.where(self.depthwise, 1.0, 1 - removed[1::2] / self.n_in)
        return round(float((self.macs * frac).sum()))
