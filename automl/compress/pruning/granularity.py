"""Pruning granularities: how a weight tensor is cut into structures, and back.

The layer type is read from the weight's rank: 2-D = Linear (out, in), 3/4/5-D = Conv1d/2d/3d
(out, in/groups, *k). ``group_view`` gives (n_structures, group_size) rows for the criteria;
``expand_mask`` turns one keep-flag per structure back into a bool mask of the weight's shape.

  element   every weight                                          any layer
  kernel    one k-kernel of a conv, i.e. an (out, in) pair         conv
  filter    one output channel (conv) or output row (Linear)      conv, Linear
  channel   one input channel across all filters / input column   conv, Linear
  row       Linear output row (same cut as filter)                 Linear
  column    Linear input column (same cut as channel)              Linear
  block     bh x bw tiles of the 2-D view (out, in*prod(k))        conv, Linear

Blocks must tile the 2-D view exactly (no padding, no ragged edge): a ragged block would make
rows of unequal size and break the (n, group_size) contract, so a non-dividing block is a
ConfigError. For conv weights the 2-D view flattens (in, kh, kw) in memory order, so a 1x4 block
spans neighbouring kernel taps, then the next input channel. For grouped/depthwise convs
``channel`` indexes dim 1 of the weight (the in-channel *within* a group).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Sequence, Tuple

import torch

from automl.errors import ConfigError
from automl.registry import Registry


@dataclass(frozen=True)
class Granularity:
    name: str
    conv: bool      # valid for conv weights (rank 3-5)
    linear: bool    # valid for Linear weights (rank 2)
    doc: str


GRANULARITIES: Registry[Granularity] = Registry("pruning granularity")
for _g in (
    Granularity("element", True, True, "every weight"),
    Granularity("kernel", True, False, "one k-kernel of a conv ((out, in) pair)"),
    Granularity("filter", True, True, "one output channel / output row"),
    Granularity("channel", True, True, "one input channel / input column"),
    Granularity("row", False, True, "one Linear output row"),
    Granularity("column", False, True, "one Linear input column"),
    Granularity("block", True, True, "bh x bw tiles of the (out, in*k*k) view"),
):
    GRANULARITIES.register(_g.name)(_g)

_LAYER_NAMES = {2: "Linear", 3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}


def _layer_name(shape) -> str:
    return _LAYER_NAMES.get(len(shape), f"{len(shape)}-D tensor")


def _check(shape: Sequence[int], granularity: str) -> Granularity:
    """Look the granularity up and check it suits the layer type read from the weight's rank."""
    g = GRANULARITIES.get(granularity, key="granularity")
    if g.name == "element":
        return g
    rank = len(shape)
    ok = (rank == 2 and g.linear) or (3 <= rank <= 5 and g.conv)
    if not ok:
        valid = [n for n, x in GRANULARITIES.items()
                 if x.name == "element" or (rank == 2 and x.linear) or (3 <= rank <= 5 and x.conv)]
        raise ConfigError(f"granularity does not apply to a {_layer_name(shape)} weight {tuple(shape)}",
                          key="granularity", value=granularity,
                          fix=f"valid granularities for {_layer_name(shape)}: {', '.join(valid)}")
    return g


def _check_block(block, shape) -> Tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ConfigError("block must be two positive integers (bh, bw)", key="block", value=block,
                          fix="write e.g. (1, 4) or (4, 4)")
    bh, bw = block
    rows, cols = shape[0], prod(shape[1:])
    if rows % bh or cols % bw:
        raise ConfigError(f"block does not tile the {_layer_name(shape)} weight's 2-D view ({rows}, {cols})",
                          key="block", value=tuple(block),
                          fix=f"pick bh dividing {rows} and bw dividing {cols} (blocks are pad-free)")
    return bh, bw


def structure_count(weight_shape: Sequence[int], granularity: str, block=(1, 4)) -> int:
    """Number of structures ``group_view`` yields for a weight of this shape."""
    shape = tuple(int(s) for s in weight_shape)
    g = _check(shape, granularity).name
    if g == "element":
        return prod(shape)
    if g == "kernel":
        return shape[0] * shape[1]
    if g in ("filter", "row"):
        return shape[0]
    if g in ("channel", "column"):
        return shape[1]
    bh, bw = _check_block(block, shape)
    return (shape[0] // bh) * (prod(shape[1:]) // bw)


def group_view(weight: torch.Tensor, granularity: str, block=(1, 4)) -> torch.Tensor:
    """(n_structures, group_size) rows, one per structure, in structure-index order."""
    w = weight.detach() if isinstance(weight, torch.Tensor) else weight
    if not isinstance(w, torch.Tensor):
        raise ConfigError("group_view needs a weight tensor", value=type(weight).__name__,
                          fix="pass module.weight")
    shape = tuple(w.shape)
    g = _check(shape, granularity).name
    if g == "element":
        return w.reshape(-1, 1)
    if g == "kernel":
        return w.reshape(shape[0] * shape[1], -1)
    if g in ("filter", "row"):
        return w.reshape(shape[0], -1)
    if g in ("channel", "column"):
        return w.transpose(0, 1).reshape(shape[1], -1)
    bh, bw = _check_block(block, shape)
    rows, cols = shape[0], prod(shape[1:])
    tiles = w.reshape(rows // bh, bh, cols // bw, bw).permute(0, 2, 1, 3)   # row-block major
    return tiles.reshape(-1, bh * bw)


def expand_mask(struct_keep: torch.Tensor, weight_shape: Sequence[int], granularity: str,
                block=(1, 4)) -> torch.Tensor:
    """Bool mask of ``weight_shape`` where every entry of structure i equals ``struct_keep[i]``."""
    shape = tuple(int(s) for s in weight_shape)
    n = structure_count(shape, granularity, block)
    if not isinstance(struct_keep, torch.Tensor) or struct_keep.numel() != n:
        got = struct_keep.numel() if isinstance(struct_keep, torch.Tensor) else type(struct_keep).__name__
        raise ConfigError(f"{granularity} keep-mask needs one flag per structure ({n} for {tuple(shape)})",
                          key="struct_keep", value=got,
                          fix="pass rank_to_keep(scores, ratio) for scores from group_view of this weight")
    keep = struct_keep.reshape(-1).to(torch.bool)
    ones = (1,) * (len(shape) - 2)
    g = GRANULARITIES.get(granularity).name
    if g == "element":
        out = keep.reshape(shape)
    elif g == "kernel":
        out = keep.reshape(shape[0], shape[1], *ones).expand(shape)
    elif g in ("filter", "row"):
        out = keep.reshape(shape[0], *((1,) * (len(shape) - 1))).expand(shape)
    elif g in ("channel", "column"):
        out = keep.reshape(1, shape[1], *ones).expand(shape)
    else:
        bh, bw = _check_block(block, shape)
        rows, cols = shape[0], prod(shape[1:])
        tiles = keep.reshape(rows // bh, cols // bw, 1, 1).expand(rows // bh, cols // bw, bh, bw)
        out = tiles.permute(0, 2, 1, 3).reshape(shape)
    return out.clone()   # an expanded view would alias: writing one entry would flip a whole structure
