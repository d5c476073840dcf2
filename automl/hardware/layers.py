"""The distinct layer configurations of a model, as a latency profile keys them.

A *layer* is what one deployed kernel computes: a conv with its folded BatchNorm and fused
activation, a linear layer, a pool, a global average pool, a residual add (with its activation),
an SE gating multiply, a standalone activation or BatchNorm. Flatten, dropout and identity cost
nothing at deployment and are left to the predictor's whole-model correction.

A :class:`LayerKey` holds everything needed to rebuild the layer alone (op, per-sample input
shape, channels, kernel, stride, groups, precision, batch), so a profile entry can be re-measured
without the model it came from. Layers are found by tracing with torch.fx and shape propagation.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from automl.errors import ConfigError
from automl.hardware.energy import LayerCost
from automl.registry import unknown_name

PRECISIONS = ("fp32", "int8_static", "int8_dynamic")
# Integer operands of an accelerator that takes any bit-width: 'w4a8' = 4-bit weights, 8-bit activations.
MAX_PAIR_BITS = 16
_PAIR = re.compile(r"w(\d{1,2})a(\d{1,2})")
MAC_OPS = ("conv", "dwconv", "linear")
ACTS = ("none", "relu", "relu6", "sigmoid")
_POOL = ("channels", "h", "w", "kernel", "stride", "padding")
SHAPE_FIELDS: Dict[str, Tuple[str, ...]] = {
    "conv": ("in_ch", "out_ch", "h", "w", "kernel", "stride", "padding", "groups", "bn", "act"),
    "dwconv": ("channels", "h", "w", "kernel", "stride", "padding", "bn", "act"),
    "linear": ("in_features", "out_features", "bn", "act"),
    "maxpool": _POOL, "avgpool": _POOL,
    "gap": ("channels", "h", "w"),
    "add": ("channels", "h", "w", "act"),
    "mul": ("channels", "h", "w", "gate"),     # gate: 'channel' (a (C,1,1) tensor) or 'full'
    "act": ("channels", "h", "w", "act"),
    "bn": ("channels", "h", "w"),
}
# Fields the predictor interpolates over (latency is close to linear in each of them).
CHANNEL_FIELDS: Dict[str, Tuple[str, ...]] = {
    op: tuple(f for f in fields if f in ("in_ch", "out_ch", "channels", "in_features", "out_features"))
    for op, fields in SHAPE_FIELDS.items()}
_TEXT = {"act": ACTS, "gate": ("channel", "full")}


def bit_pair(precision) -> Optional[Tuple[int, int]]:
    """(weight bits, activation bits) of a 'wXaY' precision (1..16 bits each); None for anything else."""
    match = _PAIR.fullmatch(precision) if isinstance(precision, str) else None
    if match is None:
        return None
    w, a = int(match[1]), int(match[2])
    return (w, a) if 1 <= w <= MAX_PAIR_BITS and 1 <= a <= MAX_PAIR_BITS else None


def pair_precision(w_bits: int, a_bits: int) -> str:
    return f"w{int(w_bits)}a{int(a_bits)}"


def is_precision(precision) -> bool:
    """A runtime precision (fp32, int8_static, int8_dynamic) or an integer pair such as 'w4a8'."""
    return precision in PRECISIONS or bit_pair(precision) is not None


PRECISION_HELP = PRECISIONS + (f"wXaY (integer weight / activation bits, 1-{MAX_PAIR_BITS}, e.g. w4a8)",)


@dataclass(frozen=True, order=True)
class LayerKey:
    """One profile entry's identity. ``shape`` holds the op's fields in SHAPE_FIELDS order."""

    op: str
    precision: str
    batch: int
    shape: Tuple[Tuple[str, Any], ...]

    @classmethod
    def make(cls, op: str, precision: str = "fp32", batch: int = 1, **fields) -> "LayerKey":
        if op not in SHAPE_FIELDS:
            raise unknown_name("layer op", op, SHAPE_FIELDS, key="op")
        if not is_precision(precision):
            raise unknown_name("precision", precision, PRECISION_HELP, key="precision")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError("batch must be a positive integer", key="batch", value=batch)
        want = SHAPE_FIELDS[op]
        if set(fields) != set(want):
            raise ConfigError(f"a '{op}' layer has exactly the fields {', '.join(want)}", key="shape",
                              value=sorted(fields), fix=f"give {', '.join(want)}")
        for name in want:
            value = fields[name]
            if name == "bn":
                ok = isinstance(value, bool)
            elif name in _TEXT:
                ok = value in _TEXT[name]
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if name == "padding" else 1)
            if not ok:
                raise ConfigError(f"invalid value for '{name}' of a '{op}' layer", key=f"shape.{name}", value=value,
                                  fix="booleans for bn, one of " + ", ".join(f"{k}: {'/'.join(v)}" for k, v in
                                                                           _TEXT.items()) + ", positive integers else")
        return cls(op, precision, batch, tuple((name, fields[name]) for name in want))

    def __getitem__(self, name: str):
        for k, v in self.shape:
            if k == name:
                return v
        raise KeyError(name)

    @property
    def fields(self) -> Dict[str, Any]:
        return dict(self.shape)

    @property
    def id(self) -> str:
        """Readable and unique: ``conv/fp32/b1/in_ch=1,out_ch=8,h=8,...``."""
        return f"{self.op}/{self.precision}/b{self.batch}/" + ",".join(f"{k}={v}" for k, v in self.shape)

    @property
    def signature(self) -> tuple:
        """Everything except the channel counts: keys with one signature interpolate together."""
        chan = CHANNEL_FIELDS[self.op]
        return (self.op, self.precision, self.batch) + tuple((k, v) for k, v in self.shape if k not in chan)

    @property
    def channels(self) -> Tuple[int, ...]:
        return tuple(self[f] for f in CHANNEL_FIELDS[self.op])

    def replace(self, **changes) -> "LayerKey":
        fields = {**self.fields, **{k: v for k, v in changes.items() if k not in ("precision", "batch")}}
        return LayerKey.make(self.op, changes.get("precision", self.precision), changes.get("batch", self.batch),
                             **fields)

    def to_dict(self) -> dict:
        return {"op": self.op, "precision": self.precision, "batch": self.batch, "shape": self.fields}

    def describe(self) -> str:
        return f"{self.op} ({', '.join(f'{k} {v}' for k, v in self.shape)}) at {self.precision}, batch {self.batch}"


def out_hw(key: LayerKey) -> Tuple[int, int]:
    """Output height and width (floor division, as PyTorch and ONNX without ceil_mode)."""
    if key.op in ("conv", "dwconv", "maxpool", "avgpool"):
        k, s, p = key["kernel"], key["stride"], key["padding"]
        return (key["h"] + 2 * p - k) // s + 1, (key["w"] + 2 * p - k) // s + 1
    if key.op == "gap":
        return 1, 1
    if key.op == "linear":
        return 1, 1
    return key["h"], key["w"]


def layer_cost(key: LayerKey) -> LayerCost:
    """MACs and tensor sizes per sample, for the energy model. Elementwise ops, pools and the GAP
    count one operation per element read (an add or a compare costs about as much as a MAC's add)."""
    oh, ow = out_hw(key)
    if key.op == "linear":
        i, o = key["in_features"], key["out_features"]
        return LayerCost(macs=i * o, weights=i * o + o, input_elems=i, output_elems=o)
    if key.op in ("conv", "dwconv"):
        cin = key["in_ch"] if key.op == "conv" else key["channels"]
        cout = key["out_ch"] if key.op == "conv" else key["channels"]
        groups = key["groups"] if key.op == "conv" else cin
        per_out = cin // groups * key["kernel"] ** 2
        return LayerCost(macs=cout * oh * ow * per_out, weights=cout * per_out + cout,
                         input_elems=cin * key["h"] * key["w"], output_elems=cout * oh * ow)
    c = key["channels"]
    inputs = c * key["h"] * key["w"]
    if key.op in ("maxpool", "avgpool"):
        return LayerCost(macs=c * oh * ow * key["kernel"] ** 2, weights=0, input_elems=inputs,
                         output_elems=c * oh * ow)
    if key.op == "bn":
        return LayerCost(macs=inputs, weights=2 * c, input_elems=inputs, output_elems=inputs)
    second = c if key.op == "mul" and key["gate"] == "channel" else inputs if key.op in ("add", "mul") else 0
    return LayerCost(macs=inputs, weights=0, input_elems=inputs + second, output_elems=c * oh * ow)


# tracing -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TracedLayer:
    name: str       # the module (or graph node) the layer starts at
    key: LayerKey
    input_bits: Optional[int] = None   # bits of a fake-quantizer feeding this layer (free_input_quant tracing)


_ACT_MODULES = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid"))
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
                  torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid"}
_FREE_MODULES = (nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity)
_FREE_FUNCTIONS = {torch.flatten, operator.getitem, getattr}
_FREE_METHODS = {"flatten", "view", "reshape", "size", "contiguous"}
_ADDS = {operator.add, operator.iadd, torch.add}
_MULS = {operator.mul, operator.imul, torch.mul}


def _act_of(node: fx.Node, modules) -> str | None:
    if node.op == "call_module":
        for cls, name in _ACT_MODULES:
            if isinstance(modules[node.target], cls):
                return name
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ACT_METHODS.get(node.target)
    return None


def _sole_user(node: fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _chw(node) -> Tuple[int, int, int]:
    shape = tuple(node.meta["tensor_meta"].shape)[1:]
    if len(shape) == 1:
        return shape[0], 1, 1
    if len(shape) != 3:
        raise ConfigError("the profiler handles (N, C, H, W) and (N, F) tensors only", key=str(node.name),
                          value=shape, fix="use 2-d convolutions and linear layers")
    return tuple(shape)


def _square(module, attr: str, name: str) -> int:
    value = getattr(module, attr)
    value = value if isinstance(value, tuple) else (value, value)
    if len(set(value)) != 1 or not isinstance(value[0], int):
        raise ConfigError(f"the profiler handles square {attr}s only", key=name, value=value,
                          fix="use one integer for kernel_size, stride and padding")
    return value[0]


def _fuse(node: fx.Node, modules, bn: bool):
    """Absorb a following BatchNorm (when ``bn``) and activation; returns (last node, bn?, act)."""
    nxt, has_bn = _sole_user(node), False
    if bn and nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], nn.BatchNorm2d):
        node, nxt, has_bn = nxt, _sole_user(nxt), True
    act = _act_of(nxt, modules) if nxt is not None else None
    return (nxt, has_bn, act) if act else (node, has_bn, "none")


