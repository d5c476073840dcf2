"""An int8 deployment is timed against its own float form and warns when it is slower."""
import pytest
import torch

from automl.recipe.apply import against_float
from automl.settings import DeploySettings as Deploy
from automl.runtime import Artifact, export_onnx


class _Task:
    def example_input(self, batch):
        return torch.randn(batch, 16)


@pytest.fixture(scope="module")
def float_artifact(tmp_path_factory):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    return export_onnx(model, torch.randn(1, 16), tmp_path_factory.mktemp("f") / "model.onnx")


def test_slower_int8_gets_a_warning_and_faster_none(float_artifact):
    int8 = Artifact(path=float_artifact.path, precision="int8_static")
    slow = against_float(float_artifact, int8, 1e3, _Task(), Deploy(batch=2, threads=1))
    assert 0 < slow["float_latency_ms"] < 1e3 and slow["speedup_vs_float"] < 1e-2
    assert "int8_static model is SLOWER than its float form" in slow["warning"] and "batch 2" in slow["warning"]
    fast = against_float(float_artifact, int8, 1e-6, _Task(), Deploy(batch=2, threads=1))
    assert fast["speedup_vs_float"] > 1 and "warning" not in fast


def test_only_onnxruntime_int8_models_are_compared(float_artifact):
    deploy = Deploy(batch=1, threads=1)
    assert against_float(float_artifact, float_artifact, 1.0, _Task(), deploy) == {}
    for other in (Artifact(path=float_artifact.path, precision="w4a4 (simulated)"),
                  Artifact(path=float_artifact.path, runtime="aoti", precision="int8_pt2e"),
                  Artifact(path=float_artifact.path, precision="int8_static")):
        gone = Artifact(path=float_artifact.path.with_name("missing.onnx"))
        source = gone if other.runtime == "onnxruntime" and other.precision == "int8_static" else float_artifact
        assert against_float(source, other, 1.0, _Task(), deploy) == {}
