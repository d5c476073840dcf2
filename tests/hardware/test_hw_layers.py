"""Layer keys, tracing models into profile entries, single-layer models, and a space's distinct layers."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from automl.arch import ARCHS
from automl.errors import ConfigError
from automl.hardware.candidates import build_candidate, space_layer_keys
from automl.hardware.layer_models import context_onnx, input_array, layer_module, layer_onnx
from automl.hardware.layers import LayerKey, distinct_keys, layer_cost, modelled_energy_mj, out_hw, trace_layers
from automl.runtime import OrtModel
from automl.spaces import parse_space

X = torch.zeros(1, 1, 8, 8)


def conv(**kw):
    base = dict(in_ch=8, out_ch=16, h=8, w=8, kernel=3, stride=1, padding=1, groups=1, bn=True, act="relu")
    return LayerKey.make("conv", **{**base, **kw})


def build(family, **params):
    return ARCHS.get(family).build(params, (1, 8, 8), 10)


def tiny_space(**compression):
    raw = {"version": 1, "task": "digits",
           "arch": {"family": "cnn", "width": {"choice": [8, 16]}, "depth": {"int": [1, 2]}, "kernel": 3,
                    "pooling": "max"},
           "train": {"epochs": 2}, "compression": compression, "objectives": {"accuracy": "max"}}
    return parse_space(raw, "tiny.yaml")


def test_key_identity_signature_and_replace():
    a, b = conv(), conv()
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.id == "conv/fp32/b1/in_ch=8,out_ch=16,h=8,w=8,kernel=3,stride=1,padding=1,groups=1,bn=True,act=relu"
    assert a.channels == (8, 16)
    # channel counts are not part of the signature; geometry, precision and batch are
    assert conv(out_ch=12).signature == a.signature
    assert conv(kernel=5, padding=2).signature != a.signature
    assert a.replace(precision="int8_static").signature != a.signature
    assert a.replace(batch=4) != a and a.replace(out_ch=4)["out_ch"] == 4
    assert LayerKey.make("gap", channels=4, h=2, w=2).to_dict() == {
        "op": "gap", "precision": "fp32", "batch": 1, "shape": {"channels": 4, "h": 2, "w": 2}}


@pytest.mark.parametrize("make, words", [
    (lambda: LayerKey.make("convv", channels=1), "unknown layer op"),
    (lambda: LayerKey.make("gap", channels=4, h=2), "exactly the fields"),
    (lambda: conv(act="mish"), "act"),
    (lambda: conv(out_ch=0), "out_ch"),
    (lambda: conv(bn=1), "bn"),
    (lambda: LayerKey.make("gap", "int4", channels=4, h=2, w=2), "unknown precision"),
])
def test_key_errors(make, words):
    with pytest.raises(ConfigError, match=words):
        make()


def test_cost_by_hand():
    key = conv(in_ch=4, out_ch=8, h=8, w=8, stride=2)
    assert out_hw(key) == (4, 4)
    cost = layer_cost(key)
    assert cost.macs == 8 * 4 * 4 * 4 * 9 and cost.weights == 8 * 4 * 9 + 8
    assert cost.input_elems == 4 * 64 and cost.output_elems == 8 * 16
    dw = LayerKey.make("dwconv", channels=8, h=4, w=4, kernel=3, stride=1, padding=1, bn=True, act="relu6")
    assert layer_cost(dw).macs == 8 * 16 * 9
    lin = LayerKey.make("linear", in_features=64, out_features=10, bn=False, act="none")
    assert layer_cost(lin).macs == 640
    # batch scales energy; int8 is cheaper than fp32
    assert modelled_energy_mj(key.replace(batch=4)) == pytest.approx(4 * modelled_energy_mj(key))
    assert modelled_energy_mj(key.replace(precision="int8_static")) < modelled_energy_mj(key)


def test_trace_cnn_fuses_conv_bn_relu():
    layers = trace_layers(build("cnn", width=8, depth=2, kernel=3, pooling="max"), X)
    assert [(t.name, t.key.op) for t in layers] == [
        ("features.0", "conv"), ("features.3", "maxpool"), ("features.4", "conv"), ("pool", "gap"),
        ("head", "linear")]
    first, _, second, gap, head = (t.key for t in layers)
    assert first.fields == dict(in_ch=1, out_ch=8, h=8, w=8, kernel=3, stride=1, padding=1, groups=1, bn=True,
                                act="relu", kernel_w=-1, stride_w=-1, padding_w=-1, dilation=1)  # -1: square
    assert dict(first.shape) == {k: v for k, v in first.fields.items() if not k.endswith("_w") and k != "dilation"}
    assert (second["in_ch"], second["out_ch"], second["h"]) == (8, 16, 4)
    assert gap.fields == dict(channels=16, h=4, w=4, reduce="mean")
    assert head["in_features"] == 16 and head["act"] == "none"


def test_trace_resnet_se_and_mobilenet():
    ops = [t.key.op for t in trace_layers(build("resnet", width=4, stages=1, blocks=1, se=True), X)]
    # stem conv, conv1, conv2, SE: gap, fc1 (+relu), fc2 (+sigmoid), gating mul, add(+relu), gap, head
    assert ops == ["conv", "conv", "conv", "gap", "conv", "conv", "mul", "add", "gap", "linear"]
    se = trace_layers(build("resnet", width=4, stages=1, blocks=1, se=True), X)
    assert se[5].key["act"] == "sigmoid" and se[6].key["gate"] == "channel" and se[7].key["act"] == "relu"
    mb = trace_layers(build("mobilenetv2", width_mult=0.5, stages=1, blocks=2, expansion=2), X)
    dw = [t.key for t in mb if t.key.op == "dwconv"]
    assert len(dw) == 2 and dw[0]["act"] == "relu6"
    # both blocks keep 8 channels at stride 1: two residual adds, linear bottleneck (no activation)
    assert [t.key["act"] for t in mb if t.key.op == "add"] == ["none", "none"]


def test_trace_batch_precision_and_dedupe():
    model = build("cnn", width=8, depth=1)
    one = trace_layers(model, X)
    assert distinct_keys([one, trace_layers(build("cnn", width=8, depth=1), X)]) == sorted(t.key for t in one)
    four = trace_layers(model, torch.zeros(4, 1, 8, 8), precision="int8_static")
    assert all(t.key.batch == 4 and t.key.precision == "int8_static" for t in four)
    assert len(distinct_keys([one, four])) == 2 * len(one)


def test_unknown_layer_is_named():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Upsample(scale_factor=2))
    with pytest.raises(ConfigError, match="'1' \\(Upsample\\)"):
        trace_layers(model, X)


@pytest.mark.parametrize("key", [
    conv(act="relu6"), conv(groups=2, bn=False, act="none"),
    LayerKey.make("dwconv", channels=8, h=8, w=8, kernel=3, stride=2, padding=1, bn=True, act="relu"),
    LayerKey.make("linear", in_features=16, out_features=10, bn=False, act="relu"),
    LayerKey.make("maxpool", channels=4, h=8, w=8, kernel=2, stride=2, padding=0),
    LayerKey.make("avgpool", channels=4, h=8, w=8, kernel=3, stride=1, padding=1),
    LayerKey.make("gap", channels=4, h=4, w=4), LayerKey.make("add", channels=4, h=4, w=4, act="relu"),
    LayerKey.make("mul", channels=4, h=4, w=4, gate="channel"), LayerKey.make("act", channels=4, h=1, w=1,
                                                                            act="sigmoid"),
    LayerKey.make("bn", channels=4, h=4, w=4),
])
def test_single_layer_models_match_shapes(key, tmp_path):
    path = tmp_path / "layer.onnx"
    onnx.save(layer_onnx(key), path)
    x = input_array(key)
    got = OrtModel(path)(x)
    want = layer_module(key)(torch.from_numpy(x))
    assert got.shape == tuple(want.shape)
    assert np.isfinite(got).all()
    # behind its producer (a 1x1 conv or a square Gemm + ReLU): the same output shape; the producer
    # alone keeps the layer's input shape
    onnx.save(context_onnx(key), path)
    assert OrtModel(path)(x).shape == tuple(want.shape)
    producer = context_onnx(key, with_layer=False)
    assert [n.op_type for n in producer.graph.node][:2] in (["Conv", "Relu"], ["Gemm", "Relu"])
    onnx.save(producer, path)
    assert OrtModel(path)(x).shape == x.shape


def test_space_keys_include_thinned_channels_and_precisions():
    torch.manual_seed(0)
    space = tiny_space(pruning={"method": {"choice": ["none", "structured"]}, "ratio": {"float": [0.3, 0.6]},
                                "round_to": 1},
                       quantization={"method": {"choice": ["none", "int8_ptq"]}, "mode": "static"})
    keys, counts = space_layer_keys(space, samples=6)
    assert len(keys) == len(set(keys)) == counts["keys"]
    assert {k.precision for k in keys} == {"fp32", "int8_static"}
    first = {k["out_ch"] for k in keys if k.op == "conv" and k["in_ch"] == 1}
    assert {8, 16} <= first and first - {8, 16}, "pruned configs must add thinned channel counts"
    torch_keys, torch_counts = space_layer_keys(space, runtime="torch", samples=6)
    assert {k.precision for k in torch_keys} == {"fp32"} and torch_counts["skipped"] > 0


def test_candidate_structure_and_precision():
    space = tiny_space(pruning={"method": "structured", "ratio": 0.5, "round_to": 1},
                       quantization={"method": "int8_ptq", "mode": "dynamic"})
    config = {"arch.width": 16, "arch.depth": 2, "pruning.method": "structured", "pruning.ratio": 0.5,
              "pruning.round_to": 1,
              "quantization.method": "int8_ptq", "quantization.mode": "dynamic"}
    cand = build_candidate(space, config)
    assert cand.precision == "int8_dynamic" and cand.notes["thinned_ratio"] == 0.5
    convs = [t.key for t in cand.layers if t.key.op == "conv"]
    assert [(k["in_ch"], k["out_ch"]) for k in convs] == [(1, 8), (8, 16)]
    assert build_candidate(space, config, runtime="onnxruntime_int8").precision == "int8_static"


def test_candidate_keeps_multiples_of_round_to():
    space = tiny_space(pruning={"method": "structured", "ratio": 0.5, "round_to": 8})
    config = {"arch.width": 16, "arch.depth": 2, "pruning.method": "structured", "pruning.ratio": 0.3,
              "pruning.round_to": 8}
    convs = [t.key for t in build_candidate(space, config).layers if t.key.op == "conv"]
    assert [(k["in_ch"], k["out_ch"]) for k in convs] == [(1, 8), (8, 24)]


def test_adaptive_pool_to_a_dividing_grid_is_an_average_pool():
    import torch
    import torch.nn as nn

    from automl.errors import ConfigError
    from automl.hardware.layers import trace_layers

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    keys = [t.key for t in trace_layers(model, torch.zeros(1, 1, 8, 8))]
    pool = next(k for k in keys if k.op == "avgpool")
    assert (pool["kernel"], pool["stride"], pool["h"]) == (4, 4, 8)
    odd = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 3))
    with pytest.raises(ConfigError, match="divides the map evenly"):
        trace_layers(odd, torch.zeros(1, 1, 8, 8))