def _input_quantizers() -> tuple:
    from automl.compress.quantization.simulated import ActFakeQuant

    return (ActFakeQuant,)


def grid_bits(quantizer: nn.Module) -> int:
    """Bits of a frozen input grid [qmin, qmax] (PACT's symmetric 2**b - 1 levels count as b bits)."""
    return max(1, math.ceil(math.log2(quantizer.qmax - quantizer.qmin + 1)))


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module, name):
        return isinstance(module, self.leaves) or super().is_leaf_module(module, name)


def trace_layers(model: nn.Module, example: torch.Tensor, precision: str = "fp32", *,
                 free_input_quant: bool = False) -> List[TracedLayer]:
    """The costed layers of ``model`` on ``example`` (batch = its first dimension), in execution order.

    ``free_input_quant``: the frozen input fake-quantizers of a simulated low-bit model (ActFakeQuant)
    cost nothing -- an integer accelerator quantizes in the previous layer's output path -- and their
    bit-width is kept as the next layer's ``input_bits``. Without it they are traced as the float ops
    they are (which a CPU profile cannot price)."""
    was_training = model.training
    model.eval()
    leaves = _input_quantizers() if free_input_quant else ()
    try:
        gm = fx.GraphModule(model, _Tracer(leaves).trace(model)) if leaves else fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot trace the model with torch.fx: {type(exc).__name__}: {exc}",
                          value=type(model).__name__,
                          fix="make forward() free of data-dependent control flow, or profile its parts") from None
    finally:
        model.train(was_training)
    modules = dict(gm.named_modules())
    batch = int(example.shape[0])
    make = lambda op, **f: LayerKey.make(op, precision, batch, **f)  # noqa: E731
    out, done, grids = [], set(), {}
    for node in gm.graph.nodes:
        if node in done or node.op in ("placeholder", "output", "get_attr"):
            continue
        name = str(node.target) if node.op == "call_module" else node.name
        module = modules.get(node.target) if node.op == "call_module" else None
        if leaves and isinstance(module, leaves):
            grids[node] = grid_bits(module)
            continue
        if isinstance(module, nn.Conv2d):
            c, h, w = _chw(node.args[0])
            last, bn, act = _fuse(node, modules, bn=True)
            geo = {k: _square(module, a, name) for k, a in (("kernel", "kernel_size"), ("stride", "stride"),
                                                                ("padding", "padding"))}
            if _square(module, "dilation", name) != 1 or module.padding_mode != "zeros":
                raise ConfigError("the profiler handles zero-padded, undilated convs only", key=name,
                                  value=module.dilation, fix="use dilation=1 and padding_mode='zeros'")
            if module.groups == module.in_channels == module.out_channels > 1:
                key = make("dwconv", channels=c, h=h, w=w, bn=bn, act=act, **geo)
            else:
                key = make("conv", in_ch=c, out_ch=module.out_channels, h=h, w=w, groups=module.groups,
                           bn=bn, act=act, **geo)
        elif isinstance(module, nn.Linear):
            last, bn, act = _fuse(node, modules, bn=False)
            key = make("linear", in_features=module.in_features, out_features=module.out_features, bn=bn, act=act)
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            c, h, w = _chw(node.args[0])
            if getattr(module, "ceil_mode", False) or (isinstance(module, nn.MaxPool2d) and module.dilation != 1):
                raise ConfigError("the profiler handles pools without ceil_mode or dilation", key=name,
                                  value=repr(module), fix="use plain MaxPool2d/AvgPool2d")
            key, last = make("maxpool" if isinstance(module, nn.MaxPool2d) else "avgpool", channels=c, h=h, w=w,
                             kernel=_square(module, "kernel_size", name),
                             stride=_square(module, "stride", name), padding=_square(module, "padding", name)), node
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            c, h, w = _chw(node.args[0])
            gh, gw = tuple(node.meta["tensor_meta"].shape)[2:]
            if (gh, gw) == (1, 1):
                key, last = make("gap", channels=c, h=h, w=w), node
            elif h % gh == 0 and w % gw == 0 and h // gh == w // gw:
                # to a grid that divides the map: the plain average pool the ONNX export writes
                k = h // gh
                key, last = make("avgpool", channels=c, h=h, w=w, kernel=k, stride=k, padding=0), node
            else:
                raise ConfigError("the profiler handles AdaptiveAvgPool2d to 1x1 or to a grid that divides the "
                                  "map evenly", key=name, value=(gh, gw), fix="pool to 1, or to a divisor of the map")
        elif isinstance(module, nn.BatchNorm2d):
            c, h, w = _chw(node.args[0])
            key, last = make("bn", channels=c, h=h, w=w), node
        elif _act_of(node, modules):
            c, h, w = _chw(node)
            key, last = make("act", channels=c, h=h, w=w, act=_act_of(node, modules)), node
        elif (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and
                                                                         node.target in ("add", "add_")):
            c, h, w = _chw(node)
            last, _, act = _fuse(node, modules, bn=False)
            key = make("add", channels=c, h=h, w=w, act=act)
        elif (node.op == "call_function" and node.target in _MULS) or (node.op == "call_method" and
                                                                         node.target in ("mul", "mul_")):
            c, h, w = _chw(node)
            sizes = [_chw(a)[1:] for a in node.args[:2] if isinstance(a, fx.Node)]
            gate = "channel" if (1, 1) in sizes and (h, w) != (1, 1) else "full"
            key, last = make("mul", channels=c, h=h, w=w, gate=gate), node
        elif isinstance(module, _FREE_MODULES) or (node.op == "call_function" and node.target in _FREE_FUNCTIONS) \
                or (node.op == "call_method" and node.target in _FREE_METHODS):
            continue
        else:
            what = type(module).__name__ if module is not None else getattr(node.target, "__name__", node.target)
            raise ConfigError(f"layer '{name}' ({what}) is not one the profiler knows", key=name, value=what,
                              fix="use Conv2d, Linear, BatchNorm2d, Max/AvgPool2d, AdaptiveAvgPool2d(1), ReLU, "
                                  "ReLU6, Sigmoid, add and mul, or extend automl.hardware.layers")
        while last is not node:   # mark the absorbed chain
            done.add(last)
            last = last.args[0]
        source = node.args[0] if node.args else None
        out.append(TracedLayer(name, key, grids.get(source) if key.op in MAC_OPS else None))
    return out


