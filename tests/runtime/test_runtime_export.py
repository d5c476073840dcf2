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
