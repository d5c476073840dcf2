"""Masks on the ``weight`` of named modules, in three modes.

  hard  pruned weights are zeroed and stay zero. ``after_step()`` re-zeroes them after every
        optimizer step (momentum / weight decay would revive them); ``update`` intersects the new
        mask with the old one, so nothing ever grows back.
  soft  the mask is only enforced at pruning events (``update``): the weights are zeroed then and
        train freely in between, so a pruned weight whose magnitude grows back can be kept at the
        next event (soft filter pruning, He et al. 2018). ``update`` replaces the mask.
  dual  a dense copy is kept beside the masked weight: ``module.weight`` is computed as
        mask * dense by a ``torch.nn.utils.parametrize`` parametrization whose gradient is
        straight-through, so the dense copy of pruned weights keeps training and ``update`` can
        splice them back (dynamic network surgery, Guo et al. 2016). The dense copy is the very
        Parameter object the module had, so an optimizer built before or after attaching works.

Handler protocol: ``MaskSet(layers, mode=...)`` -> ``update(masks)`` at each pruning event ->
``after_step()`` after every optimizer step -> ``remove()`` at the end.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from automl.errors import ConfigError, LifecycleError
from automl.registry import unknown_name

MODES = ("hard", "soft", "dual")


class _StraightThroughMask(nn.Module):
    """Parametrization: value mask * w, gradient passed to w unmasked (straight-through)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        masked = torch.where(self.mask, w, torch.zeros_like(w))
        # w + (masked - w).detach() has the value of ``masked`` (exactly: w - w = 0) and d/dw = 1.
        return w + (masked - w).detach()


class MaskedLayer:
    """One module's mask and the mode's rules for it."""

    def __init__(self, name: str, module: nn.Module, mode: str):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ConfigError("layer has no weight tensor to mask", key=name, value=type(module).__name__,
                              fix="select Conv/Linear layers (automl.compress.layers.select_layers)")
        if parametrize.is_parametrized(module, "weight"):
            raise ConfigError("layer weight is already parametrized (masked twice?)", key=name,
                              value=type(module).__name__, fix="remove() the previous MaskSet first")
        self.name, self.module, self.mode = name, module, mode
        mask = torch.ones_like(weight, dtype=torch.bool)
        if mode == "dual":
            parametrize.register_parametrization(module, "weight", _StraightThroughMask(mask))
        else:
            self._mask = mask

    @property
    def mask(self) -> torch.Tensor:
        if self.mode == "dual":
            return self.module.parametrizations.weight[0].mask
        return self._mask

    def dense(self) -> torch.Tensor:
        """The weights a criterion should rank: the dense copy in dual mode, the weight otherwise."""
        if self.mode == "dual":
            return self.module.parametrizations.weight.original.detach()
        return self.module.weight.detach()

    def set_mask(self, new: torch.Tensor) -> None:
        new = new.detach().to(device=self.mask.device) != 0
        if tuple(new.shape) != tuple(self.mask.shape):
            raise ConfigError("mask shape differs from the weight shape", key=self.name,
                              value=tuple(new.shape), fix=f"pass a mask of shape {tuple(self.mask.shape)} "
                                                          "(granularity.expand_mask builds one)")
        if self.mode == "hard":
            new = new & self._mask          # hard: what is pruned stays pruned
        if self.mode == "dual":
            self.mask.copy_(new)            # in place: the parametrization holds this buffer
        else:
            self._mask = new
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights now (dual needs nothing: its forward masks)."""
        if self.mode != "dual":
            weight = self.module.weight
            if self._mask.device != weight.device:   # the model moved (.to(device)) since masking
                self._mask = self._mask.to(weight.device)
            weight.mul_(self._mask)

    def remove(self, make_permanent: bool = True) -> None:
        """Leave a plain ``weight`` Parameter: masked (zeros) if ``make_permanent``, else as it is —
        for dual that is the dense copy, for hard/soft the current weights."""
        if self.mode == "dual":
            parametrize.remove_parametrizations(self.module, "weight", leave_parametrized=make_permanent)
        elif make_permanent:
            self.apply()


class MaskSet:
    """Masks for a dict of named modules (e.g. from ``select_layers``); all start all-True."""

    def __init__(self, layers: Mapping[str, nn.Module], *, mode: str = "hard"):
        if mode not in MODES:
            raise unknown_name("mask mode", mode, MODES, key="mode")
        if not layers:
            raise ConfigError("no layers to mask", value={}, fix="select at least one Conv/Linear layer")
        self.mode = mode
        self.layers: Dict[str, MaskedLayer] = {}
        try:
            for name, module in layers.items():
                self.layers[name] = MaskedLayer(name, module, mode)
        except ConfigError:
            self._remove_all(make_permanent=False)   # leave the model as it was
            raise
        self.removed = False

    def _live(self, call: str):
        if self.removed:
            raise LifecycleError(f"MaskSet.{call}() called after remove(); "
                                 "build a new MaskSet to prune again")

    def masks(self) -> Dict[str, torch.Tensor]:
        self._live("masks")
        return {n: l.mask.clone() for n, l in self.layers.items()}

    def dense_weights(self) -> Dict[str, torch.Tensor]:
        """Detached weights to rank at a pruning event (dense copies in dual mode)."""
        self._live("dense_weights")
        return {n: l.dense() for n, l in self.layers.items()}

    def apply(self) -> None:
        """Enforce the current masks on the weights now (all modes; a no-op for dual)."""
        self._live("apply")
        for layer in self.layers.values():
            layer.apply()

    def after_step(self) -> None:
        """Call after every optimizer step: hard re-zeroes; soft and dual let weights train."""
        self._live("after_step")
        if self.mode == "hard":
            self.apply()

    def update(self, new_masks: Mapping[str, torch.Tensor]) -> None:
        """A pruning event: install new keep-masks (any subset of the layers) and enforce them."""
        self._live("update")
        unknown = [n for n in new_masks if n not in self.layers]
        if unknown:
            raise unknown_name("masked layer", unknown[0], self.layers, key="masks")
        for name, mask in new_masks.items():
            self.layers[name].set_mask(mask)

    def sparsity(self, *, effective: bool = False) -> Dict[str, object]:
        """{'layers': {name: share pruned}, 'overall': share pruned over all masked weights}.

        By default the share of False mask entries. ``effective=True`` counts exact zeros of the
        weight the forward uses instead (differs in soft mode, where pruned weights regrow between events).
        """
        self._live("sparsity")
        per, zeros, total = {}, 0, 0
        for name, layer in self.layers.items():
            off = (layer.module.weight.detach() == 0) if effective else ~layer.mask
            per[name] = int(off.sum()) / off.numel()
            zeros, total = zeros + int(off.sum()), total + off.numel()
        return {"layers": per, "overall": zeros / total}

    def remove(self, make_permanent: bool = True) -> None:
        """Drop the masks, leaving plain dense tensors (with zeros where masked if ``make_permanent``)."""
        self._live("remove")
        self._remove_all(make_permanent)
        self.removed = True

    def _remove_all(self, make_permanent: bool) -> None:
        for layer in self.layers.values():
            layer.remove(make_permanent)
