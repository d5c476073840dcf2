"""The tracer's op handlers: one small function per kind of fx node, turning it into profile entries.

A handler is registered for the torch.nn module classes, the functions (``torch.cat``,
``operator.add``) and the tensor method names (``'view'``) it handles::

    @handles(nn.ZeroPad2d, F.pad)
    def pad(ctx: Context, node: fx.Node) -> List[Layer]: ...

It receives the node after shape propagation (``node.meta['tensor_meta']``) and returns the layers it
starts -- usually one, none for an op that costs nothing at deployment. A module class is looked up
along its MRO, so a subclass of a registered torch.nn class reuses its handler; a module class of your
own that has a handler is traced as a leaf (its forward is not traced into). Activations register
with :func:`activation` instead: they become standalone ``act`` layers and fuse into a preceding
conv, linear or residual add. Nodes whose result holds no tensor (``x.size()``, ``c // groups``) are
Python arithmetic on shapes and never reach a handler.

This module holds the registry, the shape-only ops, convs, linear layers, BatchNorm and pools;
automl.hardware.ops_tensor holds activations, elementwise arithmetic and data movement (cat, split,
slice, pad, channel shuffle). A new op kind also needs its fields in keys.SHAPE_FIELDS, a cost in
keys.layer_cost and a one-layer model in layer_models.BUILDERS (a contract test checks the last).
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from automl.errors import ConfigError
from automl.hardware.keys import LayerKey, pool_size
from automl.registry import Registry


class Layer(NamedTuple):
    key: LayerKey
    last: fx.Node       # the last node the layer absorbs (a fused BatchNorm / activation), else the node
    name: Optional[str] = None   # the layer's name when not the node's (a functional conv: its module)


Handler = Callable[["Context", fx.Node], List[Layer]]
HANDLERS: Registry[Handler] = Registry("profiler op")
ACTIVATIONS: Registry[Callable[[fx.Node, Optional[nn.Module]], str]] = Registry("profiler activation")


def target_name(target) -> str:
    """The registry name of a module class, a function or a tensor method name."""
    if isinstance(target, str):
        return f"method:{target}"
    if isinstance(target, type):
        return f"module:{target.__module__}.{target.__qualname__}"
    name = getattr(target, "__qualname__", repr(target))
    if "<locals>" in name:  # a generated wrapper (F.max_pool2d, F.adaptive_max_pool2d: boolean_dispatch's fn)
        name = getattr(target, "__name__", name)
    return f"function:{getattr(target, '__module__', None)}.{name}"


def _register(registry: Registry, targets, fn) -> None:
    for name in dict.fromkeys(target_name(t) for t in targets):   # aliases (torch.relu_ ...) once
        registry.register(name)(fn)


def handles(*targets) -> Callable[[Handler], Handler]:
    """Register a handler for module classes, functions and tensor method names."""
    def decorator(fn: Handler) -> Handler:
        _register(HANDLERS, targets, fn)
        return fn
    return decorator


def activation(*targets):
    """Register ``fn(node, module) -> act name`` (one of keys.ACTS) for activation targets."""
    def decorator(fn):
        _register(ACTIVATIONS, targets, fn)
        _register(HANDLERS, targets, _standalone_act)
        return fn
    return decorator


def lookup(registry: Registry, node: fx.Node, module: Optional[nn.Module]):
    """The registered object for ``node``'s target, or None."""
    if node.op == "call_module":
        names = [target_name(cls) for cls in type(module).__mro__]
    elif node.op in ("call_function", "call_method"):
        names = [target_name(node.target)]
    else:
        return None
    return next((registry.get(n) for n in names if n in registry), None)


def is_handled_class(cls: type) -> bool:
    return target_name(cls) in HANDLERS


