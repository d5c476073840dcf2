"""Layer fusion: fold BatchNorm into the preceding Conv or Linear (inference form).

Folding is exact algebra (W' = W * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta), so the
fused model computes the same function with one layer fewer per pair. A BN is folded only when its
input is the output of a Conv/Linear that nothing else reads; otherwise it stays.
"""
from __future__ import annotations

import copy
from typing import List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_bn_into(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Return a copy of ``layer`` (Conv or Linear) with ``bn`` folded in; both must be in eval form."""
    fused = copy.deepcopy(layer)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
        1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(bn.running_mean)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    with torch.no_grad():
        if isinstance(layer, _CONV) and getattr(layer, "transposed", False):
            raise ValueError("transposed convolutions are not folded")
        fused.weight.copy_(layer.weight.detach() * scale.reshape(shape))
        fused.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)
    return fused


def _pairs(gm: fx.GraphModule) -> List[Tuple[fx.Node, fx.Node]]:
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules.get(src.target), _CONV + (nn.Linear,))
                and modules[src.target].weight.shape[0] == modules[node.target].num_features):
            out.append((src, node))
    return out


def fuse_bn(model: nn.Module) -> Tuple[fx.GraphModule, List[str]]:
    """Fold every foldable BN of an eval-mode copy of ``model``; returns (fused model, folded BN names)."""
    gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    folded = []
    for src, bn_node in _pairs(gm):
        fused = fold_bn_into(modules[src.target], modules[bn_node.target])
        parent, _, name = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        bn_node.replace_all_uses_with(src)
        gm.graph.erase_node(bn_node)
        folded.append(bn_node.target)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded
