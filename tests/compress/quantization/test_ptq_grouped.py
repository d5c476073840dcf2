"""int8_ptq dynamic on grouped / depthwise convolutions, and the parity check that refuses a broken int8 model."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from automl.compress import ApplyContext, get_method
from automl.compress.quantization import ptq
from automl.runtime import ort_quantize
from automl.configs import parse_config
from automl.errors import MeasurementError
from automl.runtime import OrtModel, export_onnx
from automl.validate import Where


def _depthwise_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(32, 16, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_dynamic_keeps_grouped_convs_float_and_close(tmp_path):
    model = _depthwise_net()
    x = torch.randn(64, 3, 8, 8)
    src = export_onnx(model, x[:1], tmp_path / "m.onnx").path
    left = ort_quantize.quantize_dynamic_int8(src, tmp_path / "q.onnx")
    assert left == 2 and ort_quantize.grouped_convs(src) and len(ort_quantize.grouped_convs(tmp_path / "q.onnx")) == 2
    ref = model(x).detach().numpy()
    out = np.asarray(OrtModel(tmp_path / "q.onnx")(x.numpy()))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.05  # ConvInteger on the grouped convs: ~0.16


def _handler(**config):
    info = get_method("int8_ptq")
    return info.handler_cls(parse_config(info.config_cls, config, Where(key="int8_ptq")))


def _deploy(handler, tmp_path):
    from automl.runtime import Artifact

    model = _depthwise_net().eval()
    ctx = ApplyContext(task=_Task(), work_dir=tmp_path, epochs=0)
    handler.prepare(model, ctx)
    handler.finalize(model, ctx)
    src = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx").path
    return handler.deploy(Artifact(path=src), ctx)


class _Task:
    def _batches(self, n=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [(torch.randn(32, 3, 8, 8, generator=g), torch.zeros(32, dtype=torch.long)) for _ in range(n)]

    def train_loader(self, batch_size=32, seed=0):
        return self._batches(seed=seed)

    def val_loader(self):
        return self._batches(seed=1)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_parity_is_reported(tmp_path, mode):
    handler = _handler(mode=mode)
    artifact = _deploy(handler, tmp_path)
    assert artifact.precision == f"int8_{mode}"
    assert handler.stats["int8_parity"] >= 0.9


def test_low_parity_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ptq.ParityProbe, "__call__", lambda self, path: 0.1)
    with pytest.raises(MeasurementError, match=r"only 10% of validation inputs .*min_parity 0.5.*Fix: try mode static"):
        _deploy(_handler(mode="dynamic"), tmp_path)
    with pytest.raises(MeasurementError, match=r"Fix: try target_parity .*calibration_method percentile or entropy"):
        _deploy(_handler(mode="static"), tmp_path / "static")
    _deploy(_handler(mode="dynamic", min_parity=0.0), tmp_path / "keep")  # 0 keeps any model


def test_auto_calibration_tries_percentile_where_minmax_misses_the_target(tmp_path, monkeypatch):
    probed = []

    def parity(self, path):  # minmax ranges ruin this model, percentile's clipped ones do not
        probed.append(path.name)
        return 0.99 if "percentile" in path.name else 0.5

    monkeypatch.setattr(ptq.ParityProbe, "__call__", parity)
    handler = _handler(mode="static", calibration_method="auto", target_parity=0.98)
    artifact = _deploy(handler, tmp_path)
    assert artifact.notes["calibration"] == "percentile" and handler.stats["int8_float_layers"] == 0
    assert handler.stats["int8_parity"] == 0.99 and artifact.path.name == "m.int8_static.onnx"
    assert not list(tmp_path.glob("*percentile*")) and "m.int8_static.percentile.onnx" in probed
    minmax = _handler(mode="static", calibration_method="minmax", target_parity=0.98, min_parity=0.0)
    assert _deploy(minmax, tmp_path / "minmax").notes["calibration"] == "minmax"
    assert minmax.stats["int8_parity"] == 0.5  # no float layers helped: it ships what it has


def test_auto_calibration_stops_at_minmax_when_it_meets_the_target(tmp_path, monkeypatch):
    probed = []
    monkeypatch.setattr(ptq.ParityProbe, "__call__", lambda self, path: probed.append(path.name) or 1.0)
    artifact = _deploy(_handler(mode="static", calibration_method="auto", target_parity=0.98), tmp_path)
    assert artifact.notes["calibration"] == "minmax" and probed == ["m.int8_static.onnx"]


def test_auto_calibration_ranks_by_parity_when_neither_meets_the_target():
    many_float = {"parity": 0.95, "float_layers": ["a", "b", "c"]}
    none_float = {"parity": 0.6, "float_layers": []}
    assert ptq._better(many_float, none_float, 0.98) and not ptq._better(none_float, many_float, 0.98)
    meets = {"parity": 0.99, "float_layers": ["a"]}
    assert ptq._better(meets, many_float, 0.98) and ptq._better({"parity": 0.98, "float_layers": []}, meets, 0.98)
