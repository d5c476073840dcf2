"""One layer alone, rebuilt from its LayerKey: an ONNX graph (for onnxruntime) or a torch module.

The ONNX graphs are written directly (no exporter: a few milliseconds instead of seconds each) in
the form the exported whole model takes after onnxruntime's graph optimisation: a conv carries
its folded BatchNorm as a bias and is followed by its activation (which onnxruntime fuses), a
linear layer is a Gemm, the global average pool a ReduceMean. Int8 variants go through the same
onnxruntime quantizer settings as the deployed model (automl/compress/quantization/ptq.py).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from automl.hardware.keys import window
from automl.hardware.layers import LayerKey
from automl.registry import Registry
from automl.runtime.ort_quantize import pre_process, quantize_dynamic_int8, quantize_static_qdq, quiet_root_logger

OPSET = 17
BUILDERS: Registry = Registry("layer model")     # op -> fn(key, rand) -> (nodes, initializers, outputs)


def _part_channels(key: LayerKey) -> List[int]:
    """The channels of each input of a 'cat' (or output of a 'split'): equal parts, the remainder first."""
    n = key["inputs"] if key.op == "cat" else key["parts"]
    base = key["channels"] // n
    return [key["channels"] - base * (n - 1)] + [base] * (n - 1)


def input_shape(key: LayerKey) -> tuple:
    if key.op == "linear":
        return (key.batch, key["in_features"])
    channels = key["in_ch"] if key.op == "conv" else _part_channels(key)[0] if key.op == "cat" else key["channels"]
    return (key.batch, channels, key["h"], key["w"])


def input_array(key: LayerKey, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(input_shape(key)).astype(np.float32)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _ints(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _act_nodes(act: str, src: str, inits: list, slope_shape: tuple = (1,)) -> tuple:
    """Nodes applying ``act`` to ``src`` (as torch.onnx exports it at OPSET); returns (nodes, output name).
    ``slope_shape``: the shape of PReLU's slopes ((C, 1, 1) on a map, (F,) on features)."""
    node = helper.make_node
    if act == "none":
        return [], src
    if act in ("relu6", "clip"):
        low, high = (0.0, 6.0) if act == "relu6" else (-1.0, 1.0)
        inits += [_init("clip_min", np.array(low)), _init("clip_max", np.array(high))]
        return [node("Clip", [src, "clip_min", "clip_max"], ["act_out"])], "act_out"
    if act == "swish":
        return [node("Sigmoid", [src], ["act_sig"]), node("Mul", [src, "act_sig"], ["act_out"])], "act_out"
    if act == "gelu":      # x * 0.5 * (1 + erf(x / sqrt 2)): onnxruntime fuses it into one Gelu kernel
        inits += [_init("gelu_sqrt2", np.array(np.sqrt(2.0))), _init("gelu_one", np.array(1.0)),
                  _init("gelu_half", np.array(0.5))]
        return [node("Div", [src, "gelu_sqrt2"], ["gelu_d"]), node("Erf", ["gelu_d"], ["gelu_e"]),
                node("Add", ["gelu_e", "gelu_one"], ["gelu_a"]), node("Mul", [src, "gelu_a"], ["gelu_m"]),
                node("Mul", ["gelu_m", "gelu_half"], ["act_out"])], "act_out"
    if act == "gelu_tanh":   # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inits += [_init("gt_c", np.array(0.044715)), _init("gt_k", np.array(np.sqrt(2 / np.pi))),
                  _init("gt_one", np.array(1.0)), _init("gt_half", np.array(0.5)), _init("gt_three", np.array(3.0))]
        return [node("Pow", [src, "gt_three"], ["gt_p"]), node("Mul", ["gt_p", "gt_c"], ["gt_q"]),
                node("Add", [src, "gt_q"], ["gt_s"]), node("Mul", ["gt_s", "gt_k"], ["gt_u"]),
                node("Tanh", ["gt_u"], ["gt_t"]), node("Add", ["gt_t", "gt_one"], ["gt_a"]),
                node("Mul", [src, "gt_a"], ["gt_m"]), node("Mul", ["gt_m", "gt_half"], ["act_out"])], "act_out"
    if act == "prelu":
        inits.append(_init("prelu_slope", np.full(slope_shape, 0.25)))
        return [node("PRelu", [src, "prelu_slope"], ["act_out"])], "act_out"
    extra = {"hardsigmoid": {"alpha": 1 / 6, "beta": 0.5}, "leaky_relu": {"alpha": 0.01}}.get(act, {})
    op = {"relu": "Relu", "sigmoid": "Sigmoid", "hardswish": "HardSwish", "hardsigmoid": "HardSigmoid",
          "leaky_relu": "LeakyRelu", "tanh": "Tanh"}[act]
    return [node(op, [src], ["act_out"], **extra)], "act_out"


