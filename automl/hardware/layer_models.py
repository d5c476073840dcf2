"""One layer alone, rebuilt from its LayerKey: an ONNX graph (for onnxruntime) or a torch module.

The ONNX graphs are written directly (no exporter: a few milliseconds instead of seconds each) in
the form the exported whole model takes after onnxruntime's graph optimisation: a conv carries
its folded BatchNorm as a bias and is followed by its activation (which onnxruntime fuses), a
linear layer is a Gemm, the global average pool a ReduceMean. Int8 variants go through the same
onnxruntime quantizer settings as the deployed model (automl/compress/quantization/ptq.py).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable, List

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from automl.hardware.layers import LayerKey

OPSET = 17


def input_shape(key: LayerKey) -> tuple:
    if key.op == "linear":
        return (key.batch, key["in_features"])
    channels = key["in_ch"] if key.op == "conv" else key["channels"]
    return (key.batch, channels, key["h"], key["w"])


def input_array(key: LayerKey, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(input_shape(key)).astype(np.float32)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _act_nodes(act: str, src: str, inits: list) -> tuple:
    """Nodes applying ``act`` to ``src``; returns (nodes, output name)."""
    if act == "none":
        return [], src
    if act == "relu6":
        inits += [_init("clip_min", np.array(0.0)), _init("clip_max", np.array(6.0))]
        return [helper.make_node("Clip", [src, "clip_min", "clip_max"], ["act_out"])], "act_out"
    op = {"relu": "Relu", "sigmoid": "Sigmoid"}[act]
    return [helper.make_node(op, [src], ["act_out"])], "act_out"


def layer_onnx(key: LayerKey, seed: int = 0) -> onnx.ModelProto:
    """A one-layer ONNX model with input ``input`` of :func:`input_shape` and output ``output``."""
    rng = np.random.default_rng(seed)
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1  # noqa: E731
    inits, nodes, f = [], [], key.fields
    act, out = "none", "y"
    if key.op in ("conv", "dwconv"):
        cin = f["in_ch"] if key.op == "conv" else f["channels"]
        cout = f["out_ch"] if key.op == "conv" else f["channels"]
        groups = f["groups"] if key.op == "conv" else cin
        k, p = f["kernel"], f["padding"]
        inits += [_init("w", rand(cout, cin // groups, k, k)), _init("b", rand(cout))]
        nodes.append(helper.make_node("Conv", ["input", "w", "b"], ["y"], kernel_shape=[k, k],
                                      strides=[f["stride"]] * 2, pads=[p] * 4, group=groups))
        act = f["act"]
    elif key.op == "linear":
        inits += [_init("w", rand(f["out_features"], f["in_features"])), _init("b", rand(f["out_features"]))]
        nodes.append(helper.make_node("Gemm", ["input", "w", "b"], ["y"], transB=1))
        act = f["act"]
    elif key.op in ("maxpool", "avgpool"):
        extra = {"count_include_pad": 1} if key.op == "avgpool" else {}
        nodes.append(helper.make_node("MaxPool" if key.op == "maxpool" else "AveragePool", ["input"], ["y"],
                                      kernel_shape=[f["kernel"]] * 2, strides=[f["stride"]] * 2,
                                      pads=[f["padding"]] * 4, **extra))
    elif key.op == "gap":
        nodes.append(helper.make_node("ReduceMean", ["input"], ["y"], axes=[2, 3], keepdims=1))
    elif key.op == "add":
        nodes.append(helper.make_node("Add", ["input", "input"], ["y"]))
        act = f["act"]
    elif key.op == "mul":
        other = "input"
        if f["gate"] == "channel":
            inits.append(_init("gate", rng.uniform(0, 1, (1, f["channels"], 1, 1))))
            other = "gate"
        nodes.append(helper.make_node("Mul", ["input", other], ["y"]))
    elif key.op == "act":
        nodes, out = _act_nodes(f["act"], "input", inits)
    elif key.op == "bn":
        c = f["channels"]
        inits += [_init("scale", 1 + rand(c)), _init("bias", rand(c)), _init("mean", rand(c)),
                  _init("var", np.abs(1 + rand(c)))]
        nodes.append(helper.make_node("BatchNormalization", ["input", "scale", "bias", "mean", "var"], ["y"]))
    more, out = _act_nodes(act, out, inits) if act != "none" else ([], out)
    nodes += more
    nodes.append(helper.make_node("Identity", [out], ["output"]))
    graph = helper.make_graph(
        nodes, key.op, [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape(key)))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], initializer=inits)
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
    def __init__(self, op: str, act: nn.Module, gate=None):
        super().__init__()
        self.op, self.act = op, act
        self.gate = None if gate is None else nn.Parameter(gate, requires_grad=False)

    def forward(self, x):
        y = x + x if self.op == "add" else x * (x if self.gate is None else self.gate)
        return self.act(y)


def _act_module(act: str) -> nn.Module:
    return {"none": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(), "sigmoid": nn.Sigmoid()}[act]


def layer_module(key: LayerKey) -> nn.Module:
    """The layer as torch eager runs it (conv, BatchNorm and activation as separate modules)."""
    f = key.fields
    if key.op in ("conv", "dwconv"):
        cin = f["in_ch"] if key.op == "conv" else f["channels"]
        cout = f["out_ch"] if key.op == "conv" else f["channels"]
        groups = f["groups"] if key.op == "conv" else cin
        parts = [nn.Conv2d(cin, cout, f["kernel"], f["stride"], f["padding"], groups=groups, bias=not f["bn"])]
        parts += [nn.BatchNorm2d(cout)] if f["bn"] else []
        module = nn.Sequential(*parts, _act_module(f["act"]))
    elif key.op == "linear":
        module = nn.Sequential(nn.Linear(f["in_features"], f["out_features"]), _act_module(f["act"]))
    elif key.op == "maxpool":
        module = nn.MaxPool2d(f["kernel"], f["stride"], f["padding"])
    elif key.op == "avgpool":
        module = nn.AvgPool2d(f["kernel"], f["stride"], f["padding"])
    elif key.op == "gap":
        module = nn.AdaptiveAvgPool2d(1)
    elif key.op == "bn":
        module = nn.BatchNorm2d(f["channels"])
    elif key.op == "act":
        module = _act_module(f["act"])
    else:
        gate = torch.rand(1, f["channels"], 1, 1) if key.op == "mul" and f["gate"] == "channel" else None
        module = _Elementwise(key.op, _act_module(f.get("act", "none")), gate)
    return module.eval()


@contextlib.contextmanager
def _quiet():
    import onnxruntime

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # onnxruntime.quantization logs through the root logger
    onnxruntime.set_default_logger_severity(3)   # and its calibration sessions warn about unused initializers
    try:
        yield
    finally:
        root.setLevel(level)


class _Reader:
    def __init__(self, name: str, arrays: Iterable[np.ndarray]):
        self._it = iter([{name: a} for a in arrays])

    def get_next(self):
        return next(self._it, None)


def quantize_onnx(src, dst, precision: str, calibration: List[np.ndarray], input_name: str = "input", *,
                  alone: bool = False) -> Path:
    """int8 QDQ (static, calibrated on ``calibration``) or dynamic, with the deployed settings (as
    ``int8_ptq``: uint8 activations, the type onnxruntime's x86 int8 kernels fuse).

    ``alone``: the model is one layer cut out of a network. The quantizer leaves a lone pool in fp32
    because its input is not quantized; inside a quantized network it runs on int8 (QLinearAveragePool,
    int8 MaxPool), so the layer is forced to quantize as it would there."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    pre = dst.with_name(dst.stem + ".pre.onnx")
    with _quiet():
        quant_pre_process(str(src), str(pre))
        if precision == "int8_dynamic":
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        elif precision == "int8_static":
            quantize_static(str(pre), str(dst), _Reader(input_name, calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ForceQuantizeNoInputCheck": True} if alone else None)
        else:
            raise ValueError(f"not an int8 precision: {precision}")
    pre.unlink(missing_ok=True)
    return dst