def distinct_keys(layer_lists) -> List[LayerKey]:
    """The deduplicated, sorted keys of several traced models."""
    return sorted({layer.key for layers in layer_lists for layer in layers})


def key_from_dict(data: Mapping) -> LayerKey:
    shape = data.get("shape") or {}
    if not isinstance(shape, Mapping):
        raise ConfigError("shape must be a mapping of field: value", key="shape", value=shape)
    return LayerKey.make(data.get("op"), data.get("precision", "fp32"), data.get("batch", 1), **dict(shape))


def energy_precision(key: LayerKey):
    """The energy model's precision: dynamic int8 runs only conv/linear in int8; a 'wXaY' key its pair."""
    pair = bit_pair(key.precision)
    if pair is not None:
        return pair
    if key.precision == "int8_static" or (key.precision == "int8_dynamic" and key.op in ("conv", "dwconv", "linear")):
        return "int8"
    return "fp32"


def modelled_energy_mj(key: LayerKey) -> float:
    """Energy of one run of the layer (all ``batch`` samples) from the 45 nm per-op model, in mJ."""
    from automl.hardware.energy import layer_energy_pj

    return layer_energy_pj(layer_cost(key), energy_precision(key))["total_pj"] * key.batch * 1e-9


def weight_bytes(key: LayerKey) -> int:
    """Bytes of the layer's weights as deployed (int8 kernels hold 1-byte weights, 'wXaY' X-bit ones)."""
    pair = bit_pair(key.precision)
    if pair is not None:
        return math.ceil(layer_cost(key).weights * pair[0] / 8)
    return layer_cost(key).weights * (1 if energy_precision(key) == "int8" else 4)