def _slopes(key: LayerKey) -> tuple:
    if key.op == "linear":
        return (key["out_features"],)
    return (key["out_ch"] if key.op == "conv" else key["channels"], 1, 1)


@BUILDERS.register("conv")
@BUILDERS.register("dwconv")
def _conv(key: LayerKey, rand):
    f = key.fields
    cin = f["in_ch"] if key.op == "conv" else f["channels"]
    cout = f["out_ch"] if key.op == "conv" else f["channels"]
    groups = f["groups"] if key.op == "conv" else cin
    kernel, stride, (ph, pw) = window(key)
    return ([helper.make_node("Conv", ["input", "w", "b"], ["y"], kernel_shape=list(kernel), strides=list(stride),
                              pads=[ph, pw, ph, pw], group=groups, dilations=[f["dilation"]] * 2)],
            [_init("w", rand(cout, cin // groups, *kernel)), _init("b", rand(cout))], ["y"])


@BUILDERS.register("linear")
def _linear(key: LayerKey, rand):
    return ([helper.make_node("Gemm", ["input", "w", "b"], ["y"], transB=1)],
            [_init("w", rand(key["out_features"], key["in_features"])), _init("b", rand(key["out_features"]))], ["y"])


@BUILDERS.register("maxpool")
@BUILDERS.register("avgpool")
def _pool(key: LayerKey, rand):
    extra = {"count_include_pad": 1} if key.op == "avgpool" else {}
    return ([helper.make_node("MaxPool" if key.op == "maxpool" else "AveragePool", ["input"], ["y"],
                              kernel_shape=[key["kernel"]] * 2, strides=[key["stride"]] * 2, pads=[key["padding"]] * 4,
                              ceil_mode=int(key["ceil"]), **extra)], [], ["y"])


@BUILDERS.register("gap")
@BUILDERS.register("chreduce")
def _reduce(key: LayerKey, rand):
    """A max / mean over H and W (gap) or over the channels (chreduce)."""
    reduce = "ReduceMax" if key["reduce"] == "max" else "ReduceMean"
    axes = [2, 3] if key.op == "gap" else [1]
    return [helper.make_node(reduce, ["input"], ["y"], axes=axes, keepdims=1)], [], ["y"]


@BUILDERS.register("add")
def _add(key: LayerKey, rand):
    return [helper.make_node("Add", ["input", "input"], ["y"])], [], ["y"]


def _other(key: LayerKey, form: str, rand) -> tuple:
    """The second operand of an elementwise op: a positive constant broadcast like it (a divisor never
    0), or for a residual add / a product of two maps (add, mul) ``input`` itself."""
    c, h, w = key["channels"], key["h"], key["w"]
    shapes = {"scalar": (), "channel": (1, c, 1, 1), "spatial": (1, 1, h, w), "full": (key.batch, c, h, w)}
    if form == "full" and key.op != "eltwise":
        return "input", []
    value = 0.5 + np.abs(rand(*shapes[form]))          # positive: a divisor, or an SE gate in (0, 1)-ish
    return "other", [_init("other", value)]


@BUILDERS.register("mul")
def _mul(key: LayerKey, rand):
    other, inits = _other(key, key["gate"], rand)
    return [helper.make_node("Mul", ["input", other], ["y"])], inits, ["y"]


@BUILDERS.register("eltwise")
def _eltwise(key: LayerKey, rand):
    other, inits = _other(key, key["operand"], rand)
    op = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}[key["fn"]]
    return [helper.make_node(op, ["input", other], ["y"])], inits, ["y"]


@BUILDERS.register("act")
def _act(key: LayerKey, rand):
    inits: list = []
    nodes, out = _act_nodes(key["act"], "input", inits, _slopes(key))
    return nodes, inits, [out]


@BUILDERS.register("bn")
def _bn(key: LayerKey, rand):
    c = key["channels"]
    return ([helper.make_node("BatchNormalization", ["input", "scale", "bias", "mean", "var"], ["y"])],
            [_init("scale", 1 + rand(c)), _init("bias", rand(c)), _init("mean", rand(c)),
             _init("var", np.abs(1 + rand(c)))],
            ["y"])


@BUILDERS.register("cat")
def _cat(key: LayerKey, rand):
    """The input is the first part; the others are constants of their shapes (a Concat copies them all)."""
    parts = _part_channels(key)[1:]
    inits = [_init(f"part{i}", rand(key.batch, c, key["h"], key["w"])) for i, c in enumerate(parts, 1)]
    names = ["input"] + [t.name for t in inits]
    return [helper.make_node("Concat", names, ["y"], axis=1)], inits, ["y"]


@BUILDERS.register("split")
def _split(key: LayerKey, rand):
    outs = ["y"] + [f"y{i}" for i in range(1, key["parts"])]
    return [helper.make_node("Split", ["input", "split_sizes"], outs, axis=1)], \
        [_ints("split_sizes", _part_channels(key))], outs


@BUILDERS.register("slice")
def _slice(key: LayerKey, rand):
    return ([helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["y"])],
            [_ints("starts", [0]), _ints("ends", [key["out_ch"]]), _ints("axes", [1])], ["y"])


@BUILDERS.register("pad")
def _pad(key: LayerKey, rand):
    pads = [0, key["front"], key["top"], key["left"], 0, key["back"], key["bottom"], key["right"]]
    return [helper.make_node("Pad", ["input", "pads"], ["y"], mode=key["mode"])], [_ints("pads", pads)], ["y"]


@BUILDERS.register("shuffle")
def _shuffle(key: LayerKey, rand):
    c, g, h, w = key["channels"], key["groups"], key["h"], key["w"]
    return ([helper.make_node("Reshape", ["input", "grouped"], ["g"]),
             helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "flat"], ["y"])],
            [_ints("grouped", [key.batch, g, c // g, h, w]), _ints("flat", [key.batch, c, h, w])], ["y"])


def layer_onnx(key: LayerKey, seed: int = 0) -> onnx.ModelProto:
    """A one-layer ONNX model with input ``input`` of :func:`input_shape` and output ``output`` (a split's
    other parts are the further outputs ``y1``, ``y2`` ...)."""
    rng = np.random.default_rng(seed)
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1  # noqa: E731
    nodes, inits, outs = BUILDERS.get(key.op, key="op")(key, rand)
    out = outs[0]
    if key.op in ("conv", "dwconv", "linear", "add") and key["act"] != "none":
        more, out = _act_nodes(key["act"], out, inits, _slopes(key))
        nodes = nodes + more
    nodes.append(helper.make_node("Identity", [out], ["output"]))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ["output"] + outs[1:]]
    graph = helper.make_graph(
        nodes, key.op, [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape(key)))],
        outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="automl")
    return onnx.shape_inference.infer_shapes(model)


def identity_onnx(shape=(1, 1, 8, 8)) -> onnx.ModelProto:
    """The empty model whose run time is the per-call overhead subtracted from every entry."""
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(shape))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="automl")


