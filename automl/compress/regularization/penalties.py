"""Sparsity regularizers: pure, differentiable penalties over weight tensors, plus a model-level wrapper.

Groups (``weight`` of shape (out, in, *kernel) or (out, in)), on the 2-D view ``W = weight.reshape(out, -1)``:

- ``filter``: one output channel (conv filter / linear row), i.e. a row of ``W``;
- ``channel``: one input channel across all filters (conv in-channel / linear column);
- ``row``: a row of ``W`` (the same groups as ``filter``; the name Distiller uses for 2-D weights);
- ``column``: a column of ``W``: one (in, kh, kw) position across all filters, Wen et al.'s
  "shape-wise" group; for a Linear weight the same groups as ``channel``.

Group lasso uses the Yuan & Lin (2006) scaling: ``sum_g sqrt(|g|) * ||w_g||_2`` with ``|g|`` the number
of elements in a group, so layers with big groups are not under-penalised per group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, Iterable, Mapping, Tuple, Union

import torch
import torch.nn as nn

from automl.compress.layers import BATCHNORMS, PRUNABLE, select_layers
from automl.configs import option
from automl.errors import UnknownNameError
from automl.validate import Where

GROUPS = ("filter", "channel", "row", "column")
KINDS = ("l1", "group_lasso", "group_variance", "bn_scale_l1")


def group_norms(weight: torch.Tensor, groups: str) -> Tuple[torch.Tensor, int]:
    """L2 norm of every group (a 1-D tensor, differentiable) and the number of elements per group."""
    if groups not in GROUPS:
        raise ValueError(f"groups must be one of {GROUPS}, got {groups!r}")
    if weight.dim() < 2:
        raise ValueError(f"group norms need a weight with >= 2 dims (out, in, ...), got shape {tuple(weight.shape)}")
    if groups in ("filter", "row"):
        view = weight.reshape(weight.shape[0], -1)
    elif groups == "channel":
        view = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    else:  # column of the (out, rest) matrix
        view = weight.reshape(weight.shape[0], -1).t()
    # vector_norm's gradient at a zero group is 0 (a valid subgradient), so dead groups stay finite
    return torch.linalg.vector_norm(view, dim=1), view.shape[1]


def l1_penalty(weight: torch.Tensor) -> torch.Tensor:
    """Element-wise L1: ``sum |w|`` (gradient sign(w))."""
    return weight.abs().sum()


def group_lasso(weight: torch.Tensor, groups: str) -> torch.Tensor:
    """``sum_g sqrt(|g|) * ||w_g||_2`` (Yuan & Lin scaling, as in Wen et al. 2016)."""
    norms, size = group_norms(weight, groups)
    return math.sqrt(size) * norms.sum()


def group_variance(weight: torch.Tensor, groups: str) -> torch.Tensor:
    """Population variance (divide by n) of the group norms; 0 for a single group.

    The :class:`Regularizer` *subtracts* it, which pushes norms apart (some up, some towards zero).
    """
    norms, _ = group_norms(weight, groups)
    return norms.var(unbiased=False)


def _bn_modules(model_or_bns) -> Iterable[nn.Module]:
    if isinstance(model_or_bns, nn.Module):
        return [m for m in model_or_bns.modules() if isinstance(m, BATCHNORMS)]
    if isinstance(model_or_bns, Mapping):
        return list(model_or_bns.values())
    return list(model_or_bns)


def bn_scale_l1(model_or_bns: Union[nn.Module, Mapping[str, nn.Module], Iterable[nn.Module]]) -> torch.Tensor:
    """``sum |gamma|`` over BatchNorm layers (network slimming, Liu et al. 2017); non-affine BNs add 0."""
    gammas = [m.weight.abs().sum() for m in _bn_modules(model_or_bns) if getattr(m, "weight", None) is not None]
    return torch.stack(gammas).sum() if gammas else torch.zeros(())


@dataclass(frozen=True)
class RegularizerConfig:
    kind: str = option("group_lasso", choices=KINDS, doc="penalty added to the training loss")
    groups: str = option("filter", choices=GROUPS, doc="group_lasso / group_variance only")
    strength: float = option(1e-4, low=0.0, high=10.0, doc="lambda multiplying the penalty")
    layers: Tuple[str, ...] = option(("re:.*",), doc="names or 're:' patterns (Conv/Linear; BatchNorm for "
                                                     "bn_scale_l1)")
    threshold: float = option(1e-3, low=0.0, doc="report only: a group (or element) below this counts as zero")

    # keys that mean nothing for a kind; the schedule parser rejects them and the dumper leaves them out
    UNUSED: ClassVar[dict] = {"l1": ("groups",), "bn_scale_l1": ("groups",)}


def select_batchnorms(model: nn.Module, patterns: Iterable[str]) -> Dict[str, nn.Module]:
    """BatchNorm modules by name or ``re:`` pattern, with the same rules as ``select_layers``."""
    try:
        return select_layers(model, patterns, kinds=BATCHNORMS)
    except UnknownNameError as err:
        if err.message.startswith("invalid regular expression"):
            raise
        raise UnknownNameError("layer pattern matches no BatchNorm layer", key=err.key, value=err.value,
                               fix=err.fix) from None


class Regularizer:
    """A penalty over the layers of a model selected by ``config.layers``.

    Layers are looked up on every call (cheap), so a model whose modules were replaced still works.
    """

    def __init__(self, config: RegularizerConfig):
        if config.kind not in KINDS or config.groups not in GROUPS:
            raise ValueError(f"bad regularizer config {config}")
        self.config = config

    def select(self, model: nn.Module, where: Where | None = None) -> Dict[str, nn.Module]:
        """The selected modules; a pattern that matches nothing raises naming ``where`` (file, key)."""
        try:
            if self.config.kind == "bn_scale_l1":
                return select_batchnorms(model, self.config.layers)
            return select_layers(model, self.config.layers, kinds=PRUNABLE)
        except UnknownNameError as err:
            if where is None:
                raise
            raise UnknownNameError(err.message, file=where.file, key=where.key or err.key, value=err.value,
                                   fix=err.fix) from None

    def _layer_term(self, weight: torch.Tensor) -> torch.Tensor:
        kind, groups = self.config.kind, self.config.groups
        if kind == "l1":
            return l1_penalty(weight)
        if kind == "group_lasso":
            return group_lasso(weight, groups)
        return -group_variance(weight, groups)  # minus: maximise the spread of group norms

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``strength * penalty`` over the selected layers: add it to the loss before backward."""
        layers = self.select(model)
        if self.config.kind == "bn_scale_l1":
            return self.config.strength * bn_scale_l1(layers)
        return self.config.strength * torch.stack([self._layer_term(m.weight) for m in layers.values()]).sum()

    @torch.no_grad()
    def report(self, model: nn.Module) -> Dict[str, Dict[str, float]]:
        """Per layer: group-norm statistics and the share of groups (elements for l1, channels for
        bn_scale_l1) below ``threshold``. Plain floats, ready for JSON logs."""
        out = {}
        thr = self.config.threshold
        for name, module in self.select(model).items():
            if module.weight is None:  # BatchNorm(affine=False) has no gamma
                continue
            w = module.weight.detach()
            if self.config.kind in ("group_lasso", "group_variance"):
                values, _ = group_norms(w, self.config.groups)
            else:  # l1: elements; bn_scale_l1: per-channel |gamma|
                values = w.abs().flatten()
            out[name] = {
                "groups": float(values.numel()),
                "norm_mean": float(values.mean()),
                "norm_min": float(values.min()),
                "norm_max": float(values.max()),
                "below_threshold": float((values < thr).float().mean()),
            }
        return out
