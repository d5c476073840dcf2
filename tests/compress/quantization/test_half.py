"""fp16: a real float16 ONNX model, half the file, accuracy and parity measured; profiles refuse it."""
import onnx
import pytest
from onnx import TensorProto

from automl.errors import MeasurementError, ProfileError
from automl.recipe import apply_recipe
from automl.recipe.schema import Recipe

RECIPE = """version: 1
task: digits
arch: {family: cnn, width: 32, depth: 3, kernel: 3, pooling: stride}
train: {epochs: 4, lr: 0.005, batch_size: 32}
stages:
- method: fp16
  config: {}
"""


def _recipe(tmp_path, text=RECIPE):
    (tmp_path / "r.yaml").write_text(text)
    return Recipe.load(tmp_path / "r.yaml")


def test_fp16_halves_the_file_and_keeps_accuracy(task, tmp_path):
    result = apply_recipe(_recipe(tmp_path), tmp_path / "out", task=task)
    m, path = result.metrics, result.artifact.path
    assert m["precision"] == "fp16" and path.name.endswith(".fp16.onnx")
    graph = onnx.load(str(path)).graph
    weights = [t for t in graph.initializer if len(t.dims) > 1]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # callers feed float32
    float_kb = (tmp_path / "out" / "model.onnx").stat().st_size / 1024
    assert 0.4 < m["file_kb"] / float_kb < 0.6
    assert m["fp16_parity"] >= 0.99 and abs(m["accuracy"] - m["torch_accuracy"]) <= 0.01
    assert m["float_latency_ms"] > 0 and m["speedup_vs_float"] > 0  # timed against fp32, whichever is faster


def test_low_parity_is_refused_with_the_fix(task, tmp_path, monkeypatch):
    from automl.compress.quantization import fallback

    monkeypatch.setattr(fallback.ParityProbe, "__call__", lambda self, path: 0.5)
    with pytest.raises(MeasurementError, match="fp16.*50%.*keep_float_ops"):
        apply_recipe(_recipe(tmp_path), tmp_path / "out", task=task)


def test_kept_float_ops_stay_float32(task, tmp_path):
    text = RECIPE.replace("train: {epochs: 4", "train: {epochs: 1").replace("config: {}",
                                                                             "config: {keep_float_ops: [Conv]}")
    result = apply_recipe(_recipe(tmp_path, text), tmp_path / "out", task=task)
    graph = onnx.load(str(result.artifact.path)).graph
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    assert conv_weights and all(t.data_type == TensorProto.FLOAT for t in graph.initializer if t.name in conv_weights)


def test_profiles_refuse_fp16_with_what_to_do():
    from automl.compress import get_method
    from automl.runtime import QuantInfo
    from automl.hardware.pricing import profile_precision

    half = get_method("fp16").handler_cls
    for refuse in (lambda: half.profile_precision(None), lambda: profile_precision(QuantInfo("fp16"))):
        with pytest.raises(ProfileError, match="cannot price an fp16 model.*--no-profile"):
            refuse()
