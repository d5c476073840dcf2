"""ONNX export: the exporter's op registry is built once per process and the patch never leaks."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from automl.runtime import export as runtime
from automl.runtime import OrtModel, export_onnx

_registration = pytest.importorskip("torch.onnx._internal.exporter._registration")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def test_two_exports_build_the_registry_once_and_restore_the_exporter(monkeypatch, tmp_path):
    export_onnx(_model(), torch.randn(1, 1, 8, 8), tmp_path / "warm.onnx")  # a first export may register ops
    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    builds = []

    def counting(cls, *args, **kwargs):
        builds.append(args or tuple(kwargs.items()))
        return original.__func__(cls, *args, **kwargs)

    monkeypatch.setattr(runtime, "_REGISTRIES", {})
    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    model, x = _model(), torch.randn(5, 1, 8, 8)
    for name in ("a.onnx", "b.onnx"):
        artifact = export_onnx(model, x[:1], tmp_path / name)
        got = OrtModel(artifact.path)(x.numpy())
        np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert len(builds) == 1
    # outside our exports the class is exactly what it was (a custom op table elsewhere mutates a fresh one)
    assert _registration.ONNXRegistry.__dict__["from_torchlib"].__func__ is counting


def test_a_warmed_process_already_holds_the_registry(monkeypatch):
    monkeypatch.setattr(runtime, "_REGISTRIES", {})
    runtime.warm_onnx_exporter()
    assert len(runtime._REGISTRIES) == 1


def test_ops_registered_after_a_build_get_a_fresh_registry(monkeypatch, tmp_path):
    """torchao's quantized_decomposed ops appear when it is imported: a registry built before lacks them."""
    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    builds = []

    def counting(cls, *args, **kwargs):
        builds.append(1)
        return original.__func__(cls, *args, **kwargs)

    monkeypatch.setattr(runtime, "_REGISTRIES", {})
    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    model, x = _model(), torch.randn(1, 1, 8, 8)
    export_onnx(model, x, tmp_path / "warm.onnx")
    builds.clear()
    export_onnx(model, x, tmp_path / "a.onnx")
    assert builds == []  # nothing new since the warm export: its registry serves
    library = torch.library.Library("automl_test_ops", "DEF")  # noqa: F841 -- kept alive while the op is needed
    library.define("twice(Tensor x) -> Tensor")
    export_onnx(model, x, tmp_path / "b.onnx")
    assert len(builds) == 1  # a new op: built again
    export_onnx(model, x, tmp_path / "c.onnx")
    assert len(builds) == 1


def test_apply_runs_with_the_recipe_threads_and_gives_the_callers_back(task, tmp_path, monkeypatch):
    """torch's thread count is the caller's again after automl.apply (an API user's setting is theirs)."""
    from automl.recipe import Recipe, apply_recipe

    seen = []
    monkeypatch.setattr(task, "train_epoch", lambda *a, **k: seen.append(torch.get_num_threads()) or 0.0)
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": {"family": "cnn", "width": 8, "depth": 1},
                               "train": {"epochs": 1, "threads": 2}})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        apply_recipe(recipe, tmp_path, task=task)
        assert seen == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class Tokens(nn.Module):
    """A tiny vision transformer: patches, a position embedding of batch 1, attention."""

    def __init__(self, d=16):
        super().__init__()
        self.patch, self.pos = nn.Conv2d(3, d, 8, 8), nn.Parameter(torch.randn(1, 16, d))
        self.attn, self.head = nn.MultiheadAttention(d, 2, batch_first=True), nn.Linear(d, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_a_batch_of_one_example_still_exports_a_free_batch(tmp_path):
    """torch.export specialises size-1 dims: exported from one example, this model used to get a fixed
    batch of 1 and fail in onnxruntime on any other batch."""
    torch.manual_seed(0)
    model = Tokens().eval()
    artifact = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(OrtModel(artifact.path)(x.numpy()), model(x).numpy(), atol=1e-4)


class BatchConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bias = nn.Linear(48, 10), nn.Parameter(torch.zeros(2, 10))

    def forward(self, x):
        return self.fc(x.flatten(1)) + self.bias  # only right for a batch of 2


def test_a_model_whose_export_fixes_the_batch_is_refused_by_name(tmp_path):
    from automl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model: the ONNX export fixed the batch size at 2.*BatchConstant.*"
                                          r"keep the batch dimension free"):
        export_onnx(BatchConstant(), torch.randn(1, 3, 4, 4), tmp_path / "m.onnx")
