"""The tracer's op handlers: each construct of third-party models traces into the expected keys, and
each key's one-layer model runs in onnxruntime (and as a torch module) with the layer's output shape."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.errors import ConfigError
from automl.hardware import ops
from automl.hardware.keys import ACTS, SHAPE_FIELDS, LayerKey, layer_cost, out_hw
from automl.hardware.layer_models import BUILDERS, context_onnx, input_array, layer_module, layer_onnx
from automl.hardware.layers import trace_layers
from automl.runtime import OrtModel

X = torch.randn(1, 4, 8, 8)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def net(*layers):
    return nn.Sequential(nn.Conv2d(4, 8, 1), *layers)


def keys_of(model, x=X):
    return [t.key for t in trace_layers(model, x)]


def only(keys, op):
    found = [k for k in keys if k.op == op]
    assert len(found) == 1, [k.id for k in keys]
    return found[0]


def run_layer(key, tmp_path):
    """The key's ONNX layer model in onnxruntime, its torch module, and the model behind its producer."""
    path = tmp_path / "layer.onnx"
    onnx.save(layer_onnx(key), path)
    x = input_array(key)
    got = OrtModel(path)(x)
    want = layer_module(key)(torch.from_numpy(x))
    want = want[0] if isinstance(want, tuple) else want
    assert got.shape == tuple(want.shape) and np.isfinite(got).all(), key.id
    onnx.save(context_onnx(key), path)
    assert OrtModel(path)(x).shape == got.shape
    return got


class Shuffle(nn.Module):
    """ShuffleNetV2's unit: chunk, branch, cat, channel shuffle (as pytorchcv writes it)."""

    def __init__(self):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        a, b = torch.chunk(x, chunks=2, dim=1)
        x = torch.cat((a, self.branch(b)), dim=1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w)
        return torch.transpose(x, 1, 2).contiguous().view(n, c, h, w)


