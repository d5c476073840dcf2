"""onnxruntime's pre-processing before int8 quantization on a graph its symbolic shape inference cannot
follow (CBAM): the retry without it succeeds, and nothing is left in the current directory."""
import sys
from pathlib import Path

import pytest
import torch

from automl.runtime import export_onnx
from automl.runtime.ort_quantize import SYMBOLIC_LEFTOVER, _remove_symbolic_leftovers, pre_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from byom_models import Attention  # noqa: E402


@pytest.fixture()
def cbam_onnx(tmp_path):
    torch.manual_seed(0)
    return export_onnx(Attention().eval(), torch.randn(1, 1, 8, 8), tmp_path / "model" / "m.onnx").path


def test_symbolic_shape_failure_is_retried(cbam_onnx, tmp_path, monkeypatch):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with pytest.raises(TypeError):  # what onnxruntime alone does on this graph
        quant_pre_process(str(cbam_onnx), str(tmp_path / "x.onnx"))
    monkeypatch.chdir(tmp_path / "model")
    pre_process(cbam_onnx, tmp_path / "pre.onnx")
    assert (tmp_path / "pre.onnx").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["m.onnx"]


def test_partial_model_onnxruntime_leaves_in_the_cwd_is_removed(cbam_onnx, tmp_path, monkeypatch):
    """An incomplete symbolic inference saves its model as onnxruntime does: sym_shape_infer_temp.onnx
    with its weights in a randomly named file beside it, in the current directory."""
    import onnx

    work = tmp_path / "cwd"
    work.mkdir()
    (work / "mine.txt").write_text("the user's")
    monkeypatch.chdir(work)
    onnx.save_model(onnx.load(str(cbam_onnx)), SYMBOLIC_LEFTOVER, save_as_external_data=True)
    assert len(list(work.iterdir())) == 3
    _remove_symbolic_leftovers()
    assert [p.name for p in work.iterdir()] == ["mine.txt"]