class Context:
    """What a handler needs besides its node: the modules, the key maker, shapes, fusion."""

    def __init__(self, modules: dict, precision: str, batch: int):
        self.modules, self.precision, self.batch = modules, precision, batch
        self.folded_pads = {}    # pad node -> (its input node, padding) for the conv that absorbs it

    def make(self, op: str, **fields) -> LayerKey:
        return LayerKey.make(op, self.precision, self.batch, **fields)

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def name(self, node: fx.Node) -> str:
        return str(node.target) if node.op == "call_module" else node.name

    def owner(self, node: fx.Node) -> Optional[str]:
        """The path of the module whose forward called ``node`` (None at the top level)."""
        stack = node.meta.get("nn_module_stack") or {}
        return next(reversed(stack), None) or None

    def where(self, node: fx.Node) -> str:
        """The node for a message: its name, and the module it is in when it is a function call."""
        owner = self.owner(node) if node.op != "call_module" else None
        return f"'{self.name(node)}'" + (f" (in module '{owner}')" if owner else "")

    def act(self, node: Optional[fx.Node]) -> Optional[str]:
        fn = lookup(ACTIVATIONS, node, self.module(node)) if node is not None else None
        return fn(node, self.module(node)) if fn else None

    def fuse(self, node: fx.Node, bn: bool) -> Tuple[fx.Node, bool, str]:
        """Absorb a following BatchNorm (when ``bn``) and activation; returns (last node, bn?, act)."""
        nxt, has_bn = sole_user(node), False
        if bn and nxt is not None and isinstance(self.module(nxt), nn.BatchNorm2d):
            node, nxt, has_bn = nxt, sole_user(nxt), True
        act = self.act(nxt)
        return (nxt, has_bn, act) if act else (node, has_bn, "none")

    def refuse(self, node: fx.Node, what: str, value, fix: str) -> ConfigError:
        return ConfigError(f"layer {self.where(node)}: the profiler cannot price {what}", key=self.name(node),
                           value=value, fix=fix)


def sole_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def shape(node) -> Optional[tuple]:
    """The shape of a tensor node (None for anything else: a number, a tuple of tensors, a size)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def chw(node: fx.Node, what: str = "") -> Tuple[int, int, int]:
    """(C, H, W) of an (N, C, H, W) tensor; (F, 1, 1) of an (N, F) one."""
    dims = shape(node)
    dims = None if dims is None else dims[1:]
    if dims is not None and len(dims) == 1:
        return dims[0], 1, 1
    if dims is None or len(dims) != 3:
        raise ConfigError("the profiler handles (N, C, H, W) and (N, F) tensors only", key=str(node.name),
                          value=dims, fix="use 2-d convolutions and linear layers" + (f" ({what})" if what else ""))
    return tuple(dims)


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``name`` of a call, given by position ``index`` (counting the tensor) or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def channel_dim(node: fx.Node, dim) -> bool:
    """Whether ``dim`` of ``node``'s (N, C, ...) tensor is its channel dimension."""
    rank = len(shape(node) or ())
    return isinstance(dim, int) and rank >= 2 and dim % rank == 1


def pair(value, what: str, name: str) -> Tuple[int, int]:
    """A conv's (height, width) ``what`` from an int or a pair."""
    value = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"the profiler handles 2-d convs with integer {what}s only", key=name, value=value,
                          fix=f"give {what} as an integer or a pair of integers")
    return value


def square(value, what: str, name: str) -> int:
    value = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(set(value)) != 1 or not isinstance(value[0], int):
        raise ConfigError(f"the profiler handles square {what}s only", key=name, value=value,
                          fix="use one integer for kernel_size, stride and padding")
    return value[0]


def _standalone_act(ctx: Context, node: fx.Node) -> List[Layer]:
    c, h, w = chw(node)
    return [Layer(ctx.make("act", channels=c, h=h, w=w, act=ctx.act(node)), node)]


# shape-only ops ------------------------------------------------------------------------------------
# A view, reshape, flatten, squeeze or contiguous (after a transpose it is part of the shuffle
# entry), dropout and identity run no kernel in the deployed graph (an ONNX Reshape only relabels
# the buffer); their cost, if any, is left to the predictor's whole-model correction. An expand of an
# attention vector to the map it gates is priced in the product that uses it (a mul of two full maps).
@handles(nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
         nn.Identity, torch.flatten, torch.squeeze, torch.unsqueeze, torch.reshape, getattr, "flatten", "view",
         "view_as", "reshape", "reshape_as", "contiguous", "squeeze", "unsqueeze", "size", "expand", "expand_as")