class SamePadConv(nn.Conv2d):
    """efficientnet_pytorch's Conv2dStaticSamePadding: a pad module, then the functional conv."""

    def __init__(self, cin, cout, k, stride, pads):
        super().__init__(cin, cout, k, stride, bias=False)
        self.static_padding = nn.ZeroPad2d(pads)

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class SpatialGate(nn.Module):
    """CBAM's spatial attention (pytorchcv): max and mean over the channels, a 7x7 conv, a sigmoid gate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        pooled = torch.cat((x.max(dim=1)[0].unsqueeze(1), x.mean(dim=1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.conv(pooled))


CASES = {
    # name: (model, expected (op, fields subset) of the keys the construct adds)
    "densenet_cat": (Lambda(lambda x: torch.cat([x, x[:, :2] * 2], 1)),
                     [("cat", dict(channels=6, inputs=2, h=8, w=8)), ("slice", dict(channels=4, out_ch=2)),
                      ("eltwise", dict(fn="mul", operand="scalar"))]),
    "shuffle_unit": (nn.Sequential(nn.Conv2d(4, 8, 1), Shuffle()),
                     [("split", dict(channels=8, parts=2)), ("cat", dict(channels=8, inputs=2)),
                      ("shuffle", dict(channels=8, groups=2, h=8, w=8))]),
    "hard_swish_by_hand": (net(Lambda(lambda x: x * F.relu6(x + 3.0) / 6.0)),
                           [("eltwise", dict(fn="add", operand="scalar")), ("act", dict(act="relu6")),
                            ("mul", dict(gate="full")), ("eltwise", dict(fn="div", operand="scalar"))]),
    "full_sub_div": (Lambda(lambda x: (x - x.sigmoid()) / (x.sigmoid() + 1.0)), None),
    "broadcasts": (Lambda(lambda x: (x - x.mean((2, 3), keepdim=True)) * x[:, :1]), None),
    "ceil_pool": (nn.MaxPool2d(3, 2, ceil_mode=True), [("maxpool", dict(kernel=3, stride=2, ceil=True))]),
    "ceil_pool_changes_nothing": (nn.AvgPool2d(2, 2, ceil_mode=True), [("avgpool", dict(kernel=2, ceil=False))]),
    "asymmetric_pad": (SamePadConv(4, 8, 3, 2, (0, 1, 0, 1)),
                       [("pad", dict(channels=4, top=0, bottom=1, left=0, right=1, mode="constant")),
                        ("conv", dict(in_ch=4, h=9, w=9, padding=0, stride=2))]),
    "symmetric_pad_folds_into_conv": (SamePadConv(4, 8, 3, 1, (1, 1, 1, 1)),
                                      [("conv", dict(in_ch=4, h=8, w=8, padding=1))]),
    "reflect_and_channel_pads": (nn.Sequential(nn.ReflectionPad2d(1), Lambda(lambda x: F.pad(x, (0, 0, 0, 0, 0, 2)))),
                                 [("pad", dict(mode="reflect", top=1, left=1)), ("pad", dict(back=2, h=10))]),
    "functional_pools": (Lambda(lambda x: F.adaptive_avg_pool2d(F.max_pool2d(x, 2), 1)),
                         [("maxpool", dict(kernel=2, stride=2)), ("gap", dict(h=4))]),
    # CBAM / DPN: average and max pooled channel attention, expanded back over the map it gates
    "max_pooled_attention": (Lambda(lambda x: x * torch.sigmoid(
        F.adaptive_max_pool2d(x, 1) + x.amax((2, 3), keepdim=True)).expand_as(x)),
        [("gap", dict(reduce="max", channels=4, h=8)), ("mul", dict(gate="full"))]),
    "cbam_spatial_gate": (SpatialGate(), [("chreduce", dict(reduce="max", channels=4)),
                                          ("chreduce", dict(reduce="mean", channels=4)),
                                          ("conv", dict(in_ch=2, out_ch=1, act="sigmoid")),
                                          ("eltwise", dict(fn="mul", operand="spatial"))]),
    "adaptive_max_to_a_grid": (nn.Sequential(nn.AdaptiveMaxPool2d(2), Lambda(lambda x: F.adaptive_max_pool2d(x, 1))),
                               [("maxpool", dict(kernel=4, stride=4)), ("gap", dict(reduce="max", h=2))]),
    # atrous convs (DRN, BAM's spatial attention, DeepLab backbones)
    "dilated_convs": (nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding="same", dilation=3, groups=8)),
                      [("conv", dict(dilation=2, padding=2, h=8)), ("dwconv", dict(dilation=3, padding=3))]),
    "functional_max_pool_is_not_average": (Lambda(lambda x: F.max_pool2d(x, 2)), [("maxpool", dict(kernel=2))]),
    "batchnorm1d_head": (nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.BatchNorm1d(16), nn.ReLU()),
                         [("linear", dict(in_features=256, out_features=16)), ("bn", dict(channels=16, h=1, w=1))]),
}
ACT_MODULES = {"hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(), "swish": nn.SiLU(), "gelu": nn.GELU(),
               "gelu_tanh": nn.GELU("tanh"), "leaky_relu": nn.LeakyReLU(0.2), "prelu": nn.PReLU(8), "tanh": nn.Tanh(),
               "clip": nn.Hardtanh(), "relu6": Lambda(lambda x: torch.clamp(x, 0, 6)),
               "relu": Lambda(lambda x: x.clamp(min=0))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_construct_traces_and_every_key_runs(name, tmp_path):
    model, expected = CASES[name]
    keys = keys_of(model)
    for op, fields in expected or []:
        hits = [k for k in keys if k.op == op and all(k[f] == v for f, v in fields.items())]
        assert hits, f"no {op} {fields} in {[k.id for k in keys]}"
    for key in sorted(set(keys)):
        run_layer(key, tmp_path)


def test_elementwise_forms():
    keys = keys_of(CASES["full_sub_div"][0])
    assert [(k["fn"], k["operand"]) for k in keys if k.op == "eltwise"] == [("sub", "full"), ("add", "scalar"),
                                                                             ("div", "full")]
    broad = keys_of(CASES["broadcasts"][0])
    assert [(k["fn"], k["operand"]) for k in broad if k.op == "eltwise"] == [("sub", "channel"), ("mul", "spatial")]
    assert [k.op for k in broad].count("gap") == 1     # x.mean((2, 3)) is the global average pool
    atrous = LayerKey.make("conv", in_ch=4, out_ch=8, h=9, w=9, kernel=3, stride=2, padding=1, groups=1, bn=False,
                           act="none", dilation=2)
    assert out_hw(atrous) == tuple(nn.Conv2d(4, 8, 3, 2, 1, dilation=2)(torch.zeros(1, 4, 9, 9)).shape[2:])
    assert layer_cost(atrous).macs == 8 * 4 * 4 * (4 * 3 * 3) and "dilation" not in atrous.replace(dilation=1).id
    mean_pool = LayerKey.make("gap", channels=4, h=8, w=8)
    assert mean_pool["reduce"] == "mean" and "reduce" not in mean_pool.id    # old profiles' keys unchanged
    assert mean_pool.replace(reduce="max").id.endswith(",reduce=max")


@pytest.mark.parametrize("act", sorted(ACT_MODULES))
def test_activations_fuse_into_the_conv_and_stand_alone(act, tmp_path):
    fused = only(keys_of(net(ACT_MODULES[act])), "conv")
    assert fused["act"] == act
    alone = only(keys_of(nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.Identity(), ACT_MODULES[act])),
                 "act")
    assert alone.fields == dict(channels=8, h=8, w=8, act=act)
    run_layer(fused, tmp_path)
    run_layer(alone, tmp_path)


def test_functional_conv_is_named_by_its_module():
    layers = trace_layers(nn.Sequential(SamePadConv(4, 8, 3, 1, (1, 1, 1, 1))), X)
    assert [(t.name, t.key.op) for t in layers] == [("0", "conv")]


def test_every_op_and_activation_has_a_layer_model(tmp_path):
    assert sorted(BUILDERS.names()) == sorted(SHAPE_FIELDS)
    for act in ACTS:
        run_layer(LayerKey.make("linear", in_features=6, out_features=5, bn=False, act=act), tmp_path)


def test_optional_fields_keep_old_keys():
    plain = LayerKey.make("maxpool", channels=4, h=8, w=8, kernel=3, stride=2, padding=0)
    assert plain == plain.replace(ceil=False) and plain["ceil"] is False
    assert plain.id == "maxpool/fp32/b1/channels=4,h=8,w=8,kernel=3,stride=2,padding=0"
    assert "ceil" not in plain.to_dict()["shape"] and plain.fields["ceil"] is False
    ceil = plain.replace(ceil=True)
    assert ceil != plain and ceil.signature != plain.signature and ceil.id.endswith(",ceil=True")
    for h in (7, 8, 9):
        torch_hw = nn.MaxPool2d(3, 2, ceil_mode=True)(torch.zeros(1, 1, h, h)).shape[2:]
        assert out_hw(ceil.replace(h=h, w=h)) == tuple(torch_hw)
    with pytest.raises(ConfigError, match="exactly the fields"):
        LayerKey.make("maxpool", channels=4, h=8, w=8, kernel=3, stride=2)
    with pytest.raises(ConfigError, match="no more inputs than output channels"):
        LayerKey.make("cat", channels=2, inputs=3, h=1, w=1)


def test_costs_of_new_ops_by_hand():
    cat = layer_cost(LayerKey.make("cat", channels=6, inputs=2, h=4, w=4))
    assert (cat.macs, cat.weights, cat.input_elems, cat.output_elems) == (0, 0, 96, 96)
    pad = LayerKey.make("pad", channels=2, h=4, w=4, top=0, bottom=1, left=0, right=1, back=1, mode="constant")
    assert out_hw(pad) == (5, 5) and layer_cost(pad).output_elems == 3 * 25
    div = layer_cost(LayerKey.make("eltwise", channels=3, h=4, w=4, fn="div", operand="channel"))
    assert (div.macs, div.input_elems) == (48, 48 + 3)
    assert layer_cost(LayerKey.make("act", channels=3, h=2, w=2, act="prelu")).weights == 3
    sl = layer_cost(LayerKey.make("slice", channels=8, out_ch=2, h=2, w=2))
    assert (sl.input_elems, sl.output_elems) == (8, 8)


@pytest.mark.parametrize("model, words", [
    (nn.Sequential(nn.Conv2d(4, 4, 1), nn.Upsample(scale_factor=2)), "layer '1' \\(Upsample\\) is not one"),
    (Lambda(lambda x: x.permute(0, 2, 3, 1)), "layer 'permute'.*transpose/permute"),
    (Lambda(lambda x: torch.cat([x, x], 2)), "layer 'cat'.*concatenation along dim 2"),
    (Lambda(lambda x: x[:, :, :4]), "layer 'getitem'.*indexing"),
    (Lambda(lambda x: torch.max(x, x * 2)), "layer 'max_1'.*elementwise maximum of two tensors"),
])
def test_unpriceable_constructs_name_the_layer_and_the_fix(model, words):
    with pytest.raises(ConfigError, match=words) as err:
        trace_layers(model, X)
    assert "fix" in str(err.value).lower()


def test_unknown_function_inside_a_module_names_the_module():
    class Block(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    model = nn.Sequential()
    model.add_module("block", Block())
    with pytest.raises(ConfigError, match="'cumsum' \\(in module 'block'\\).*register a handler"):
        trace_layers(model, X)


def test_a_registered_module_class_is_a_traced_leaf(monkeypatch):
    class Mish(nn.Module):       # a user's activation, written out: traced through, it would be 3 ops
        def forward(self, x):
            return x * torch.tanh(F.softplus(x))

    with pytest.raises(ConfigError, match="softplus"):
        trace_layers(net(Mish()), X)
    monkeypatch.setattr(ops.HANDLERS, "_items", dict(ops.HANDLERS._items))
    monkeypatch.setattr(ops.ACTIVATIONS, "_items", dict(ops.ACTIVATIONS._items))
    ops.activation(Mish)(lambda node, module: "swish")    # priced as its closest kernel
    assert only(keys_of(net(Mish())), "conv")["act"] == "swish"


NEW_KEYS = [LayerKey.make("cat", channels=12, inputs=3, h=4, w=4),
            LayerKey.make("split", channels=8, parts=2, h=4, w=4),
            LayerKey.make("slice", channels=8, out_ch=3, h=4, w=4),
            LayerKey.make("shuffle", channels=8, groups=2, h=4, w=4),
            LayerKey.make("pad", channels=4, h=4, w=4, top=0, bottom=1, left=0, right=1, mode="constant"),
            LayerKey.make("pad", channels=4, h=4, w=4, top=1, bottom=1, left=1, right=1, mode="reflect", back=2),
            LayerKey.make("maxpool", channels=4, h=8, w=8, kernel=3, stride=2, padding=0, ceil=True),
            LayerKey.make("avgpool", channels=4, h=8, w=8, kernel=3, stride=2, padding=0, ceil=True)] + \
    [LayerKey.make("eltwise", channels=4, h=4, w=4, fn=f, operand=o) for f in ("sub", "div") for o in
     ("scalar", "channel", "spatial", "full")] + [LayerKey.make("act", channels=4, h=4, w=4, act=a) for a in ACTS[4:]]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8_static", "int8_dynamic"])
def test_new_ops_quantize_alone_and_in_context(precision, tmp_path):
    from automl.hardware.layer_models import quantize_onnx

    for i, key in enumerate(k.replace(precision=precision) for k in NEW_KEYS):
        for in_context in (False, True):
            src = tmp_path / f"{i}{in_context}.onnx"
            onnx.save(context_onnx(key) if in_context else layer_onnx(key), src)
            calibration = [input_array(key, seed=s) for s in (1, 2)]
            path = quantize_onnx(src, tmp_path / f"{i}{in_context}.q.onnx", precision, calibration,
                                 alone=not in_context)
            assert np.isfinite(OrtModel(path)(input_array(key))).all(), key.id


def test_rectangular_convs_trace_price_and_build(tmp_path):
    """A spatial-SVD pair (k x 1 then 1 x k, as lowrank deploys it) and a strided rectangular conv: the keys
    carry the width's kernel / stride / padding, their shapes and MACs match torch, and each layer model runs."""
    from automl.modelstats import count_macs

    model = nn.Sequential(nn.Conv2d(4, 6, (3, 1), padding=(1, 0), bias=False), nn.Conv2d(6, 8, (1, 3), padding=(0, 1)),
                          nn.ReLU(), nn.Conv2d(8, 8, (3, 1), stride=(2, 1), padding=(1, 0), groups=8))
    keys = keys_of(model)
    assert [k.op for k in keys] == ["conv", "conv", "dwconv"]
    first, second, depthwise = keys
    assert (first["kernel"], first["kernel_w"], first["padding"], first["padding_w"]) == (3, 1, 1, 0)
    assert (second["kernel"], second["kernel_w"], second["padding_w"], second["act"]) == (1, 3, 1, "relu")
    assert (depthwise["stride"], depthwise["stride_w"]) == (2, 1)
    x, total = X, 0
    for key, layer in zip(keys, (model[0], model[1], model[3])):
        y = layer(x)
        assert out_hw(key) == tuple(y.shape[2:])
        assert layer_cost(key).macs == count_macs(layer, x)
        total += layer_cost(key).macs
        assert run_layer(key, tmp_path).shape[2:] == y.shape[2:]
        x = y if layer is not model[1] else torch.relu(y)
    # a square conv's key is what it always was: the width's fields are left out
    square = only(keys_of(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))), "conv")
    assert "kernel_w" not in square.id and square == LayerKey.make(
        "conv", in_ch=4, out_ch=8, h=8, w=8, kernel=3, stride=1, padding=1, groups=1, bn=False, act="none",
        kernel_w=3, stride_w=1, padding_w=1)
