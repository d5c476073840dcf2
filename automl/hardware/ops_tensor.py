"""Op handlers for activations, elementwise arithmetic and data movement (cat, split, slice, pad,
channel shuffle). See automl.hardware.ops for the registry and how a handler works."""
from __future__ import annotations

import operator
from typing import List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from automl.hardware.ops import Context, Layer, activation, arg, channel_dim, chw, handles, shape, sole_user


# activations: fn(node, module) -> the act name of keys.ACTS ---------------------------------------
@activation(nn.ReLU, F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_")
def _relu(node, module) -> str:
    return "relu"


@activation(nn.ReLU6, F.relu6)
def _relu6(node, module) -> str:
    return "relu6"


@activation(nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_")
def _sigmoid(node, module) -> str:
    return "sigmoid"


@activation(nn.Hardswish, F.hardswish)
def _hardswish(node, module) -> str:
    return "hardswish"


@activation(nn.Hardsigmoid, F.hardsigmoid)
def _hardsigmoid(node, module) -> str:
    return "hardsigmoid"


@activation(nn.SiLU, F.silu)
def _swish(node, module) -> str:
    return "swish"


@activation(nn.GELU, F.gelu)
def _gelu(node, module) -> str:
    approximate = module.approximate if module is not None else node.kwargs.get("approximate", "none")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


@activation(nn.LeakyReLU, F.leaky_relu, F.leaky_relu_)
def _leaky_relu(node, module) -> str:
    return "leaky_relu"      # the slope does not change the cost


@activation(nn.PReLU, F.prelu)
def _prelu(node, module) -> str:
    return "prelu"


@activation(nn.Tanh, torch.tanh, F.tanh, "tanh", "tanh_")
def _tanh(node, module) -> str:
    return "tanh"


def _bounds(low, high) -> str:
    """A clamp to [low, high]: ReLU and ReLU6 where it is one (they fuse like them), else a Clip."""
    if low == 0 and high is None:
        return "relu"
    return "relu6" if (low, high) == (0, 6) else "clip"


@activation(nn.Hardtanh)
def _hardtanh(node, module) -> str:
    return _bounds(module.min_val, module.max_val)


@activation(F.hardtanh, F.hardtanh_)
def _hardtanh_function(node, module) -> str:
    return _bounds(arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0))


@activation(torch.clamp, torch.clip, torch.clamp_, "clamp", "clamp_", "clip", "clip_")
def _clamp(node, module) -> str:
    return _bounds(arg(node, 1, "min"), arg(node, 2, "max"))


# elementwise arithmetic ----------------------------------------------------------------------------
def _operand(node: fx.Node, other) -> Optional[str]:
    """How ``other`` broadcasts against ``node``'s output, per sample (None: a pattern not priced)."""
    dims, out = shape(other), shape(node)
    if dims is None:
        return "scalar"           # a Python number
    dims = (1,) * (len(out) - len(dims)) + dims
    if len(dims) != len(out):
        return None
    sample, want = dims[1:], out[1:]
    if all(d == 1 for d in sample):
        return "scalar"
    if sample == want:
        return "full"
    if len(want) == 3 and sample == (want[0], 1, 1):
        return "channel"
    if len(want) == 3 and sample == (1,) + want[1:]:
        return "spatial"
    return None


_FNS = {"add": (operator.add, operator.iadd, torch.add, "add", "add_"),
        "sub": (operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_"),
        "mul": (operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_"),
        "div": (operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_")}


def _arithmetic(fn: str):
    def handler(ctx: Context, node: fx.Node) -> List[Layer]:
        a, b = node.args[0], arg(node, 1, "other")
        c, h, w = chw(node)
        forms = [_operand(node, x) for x in (a, b)]
        if None in forms or "full" not in forms and forms != ["scalar", "scalar"]:
            raise ctx.refuse(node, f"a '{fn}' of a {shape(a)} and a {shape(b) or b!r} tensor", forms,
                             "broadcast only a number, a (C,1,1) or a (1,H,W) tensor against a full one")
        operand = "full" if forms == ["full", "full"] else next(f for f in forms if f != "full")
        if fn == "add" and operand == "full":
            last, _, act = ctx.fuse(node, bn=False)
            return [Layer(ctx.make("add", channels=c, h=h, w=w, act=act), last)]
        if fn == "mul" and operand in ("full", "channel"):     # an SE gate or a product of two maps
            return [Layer(ctx.make("mul", channels=c, h=h, w=w, gate=operand), node)]
        return [Layer(ctx.make("eltwise", channels=c, h=h, w=w, fn=fn, operand=operand), node)]
    handler.__name__ = f"{fn}_handler"
    return handler


for _fn, _targets in _FNS.items():
    handles(*_targets)(_arithmetic(_fn))


# data movement -------------------------------------------------------------------------------------
@handles(torch.cat, torch.concat, torch.concatenate)
def cat(ctx: Context, node: fx.Node) -> List[Layer]:
    """A concatenation along channels copies every input into the output: a 'cat' entry."""
    tensors, dim = arg(node, 0, "tensors"), arg(node, 1, "dim", 0)
    if not channel_dim(node, dim):
        raise ctx.refuse(node, f"a concatenation along dim {dim}", dim,
                         "concatenate (N, C, H, W) or (N, F) tensors along dim 1")
    c, h, w = chw(node)
    return [Layer(ctx.make("cat", channels=c, inputs=len(tensors), h=h, w=w), node)]


@handles(torch.chunk, torch.split, "chunk", "split")
def split(ctx: Context, node: fx.Node) -> List[Layer]:
    """Chunks / splits along channels copy into new tensors in onnxruntime (Split): a 'split' entry."""
    dim = arg(node, 2, "dim", 0)
    source, parts = node.args[0], node.meta["tensor_meta"]
    if not channel_dim(source, dim):
        raise ctx.refuse(node, f"a chunk/split along dim {dim}", dim, "split (N, C, H, W) tensors along dim 1")
    c, h, w = chw(source)
    return [Layer(ctx.make("split", channels=c, parts=len(parts), h=h, w=w), node)]


@handles(operator.getitem)
def getitem(ctx: Context, node: fx.Node) -> List[Layer]:
    """An element of a tuple (chunk / split outputs) is free; a channel slice of a tensor copies."""
    source, index = node.args[0], node.args[1]
    if shape(source) is None or shape(source) == shape(node):
        return []
    index = index if isinstance(index, tuple) else (index,)
    rest = index[2:]
    if (len(index) >= 2 and index[0] == slice(None) and isinstance(index[1], slice) and index[1].step in (None, 1)
            and all(i in (slice(None), Ellipsis) for i in rest) and len(shape(source)) in (2, 4)):
        c, h, w = chw(source)
        return [Layer(ctx.make("slice", channels=c, out_ch=chw(node)[0], h=h, w=w), node)]
    raise ctx.refuse(node, "this indexing of a tensor", repr(node.args[1]),
                     "index channels only (x[:, a:b]), or profile the model without it")


@handles(torch.transpose, torch.permute, "transpose", "permute")
def transpose(ctx: Context, node: fx.Node) -> List[Layer]:
    """The channel shuffle view(N, g, C/g, H, W) -> transpose(1, 2) is a real copy: a 'shuffle' entry.
    A permutation that moves only size-1 dimensions is a reshape (free); any other is refused."""
    dims = shape(node.args[0])
    rank = len(dims)
    if node.target in ("transpose", torch.transpose):
        a, b = (d % rank for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1")))
        perm = list(range(rank))
        perm[a], perm[b] = b, a
    else:
        raw = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
        perm = [d % rank for d in (raw[0] if len(raw) == 1 and isinstance(raw[0], (tuple, list)) else raw)]
    if [d for d in perm if dims[d] != 1] == [d for d in range(rank) if dims[d] != 1]:
        return []
    if rank == 5 and perm == [0, 2, 1, 3, 4]:
        _, g, per, h, w = dims
        return [Layer(ctx.make("shuffle", channels=g * per, groups=g, h=h, w=w), node)]
    raise ctx.refuse(node, f"a transpose/permute {perm} of a {dims} tensor", perm,
                     "the profiler knows the channel shuffle (view(N, g, C/g, H, W).transpose(1, 2)); "
                     "keep tensors in NCHW elsewhere, or register a handler in automl.hardware.ops")


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


def _pad(ctx: Context, node: fx.Node, pads, mode: str, value) -> List[Layer]:
    """A pad is its own entry (a copy into a larger tensor) -- except a symmetric zero pad of H and W
    feeding a conv, which onnxruntime folds into the conv's padding (PadFusion): the conv absorbs it."""
    pads = list(pads) + [0] * (6 - len(pads))      # (left, right, top, bottom, front, back): W, H, C
    if len(shape(node.args[0]) or ()) != 4 or any(pads[6:]) or mode not in _PAD_MODES or min(pads) < 0:
        raise ctx.refuse(node, f"a {mode} pad {tuple(pads)} of a {shape(node.args[0])} tensor", tuple(pads),
                         "pad the C, H and W of an (N, C, H, W) tensor by non-negative amounts, in constant, "
                         "reflect or replicate mode")
    left, right, top, bottom, front, back = pads[:6]
    c, h, w = chw(node.args[0])
    user = sole_user(node)
    conv = user is not None and (user.op == "call_function" and user.target is F.conv2d or
                                 isinstance(ctx.module(user), nn.Conv2d)) and user.args[0] is node
    if mode == "constant" and not value and conv and len({left, right, top, bottom}) == 1 and not front + back:
        ctx.folded_pads[node] = (node.args[0], left)
        return []
    if not any(pads):
        return []
    return [Layer(ctx.make("pad", channels=c, h=h, w=w, top=top, bottom=bottom, left=left, right=right,
                           front=front, back=back, mode=_PAD_MODES[mode]), node)]


@handles(nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
def pad_module(ctx: Context, node: fx.Node) -> List[Layer]:
    m = ctx.module(node)
    mode = "reflect" if isinstance(m, nn.ReflectionPad2d) else "replicate" if isinstance(m, nn.ReplicationPad2d) \
        else "constant"
    return _pad(ctx, node, m.padding, mode, getattr(m, "value", 0))


@handles(F.pad)
def pad_function(ctx: Context, node: fx.Node) -> List[Layer]:
    return _pad(ctx, node, arg(node, 1, "pad"), arg(node, 2, "mode", "constant"), arg(node, 3, "value", 0) or 0)