def free(ctx: Context, node: fx.Node) -> List[Layer]:
    return []


# convolutions, linear layers, BatchNorm -------------------------------------------------------------
def _conv(ctx: Context, node: fx.Node, weight: tuple, stride, padding, dilation, groups: int,
          padding_mode: str = "zeros", name: Optional[str] = None) -> List[Layer]:
    name, source = name or ctx.name(node), node.args[0]
    c, h, w = chw(source)
    out_ch, _, kh, kw = weight
    if padding_mode != "zeros":
        raise ConfigError("the profiler handles zero-padded convs only", key=name, value=padding_mode,
                          fix="use padding_mode='zeros' (or a padding layer before the conv)")
    dilation = square(dilation, "dilation", name)
    (sh, sw) = pair(stride, "stride", name)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        span_h, span_w = dilation * (kh - 1), dilation * (kw - 1)
        if (sh, sw) != (1, 1) or span_h % 2 or span_w % 2:
            raise ConfigError("padding='same' with an even kernel or a stride pads unevenly", key=name,
                              value=((kh, kw), (sh, sw)), fix="give the padding as a number")
        padding = (span_h // 2, span_w // 2)
    (ph, pw) = pair(padding, "padding", name)
    if source in ctx.folded_pads:      # onnxruntime fuses a zero Pad into the conv (PadFusion)
        source, extra = ctx.folded_pads[source]
        c, h, w = chw(source)
        ph, pw = ph + extra, pw + extra
    last, bn, act = ctx.fuse(node, bn=True)
    geo = dict(kernel=kh, stride=sh, padding=ph, kernel_w=kw, stride_w=sw, padding_w=pw, dilation=dilation)
    if groups == c == out_ch > 1:
        return [Layer(ctx.make("dwconv", channels=c, h=h, w=w, bn=bn, act=act, **geo), last, name)]
    return [Layer(ctx.make("conv", in_ch=c, out_ch=out_ch, h=h, w=w, groups=groups, bn=bn, act=act, **geo), last,
                  name)]


@handles(nn.Conv2d)
def conv_module(ctx: Context, node: fx.Node) -> List[Layer]:
    m = ctx.module(node)
    return _conv(ctx, node, tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups, m.padding_mode)


@handles(F.conv2d)
def conv_function(ctx: Context, node: fx.Node) -> List[Layer]:
    weight = shape(node.args[1])
    if weight is None or len(weight) != 4:
        raise ctx.refuse(node, "a conv2d whose weight is not a 4-d tensor", weight, "pass a parameter tensor")
    return _conv(ctx, node, weight, arg(node, 3, "stride", 1), arg(node, 4, "padding", 0),
                 arg(node, 5, "dilation", 1), arg(node, 6, "groups", 1), name=ctx.owner(node))


@handles(nn.Linear, F.linear)
def linear(ctx: Context, node: fx.Node) -> List[Layer]:
    m = ctx.module(node)
    out_f, in_f = tuple(m.weight.shape) if m is not None else shape(node.args[1])
    last, bn, act = ctx.fuse(node, bn=False)
    name = ctx.owner(node) if m is None else None      # a functional linear: named by its module
    return [Layer(ctx.make("linear", in_features=in_f, out_features=out_f, bn=bn, act=act), last, name)]


@handles(nn.BatchNorm2d, nn.BatchNorm1d)
def batchnorm(ctx: Context, node: fx.Node) -> List[Layer]:
    """A BatchNorm not folded into the layer before it; a BatchNorm1d's (N, C) or (N, C, L) input is
    priced as (C, 1, L)."""
    dims = shape(node.args[0]) or ()
    c, h, w = (dims[1], 1, dims[2]) if len(dims) == 3 else chw(node.args[0])
    return [Layer(ctx.make("bn", channels=c, h=h, w=w), node)]


# pools ---------------------------------------------------------------------------------------------
def _pool(ctx: Context, node: fx.Node, op: str, kernel, stride, padding, ceil: bool, dilation=1) -> List[Layer]:
    name = ctx.name(node)
    c, h, w = chw(node.args[0])
    if square(dilation, "dilation", name) != 1:
        raise ConfigError("the profiler handles pools without dilation", key=name, value=dilation,
                          fix="use dilation=1")
    k, p = square(kernel, "kernel_size", name), square(padding, "padding", name)
    s = square(stride if stride not in (None, ()) else kernel, "stride", name)
    if ceil and all(pool_size(n, k, s, p, True) == pool_size(n, k, s, p) for n in (h, w)):
        ceil = False      # ceil_mode changes nothing on this map: the plain pool
    key = ctx.make(op, channels=c, h=h, w=w, kernel=k, stride=s, padding=p, ceil=bool(ceil))
    return [Layer(key, node)]


@handles(nn.MaxPool2d, nn.AvgPool2d)
def pool_module(ctx: Context, node: fx.Node) -> List[Layer]:
    m = ctx.module(node)
    op = "maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool"
    return _pool(ctx, node, op, m.kernel_size, m.stride, m.padding, m.ceil_mode, getattr(m, "dilation", 1))


@handles(F.max_pool2d, F.avg_pool2d)
def pool_function(ctx: Context, node: fx.Node) -> List[Layer]:
    op = "maxpool" if node.target is F.max_pool2d else "avgpool"
    ceil = arg(node, 5 if op == "maxpool" else 4, "ceil_mode", False)
    dilation = arg(node, 4, "dilation", 1) if op == "maxpool" else 1
    return _pool(ctx, node, op, arg(node, 1, "kernel_size"), arg(node, 2, "stride"), arg(node, 3, "padding", 0),
                 ceil, dilation)


@handles(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d, nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d)
def adaptive_pool(ctx: Context, node: fx.Node) -> List[Layer]:
    m = ctx.module(node)
    is_max = isinstance(m, nn.AdaptiveMaxPool2d) or node.target is F.adaptive_max_pool2d
    if is_max and (m.return_indices if m is not None else arg(node, 2, "return_indices", False)):
        raise ctx.refuse(node, "an adaptive max pool that returns indices", True, "pool without return_indices")
    c, h, w = chw(node.args[0])
    gh, gw = shape(node)[2:]
    if (gh, gw) == (1, 1):
        return [Layer(ctx.make("gap", channels=c, h=h, w=w, reduce="max" if is_max else "mean"), node)]
    if h % gh == 0 and w % gw == 0 and h // gh == w // gw:
        # to a grid that divides the map: the plain pool the ONNX export writes
        k = h // gh
        op = "maxpool" if is_max else "avgpool"
        return [Layer(ctx.make(op, channels=c, h=h, w=w, kernel=k, stride=k, padding=0), node)]
    raise ConfigError("the profiler handles adaptive pools to 1x1 or to a grid that divides the map evenly",
                      key=ctx.name(node), value=(gh, gw), fix="pool to 1, or to a divisor of the map")


@handles(torch.mean, "mean", torch.amax, "amax", torch.max, "max")
def reduction(ctx: Context, node: fx.Node) -> List[Layer]:
    """x.mean((2, 3)) / x.amax((2, 3)) are the global average / max pool (a ReduceMean / ReduceMax, as
    the GAP's layer model); a mean or max over dim 1 (x.max(dim=1)[0]: CBAM's spatial gate) reduces
    the channels of each pixel."""
    dims = arg(node, 1, "dim")
    if isinstance(dims, fx.Node):  # torch.max(a, b)
        raise ctx.refuse(node, "an elementwise maximum of two tensors", dims.name,
                         "use torch.maximum inside a module with a registered handler, or profile without it")
    rank = len(shape(node.args[0]) or ())
    reduce = "mean" if node.target in (torch.mean, "mean") else "max"
    over = None  # the reduced dimensions, sorted
    if isinstance(dims, (tuple, list)):
        over = sorted(d % 4 for d in dims)
    elif isinstance(dims, int):
        over = [dims % 4]
    if rank != 4 or over not in ([2, 3], [1]):
        raise ctx.refuse(node, "a reduction over other dimensions than H and W, or the channels", dims,
                         "reduce over (2, 3) or over dim 1")
    c, h, w = chw(node.args[0])
    return [Layer(ctx.make("gap" if over == [2, 3] else "chreduce", channels=c, h=h, w=w, reduce=reduce), node)]
