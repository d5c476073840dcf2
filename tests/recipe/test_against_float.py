"""A graph a method rewrote (int8, fp16) is timed against the fp32 export it came from, with a warning
when it is slower; graphs deployed as exported are not compared."""
import shutil

import pytest
import torch

from automl.recipe.apply import against_float
from automl.runtime import Artifact, export_onnx
from automl.settings import DeploySettings as Deploy


class _Task:
    def example_input(self, batch):
        return torch.randn(batch, 16)


@pytest.fixture(scope="module")
def float_artifact(tmp_path_factory):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    return export_onnx(model, torch.randn(1, 16), tmp_path_factory.mktemp("f") / "model.onnx")


@pytest.fixture(scope="module")
def rewritten(float_artifact):
    """Another graph file standing for what a method deployed (its own timing is passed in)."""
    path = float_artifact.path.with_name("model.int8.onnx")
    shutil.copy(float_artifact.path, path)
    return Artifact(path=path, precision="int8_static")


def test_slower_deployment_gets_a_warning_and_faster_none(float_artifact, rewritten):
    slow = against_float(float_artifact, rewritten, 1e3, _Task(), Deploy(batch=2, threads=1))
    assert 0 < slow["float_latency_ms"] < 1e3 and slow["speedup_vs_float"] < 1e-2
    assert "int8_static model is SLOWER than its float form" in slow["warning"] and "batch 2" in slow["warning"]
    fast = against_float(float_artifact, rewritten, 1e-6, _Task(), Deploy(batch=2, threads=1))
    assert fast["speedup_vs_float"] > 1 and "warning" not in fast


def test_graphs_deployed_as_exported_or_elsewhere_are_not_compared(float_artifact, rewritten):
    deploy = Deploy(batch=1, threads=1)
    for same_graph in (float_artifact, Artifact(path=float_artifact.path, precision="w4a4 (simulated)")):
        assert against_float(float_artifact, same_graph, 1.0, _Task(), deploy) == {}
    other_runtime = Artifact(path=rewritten.path, runtime="aoti", precision="int8_pt2e")
    assert against_float(float_artifact, other_runtime, 1.0, _Task(), deploy) == {}
    gone = Artifact(path=float_artifact.path.with_name("missing.onnx"))
    assert against_float(gone, rewritten, 1.0, _Task(), deploy) == {}