def context_onnx(key: LayerKey, with_layer: bool = True) -> onnx.ModelProto:
    """The layer behind a producer -- a 1x1 conv (a square Gemm for a linear layer) + ReLU -- or, without
    the layer, the producer alone. Quantized as a network, the layer then runs as inside one (int8
    input in the runtime's internal layout, no quantize / layout change of its own input), and the
    difference of the two times is its cost in context."""
    layer = layer_onnx(key)
    shape = list(input_shape(key))
    n = shape[1]
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((n, n) if len(shape) == 2 else (n, n, 1, 1)).astype(np.float32) / np.sqrt(n)
    inits = [_init("ctx_w", weight), _init("ctx_b", np.zeros(n, np.float32))]
    op = "Gemm" if len(shape) == 2 else "Conv"
    nodes = [helper.make_node(op, ["input", "ctx_w", "ctx_b"], ["ctx_y"], **({"transB": 1} if op == "Gemm" else {})),
             helper.make_node("Relu", ["ctx_y"], ["ctx"])]
    if with_layer:
        for node in layer.graph.node:
            node.input[:] = ["ctx" if i == "input" else i for i in node.input]
        nodes += list(layer.graph.node)
        inits += list(layer.graph.initializer)
    else:
        nodes.append(helper.make_node("Identity", ["ctx"], ["output"]))
    graph = helper.make_graph(nodes, "context", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="automl")
    return onnx.shape_inference.infer_shapes(model)


class _Elementwise(nn.Module):
    def __init__(self, fn: str, act: nn.Module, other=None):
        super().__init__()
        self.fn, self.act = fn, act
        self.other = None if other is None else nn.Parameter(other, requires_grad=False)

    def forward(self, x):
        other = x if self.other is None else self.other
        y = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[self.fn](x, other)
        return self.act(y)


class _ChannelReduce(nn.Module):
    def __init__(self, reduce: str):
        super().__init__()
        self.reduce = reduce

    def forward(self, x):
        return x.amax(1, keepdim=True) if self.reduce == "max" else x.mean(1, keepdim=True)


