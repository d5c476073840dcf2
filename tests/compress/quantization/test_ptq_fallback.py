"""int8_ptq target_parity: the layers whose int8 hurts most stay float until the int8 model agrees
with the float one."""
import numpy as np
import torch
import torch.nn as nn

from automl.runtime import ort_quantize
from automl.compress.quantization.fallback import ParityProbe, float_fallback, quantizable_nodes
from automl.runtime import OrtModel, export_onnx


def test_fallback_reverts_the_most_harmful_layers_first():
    harm = {"a": 0.99, "b": 0.4, "c": 0.97, "d": 0.7}  # parity with only that layer in int8
    calls = []

    def quantize(src, out, nodes_to_quantize=None, nodes_to_exclude=()):
        calls.append((nodes_to_quantize, tuple(nodes_to_exclude)))
        out.update(quantized=[n for n in (nodes_to_quantize or harm) if n not in nodes_to_exclude])

    def probe(out):
        return float(np.prod([harm[n] for n in out["quantized"]]))

    import automl.compress.quantization.fallback as fb

    fb.quantizable_nodes, saved = (lambda src: list(harm)), fb.quantizable_nodes
    try:
        out = {}
        done = float_fallback(quantize, "src", out, probe, target=0.95, max_share=0.75)
        assert done["float_layers"] == ["b", "d"] and done["parity"] >= 0.95 and out["quantized"] == ["a", "c"]
        out = {}
        done = float_fallback(quantize, "src", out, probe, target=0.999, max_share=0.25)  # unreachable: the best
        assert done["float_layers"] == ["b"] and out["quantized"] == ["a", "c", "d"]
        calls.clear()
        assert float_fallback(quantize, "src", {}, probe, target=0.2, max_share=0.75)["float_layers"] == []
        assert len(calls) == 1  # good enough at once: no ranking
    finally:
        fb.quantizable_nodes = saved


class _Amplifier(nn.Module):
    """A conv whose channel 0 is nearly constant, then a depthwise conv with a 1e5 weight on that
    channel (a BatchNorm of near-zero variance folded into it): fine in float, its input's rounding
    error is amplified 1e5 times in int8."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        with torch.no_grad():
            self.conv.weight[0].mul_(1e-4)
            self.conv.bias[0] = 2.0
            self.dw.weight[0].fill_(1e5 / 9)
            self.dw.bias[0] = -2e5
            self.head[-1].weight[:, 0].mul_(50)

    def forward(self, x):
        return self.head(self.dw(torch.relu(self.conv(x))))


def _loader(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 3, 8, 8, generator=g), torch.zeros(32, dtype=torch.long)) for _ in range(n)]


def test_a_layer_that_ruins_int8_is_kept_float(tmp_path):
    model = _Amplifier().eval()
    src = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx").path
    batches = [x.numpy() for x, _ in _loader(0)]
    probe = ParityProbe(src, _loader(1))

    def quantize(s, o, **kw):
        ort_quantize.quantize_static_qdq(s, o, batches, **kw)

    plain = float_fallback(quantize, src, tmp_path / "plain.onnx", probe, target=0.0, max_share=0.0)
    kept = float_fallback(quantize, src, tmp_path / "kept.onnx", probe, target=0.95, max_share=0.5)
    assert plain["parity"] < 0.8 and kept["parity"] >= 0.95, (plain, kept)
    assert set(ort_quantize.grouped_convs(src)) <= set(kept["float_layers"])  # the amplifying depthwise conv
    assert len(kept["float_layers"]) <= 2 and "Gemm" not in str(kept["float_layers"])
    assert probe(tmp_path / "kept.onnx") == kept["parity"]  # the file written is the one chosen
    assert OrtModel(tmp_path / "kept.onnx")(batches[0][:1]).shape == (1, 10)


def test_ranges_calibrated_once_quantize_like_a_fresh_calibration(tmp_path):
    """The fallback search reuses the first call's activation ranges: a later call on other nodes needs no
    data and writes the same model a full calibration would."""
    src = export_onnx(_Amplifier().eval(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx").path
    batches = [x.numpy() for x, _ in _loader(0)]
    cache = tmp_path / "ranges.json"
    ort_quantize.quantize_static_qdq(src, tmp_path / "all.onnx", batches, calibration_cache=cache)
    assert cache.is_file()
    node = quantizable_nodes(src)[0]
    ort_quantize.quantize_static_qdq(src, tmp_path / "cached.onnx", [], calibration_cache=cache, nodes_to_quantize=[node])
    ort_quantize.quantize_static_qdq(src, tmp_path / "fresh.onnx", batches, nodes_to_quantize=[node])
    x = batches[1]
    assert np.array_equal(OrtModel(tmp_path / "cached.onnx")(x), OrtModel(tmp_path / "fresh.onnx")(x))
    assert not np.array_equal(OrtModel(tmp_path / "cached.onnx")(x), OrtModel(tmp_path / "all.onnx")(x))
