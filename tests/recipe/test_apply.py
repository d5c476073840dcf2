"""apply_recipe end to end: deterministic replay, real int8 kernels, the CLI's apply."""
import json
import logging

import onnx
import pytest
from cli_helpers import run_cli

from automl.recipe import Recipe, apply_recipe, recipe_from_config
from automl.spaces import load_default_space


def _recipe(**overrides):
    space = load_default_space()
    config = {"arch.width": 16, "arch.depth": 2, "arch.kernel": 3, "arch.pooling": "max",
              "train.epochs": 6, "train.lr": 5e-3, "train.batch_size": 32,
              "pruning.method": "none", "quantization.method": "none", **overrides}
    return recipe_from_config(space, config)


def test_apply_is_deterministic_and_accurate(task, tmp_path):
    recipe = _recipe()
    seen = []
    first = apply_recipe(recipe, tmp_path / "a", task=task, on_epoch=lambda e, m: seen.append(e))
    second = apply_recipe(recipe, tmp_path / "b", task=task)
    assert seen == list(range(6))
    assert first.metrics["accuracy"] == second.metrics["accuracy"]
    assert first.metrics["test_accuracy"] == second.metrics["test_accuracy"]
    assert first.metrics["accuracy"] >= 0.9
    assert first.metrics["precision"] == "fp32"
    assert first.metrics["latency_ms"] > 0 and first.metrics["size_kb"] > 0
    assert first.metrics["nonzero_params"] == first.metrics["params"]
    assert "speedup_vs_float" not in first.metrics  # a float model is not compared with itself
    phases = [first.metrics[k] for k in ("train_s", "export_s", "deploy_s", "measure_s")]
    assert all(s >= 0 for s in phases) and first.metrics["train_s"] > 0 and first.metrics["export_s"] > 0


@pytest.mark.parametrize("mode,op", [("static", "QuantizeLinear"), ("dynamic", "ConvInteger")])
def test_int8_ptq_runs_int8_kernels(task, tmp_path, mode, op):
    recipe = _recipe(**{"quantization.method": "int8_ptq", "quantization.mode": mode})
    root, before = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.INFO)
    try:
        result = apply_recipe(recipe, tmp_path, task=task)
        assert root.level == logging.INFO  # the user's logging left as it was
    finally:
        root.setLevel(before)
    ops = {n.op_type for n in onnx.load(str(result.artifact.path)).graph.node}
    assert op in ops
    assert result.metrics["precision"] == f"int8_{mode}"
    # int8 costs little accuracy relative to the float model it came from
    assert result.metrics["accuracy"] >= result.metrics["torch_accuracy"] - 0.02
    assert result.metrics["int8_parity"] >= 0.95  # the int8 model predicts what the float model predicts
    m = result.metrics  # timed against its own float form, with a warning when slower
    assert m["speedup_vs_float"] == pytest.approx(m["float_latency_ms"] / m["latency_ms"])
    assert ("warning" in m) == (m["speedup_vs_float"] < 0.95)
    assert m["deploy_s"] > 0  # the int8 conversion is its own phase


def test_magnitude_pruning_reaches_ratio_and_keeps_accuracy(task, tmp_path):
    recipe = _recipe(**{"pruning.method": "magnitude", "pruning.ratio": 0.7, "pruning.finetune_epochs": 2})
    assert recipe.stages[0].start_epoch == 4
    result = apply_recipe(recipe, tmp_path, task=task)
    assert result.metrics["pruned_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert result.metrics["nonzero_params"] < 0.4 * result.metrics["params"]
    assert result.metrics["accuracy"] >= 0.85


def test_cli_apply_writes_metrics_and_model(tmp_path):
    recipe = _recipe(**{"train.epochs": 2, "quantization.method": "int8_ptq", "quantization.mode": "static"})
    recipe.save(tmp_path / "r.yaml")
    out = tmp_path / "out"
    proc = run_cli("apply", tmp_path / "r.yaml", "--out", out)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / metrics["artifact"]).is_file() and (out / "model.pt").is_file()
    assert Recipe.load(out / "recipe.yaml") == recipe
    assert ("WARNING: the int8_static model is SLOWER" in proc.stderr) == (metrics["speedup_vs_float"] < 0.95)
    again = run_cli("apply", tmp_path / "r.yaml", "--out", out)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