class _Data(nn.Module):
    """The data-movement ops as torch eager runs them (a split or a slice there is a view)."""

    def __init__(self, key: LayerKey):
        super().__init__()
        self.key = key
        parts = _part_channels(key)[1:] if key.op == "cat" else []
        self.parts = nn.ParameterList([nn.Parameter(torch.randn(key.batch, c, key["h"], key["w"]), requires_grad=False)
                                       for c in parts])

    def forward(self, x):
        k = self.key
        if k.op == "cat":
            return torch.cat([x, *self.parts], 1)
        if k.op == "split":
            return torch.split(x, _part_channels(k), 1)
        if k.op == "slice":
            return x[:, :k["out_ch"]]
        if k.op == "pad":
            mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[k["mode"]]
            return F.pad(x, (k["left"], k["right"], k["top"], k["bottom"], k["front"], k["back"]), mode=mode)
        n, c, h, w = x.shape
        return x.view(n, k["groups"], c // k["groups"], h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def _act_module(act: str, channels: int = 1) -> nn.Module:
    return {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "sigmoid": nn.Sigmoid, "hardswish": nn.Hardswish,
            "hardsigmoid": nn.Hardsigmoid, "swish": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"),
            "leaky_relu": nn.LeakyReLU, "prelu": lambda: nn.PReLU(channels), "tanh": nn.Tanh,
            "clip": nn.Hardtanh}[act]()


def layer_module(key: LayerKey) -> nn.Module:
    """The layer as torch eager runs it (conv, BatchNorm and activation as separate modules)."""
    f = key.fields
    if key.op in ("conv", "dwconv"):
        cin = f["in_ch"] if key.op == "conv" else f["channels"]
        cout = f["out_ch"] if key.op == "conv" else f["channels"]
        groups = f["groups"] if key.op == "conv" else cin
        parts = [nn.Conv2d(cin, cout, *window(key), dilation=f["dilation"], groups=groups, bias=not f["bn"])]
        parts += [nn.BatchNorm2d(cout)] if f["bn"] else []
        module = nn.Sequential(*parts, _act_module(f["act"], cout))
    elif key.op == "linear":
        module = nn.Sequential(nn.Linear(f["in_features"], f["out_features"]), _act_module(f["act"], f["out_features"]))
    elif key.op == "maxpool":
        module = nn.MaxPool2d(f["kernel"], f["stride"], f["padding"], ceil_mode=f["ceil"])
    elif key.op == "avgpool":
        module = nn.AvgPool2d(f["kernel"], f["stride"], f["padding"], ceil_mode=f["ceil"])
    elif key.op == "gap":
        module = nn.AdaptiveMaxPool2d(1) if f["reduce"] == "max" else nn.AdaptiveAvgPool2d(1)
    elif key.op == "chreduce":
        module = _ChannelReduce(f["reduce"])
    elif key.op == "bn":
        module = nn.BatchNorm2d(f["channels"])
    elif key.op == "act":
        module = _act_module(f["act"], f["channels"])
    elif key.op in ("cat", "split", "slice", "pad", "shuffle"):
        module = _Data(key)
    else:
        form = f["gate"] if key.op == "mul" else f.get("operand", "full")
        shape = {"scalar": (), "channel": (1, f["channels"], 1, 1), "spatial": (1, 1, f["h"], f["w"]),
                 "full": (key.batch, f["channels"], f["h"], f["w"]) if key.op == "eltwise" else None}[form]
        other = None if shape is None else 0.5 + torch.rand(shape)
        module = _Elementwise(f.get("fn", key.op), _act_module(f.get("act", "none")), other)
    return module.eval()


@contextlib.contextmanager
def _quiet():
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)   # its calibration sessions warn about unused initializers
    with quiet_root_logger():   # onnxruntime.quantization logs through the root logger
        yield


def quantize_onnx(src, dst, precision: str, calibration: List[np.ndarray], *, alone: bool = False) -> Path:
    """int8 QDQ (static, calibrated on ``calibration``) or dynamic, with the deployed settings (as
    ``int8_ptq``: uint8 activations, the type onnxruntime's x86 int8 kernels fuse).

    ``alone``: the model is one layer cut out of a network. The quantizer leaves a lone pool in fp32
    because its input is not quantized; inside a quantized network it runs on int8 (QLinearAveragePool,
    int8 MaxPool), so the layer is forced to quantize as it would there."""
    src, dst = Path(src), Path(dst)
    pre = dst.with_name(dst.stem + ".pre.onnx")
    with _quiet():
        pre_process(src, pre)
        if precision == "int8_dynamic":  # as deployed: grouped convolutions stay float
            quantize_dynamic_int8(pre, dst, per_channel=True)
        elif precision == "int8_static":  # as int8_ptq deploys (its defaults: per channel, min/max, uint8)
            quantize_static_qdq(pre, dst, calibration, per_channel=True, force_quantize=alone)
        else:
            raise ValueError(f"not an int8 precision: {precision}")
    pre.unlink(missing_ok=True)
    return dst
