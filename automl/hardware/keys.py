"""Profile entry identities: the op kinds, their shape fields, and what one layer costs.

A :class:`LayerKey` holds everything needed to rebuild one deployed kernel alone (op, per-sample input
shape, channels, kernel, stride, groups, precision, batch), so a profile entry can be re-measured
without the model it came from. Tracing a model into keys is automl.hardware.layers (and the op
handlers in automl.hardware.ops); rebuilding a key as a one-layer model is automl.hardware.layer_models.

A field listed in OPTIONAL_FIELDS may be left out and then takes its default; a key holding the
default is the same key (same id, hash and file form) as one written before the field existed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from automl.errors import ConfigError
from automl.hardware.energy import LayerCost
from automl.registry import unknown_name

PRECISIONS = ("fp32", "int8_static", "int8_dynamic")
# Integer operands of an accelerator that takes any bit-width: 'w4a8' = 4-bit weights, 8-bit activations.
MAX_PAIR_BITS = 16
_PAIR = re.compile(r"w(\d{1,2})a(\d{1,2})")
MAC_OPS = ("conv", "dwconv", "linear")
ACTS = ("none", "relu", "relu6", "sigmoid", "hardswish", "hardsigmoid", "swish", "gelu", "gelu_tanh",
        "leaky_relu", "prelu", "tanh", "clip")
ELTWISE_FNS = ("add", "sub", "mul", "div")
# the second operand of an elementwise op, per sample: a number, a (C,1,1), a (1,H,W) or a (C,H,W) tensor
OPERANDS = ("scalar", "channel", "spatial", "full")
PAD_MODES = ("constant", "reflect", "edge")     # ONNX Pad modes (torch: constant, reflect, replicate)
_POOL = ("channels", "h", "w", "kernel", "stride", "padding", "ceil")
# A conv whose kernel, stride or padding differs along the width (the k x 1 / 1 x k factors of a spatial
# SVD) gives the width's value in these; -1 (the default, left out of the key) means "as along the height".
_WIDTHWISE = ("kernel_w", "stride_w", "padding_w")
_SAME = -1
# dilation (both directions; 1, the default, is left out of the key): an atrous conv's kernel spans
# dilation * (kernel - 1) + 1 pixels with kernel x kernel MACs per output
_CONV_EXTRA = (*_WIDTHWISE, "dilation")
SHAPE_FIELDS: Dict[str, Tuple[str, ...]] = {
    "conv": ("in_ch", "out_ch", "h", "w", "kernel", "stride", "padding", "groups", "bn", "act", *_CONV_EXTRA),
    "dwconv": ("channels", "h", "w", "kernel", "stride", "padding", "bn", "act", *_CONV_EXTRA),
    "linear": ("in_features", "out_features", "bn", "act"),
    "maxpool": _POOL, "avgpool": _POOL,         # ceil: PyTorch's ceil_mode
    "gap": ("channels", "h", "w", "reduce"),   # reduce: mean (global average pool) or max
    "chreduce": ("channels", "h", "w", "reduce"),  # a max / mean over the channels (CBAM's spatial gate)
    "add": ("channels", "h", "w", "act"),       # two full tensors (a residual), with its activation
    "mul": ("channels", "h", "w", "gate"),      # gate: 'channel' (a (C,1,1) tensor) or 'full'
    "act": ("channels", "h", "w", "act"),
    "bn": ("channels", "h", "w"),
    # every other elementwise op: sub/div of tensors, any op with a number or a broadcast operand
    "eltwise": ("channels", "h", "w", "fn", "operand"),
    "cat": ("channels", "inputs", "h", "w"),    # channels: of the output, from ``inputs`` tensors
    "split": ("channels", "parts", "h", "w"),   # channels: of the input, into ``parts`` tensors
    "slice": ("channels", "out_ch", "h", "w"),  # the first out_ch of channels (x[:, a:b])
    "pad": ("channels", "h", "w", "top", "bottom", "left", "right", "mode", "front", "back"),  # front/back: channels
    "shuffle": ("channels", "groups", "h", "w"),  # view(N, g, C/g, H, W).transpose(1, 2).view(N, C, H, W)
}
OPTIONAL_FIELDS: Dict[str, Dict[str, Any]] = {"maxpool": {"ceil": False}, "avgpool": {"ceil": False},
                                              "gap": {"reduce": "mean"},
                                              "pad": {"front": 0, "back": 0},
                                              "conv": {**dict.fromkeys(_WIDTHWISE, _SAME), "dilation": 1},
                                              "dwconv": {**dict.fromkeys(_WIDTHWISE, _SAME), "dilation": 1}}
# Fields the predictor interpolates over (latency is close to linear in each of them).
CHANNEL_FIELDS: Dict[str, Tuple[str, ...]] = {
    op: tuple(f for f in fields if f in ("in_ch", "out_ch", "channels", "in_features", "out_features"))
    for op, fields in SHAPE_FIELDS.items()}
_TEXT = {"act": ACTS, "gate": ("channel", "full"), "fn": ELTWISE_FNS, "operand": OPERANDS, "mode": PAD_MODES,
         "reduce": ("mean", "max")}
_BOOL = ("bn", "ceil")
_NON_NEGATIVE = ("padding", "padding_w", "top", "bottom", "left", "right", "front", "back")


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


def _valid(name: str, value) -> bool:
    if name in _WIDTHWISE and value == _SAME:
        return True
    if name in _BOOL:
        return isinstance(value, bool)
    if name in _TEXT:
        return value in _TEXT[name]
    return isinstance(value, int) and not isinstance(value, bool) and value >= (0 if name in _NON_NEGATIVE else 1)


def _check_relations(op: str, f: Dict[str, Any]) -> None:
    rules = {"cat": ("inputs", "channels", "no more inputs than output channels"),
             "split": ("parts", "channels", "no more parts than input channels"),
             "slice": ("out_ch", "channels", "out_ch at most channels")}
    if op in rules and f[rules[op][0]] > f[rules[op][1]]:
        raise ConfigError(f"a '{op}' layer needs {rules[op][2]}", key=f"shape.{rules[op][0]}",
                          value=f[rules[op][0]], fix=f"give at most {f[rules[op][1]]}")
    if op == "shuffle" and f["channels"] % f["groups"]:
        raise ConfigError("a 'shuffle' layer needs channels divisible by groups", key="shape.groups",
                          value=f["groups"], fix=f"give a divisor of {f['channels']}")


@dataclass(frozen=True, order=True)
class LayerKey:
    """One profile entry's identity. ``shape`` holds the op's fields in SHAPE_FIELDS order, less the
    optional ones at their default."""

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
        want, optional = SHAPE_FIELDS[op], OPTIONAL_FIELDS.get(op, {})
        if not set(want) - set(optional) <= set(fields) <= set(want):
            extra = f" ({', '.join(optional)} may be left out)" if optional else ""
            raise ConfigError(f"a '{op}' layer has exactly the fields {', '.join(want)}{extra}", key="shape",
                              value=sorted(fields), fix=f"give {', '.join(want)}")
        full = {**optional, **fields}
        for name in _WIDTHWISE if op in ("conv", "dwconv") else ():  # one key per layer: equal means "as along h"
            if full[name] == full[name[:-2]]:
                full[name] = _SAME
        for name in want:
            if not _valid(name, full[name]):
                raise ConfigError(f"invalid value for '{name}' of a '{op}' layer", key=f"shape.{name}",
                                  value=full[name],
                                  fix="booleans for " + "/".join(_BOOL) + ", one of " +
                                      ", ".join(f"{k}: {'/'.join(v)}" for k, v in _TEXT.items()) +
                                      ", integers >= 0 for " + "/".join(_NON_NEGATIVE) + ", positive integers else")
        _check_relations(op, full)
        return cls(op, precision, batch, tuple((n, full[n]) for n in want
                                               if n not in optional or full[n] != optional[n]))

    def __getitem__(self, name: str):
        for k, v in self.shape:
            if k == name:
                return v
        optional = OPTIONAL_FIELDS.get(self.op, {})
        if name in optional:
            return optional[name]
        raise KeyError(name)

    @property
    def fields(self) -> Dict[str, Any]:
        """Every field, optional ones included."""
        return {name: self[name] for name in SHAPE_FIELDS[self.op]}

    @property
    def id(self) -> str:
        """Readable and unique: ``conv/fp32/b1/in_ch=1,out_ch=8,h=8,w=8,...``."""
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
        return {"op": self.op, "precision": self.precision, "batch": self.batch, "shape": dict(self.shape)}

    def describe(self) -> str:
        return f"{self.op} ({', '.join(f'{k} {v}' for k, v in self.shape)}) at {self.precision}, batch {self.batch}"


def pool_size(size: int, kernel: int, stride: int, padding: int, ceil: bool = False) -> int:
    """One output dimension of a pool or conv, as PyTorch computes it (a ceil_mode window must start
    inside the input or its left padding)."""
    span = size + 2 * padding - kernel
    if not ceil:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def window(key: LayerKey) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """((kernel h, w), (stride h, w), (padding h, w)) of a conv or pool key."""
    k, s, p = key["kernel"], key["stride"], key["padding"]
    if key.op not in ("conv", "dwconv"):
        return (k, k), (s, s), (p, p)
    width = [key[f"{name}_w"] for name in ("kernel", "stride", "padding")]
    return tuple((h, h if w == _SAME else w) for h, w in zip((k, s, p), width))


def out_hw(key: LayerKey) -> Tuple[int, int]:
    """Output height and width."""
    if key.op in ("conv", "dwconv", "maxpool", "avgpool"):
        (kh, kw), (sh, sw), (ph, pw) = window(key)
        d = key["dilation"] if key.op in ("conv", "dwconv") else 1
        kh, kw = d * (kh - 1) + 1, d * (kw - 1) + 1
        ceil = key.op in ("maxpool", "avgpool") and key["ceil"]
        return pool_size(key["h"], kh, sh, ph, ceil), pool_size(key["w"], kw, sw, pw, ceil)
    if key.op in ("gap", "linear"):
        return 1, 1
    if key.op == "pad":
        return key["h"] + key["top"] + key["bottom"], key["w"] + key["left"] + key["right"]
    return key["h"], key["w"]


def _second_operand(key: LayerKey) -> int:
    c, h, w = key["channels"], key["h"], key["w"]
    if key.op == "add" or (key.op == "mul" and key["gate"] == "full"):
        return c * h * w
    if key.op == "mul":
        return c
    if key.op == "eltwise":
        return {"scalar": 1, "channel": c, "spatial": h * w, "full": c * h * w}[key["operand"]]
    return 0


def layer_cost(key: LayerKey) -> LayerCost:
    """MACs and tensor sizes per sample, for the energy model. Elementwise ops, activations, pools and
    the GAP count one operation per element read (an add or a compare costs about as much as a MAC's
    add); data movement (cat, split, slice, pad, shuffle) computes nothing and moves its tensors."""
    oh, ow = out_hw(key)
    if key.op == "linear":
        i, o = key["in_features"], key["out_features"]
        return LayerCost(macs=i * o, weights=i * o + o, input_elems=i, output_elems=o)
    if key.op in ("conv", "dwconv"):
        cin = key["in_ch"] if key.op == "conv" else key["channels"]
        cout = key["out_ch"] if key.op == "conv" else key["channels"]
        groups = key["groups"] if key.op == "conv" else cin
        (kh, kw), _, _ = window(key)
        per_out = cin // groups * kh * kw
        return LayerCost(macs=cout * oh * ow * per_out, weights=cout * per_out + cout,
                         input_elems=cin * key["h"] * key["w"], output_elems=cout * oh * ow)
    c = key["channels"]
    inputs = c * key["h"] * key["w"]
    if key.op in ("maxpool", "avgpool"):
        return LayerCost(macs=c * oh * ow * key["kernel"] ** 2, weights=0, input_elems=inputs,
                         output_elems=c * oh * ow)
    if key.op == "bn":
        return LayerCost(macs=inputs, weights=2 * c, input_elems=inputs, output_elems=inputs)
    if key.op == "slice":
        moved = key["out_ch"] * key["h"] * key["w"]
        return LayerCost(macs=0, weights=0, input_elems=moved, output_elems=moved)
    if key.op == "pad":
        return LayerCost(macs=0, weights=0, input_elems=inputs, output_elems=(c + key["front"] + key["back"]) * oh * ow)
    if key.op in ("cat", "split", "shuffle"):
        return LayerCost(macs=0, weights=0, input_elems=inputs, output_elems=inputs)
    if key.op == "chreduce":
        return LayerCost(macs=inputs, weights=0, input_elems=inputs, output_elems=oh * ow)
    weights = c if key.op == "act" and key["act"] == "prelu" else 0
    return LayerCost(macs=inputs, weights=weights, input_elems=inputs + _second_operand(key),
                     output_elems=c * oh * ow)
