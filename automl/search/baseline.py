"""The uncompressed reference of a search over a user's model, measured once per search.

Its deployed accuracy, latency and size are what every trial's ``accuracy_drop``, ``speedup`` and
``size_reduction`` are measured against. It is the same ``apply_recipe`` path as a trial: the model
with its trained weights, no training epochs and no compression stage, exported and measured (or
priced from the profile, as the trials are). The figures are kept in ``baseline.json`` in the run
directory, so a resumed search does not measure it again.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch

from automl.arch.user import build_user_model
from automl.errors import ConfigError
from automl.io import write_json
from automl.recipe import Recipe, apply_recipe
from automl.settings import TrainSettings
from automl.tasks.base import DatasetTask

BASELINE_FILE = "baseline.json"
BASELINE_DIR = "baseline"


def baseline_recipe(space) -> Recipe:
    """The user's model as given: no training, no compression."""
    return Recipe(task=space.task, family=space.family, arch={}, train=TrainSettings(epochs=0), stages=(),
                  deploy=space.deploy, model=space.model, data=space.data,
                  provenance={"space_hash": space.hash, "trial_id": "baseline"})


def check_user_model(space, task):
    """Before a search touches its run directory (``--force`` empties it): the user's model builds, its
    checkpoint loads, one forward pass on the task's example input runs (for our classification tasks:
    returning one logits tensor with a score per class) and torch.export traces it. Each failure is a
    ConfigError naming the model's key, the value and the fix. Returns the model (None without one)."""
    if space.model is None:
        return None
    model, x = build_user_model(space.model).eval(), task.example_input(2)
    where = f"model.{'builder' if space.model.builder else 'object'}"
    name = space.model.builder or space.model.object_class
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ConfigError(f"the model's forward failed on one input batch of the data "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", file=space.source,
                          key=where, value=name, fix="automl calls model(x) with one tensor x of the data's "
                          "input shape: give a model whose forward takes that (wrap a multi-input model)") from None
    if not _classifies(task):  # a task of the user's own defines what the outputs are
        _check_exportable(model, x, space.source, where, name)
        return model
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model must return one logits tensor (batch, classes); it returned {shape}",
                          file=space.source, key=where, value=name,
                          fix="wrap the model so forward returns only the logits (e.g. out[0] or out['logits'])")
    classes = getattr(task, "num_classes", None)
    if classes and out.shape[1] != classes:
        raise ConfigError(f"the model scores {out.shape[1]} classes but the data has {classes}", file=space.source,
                          key=where, value=name, fix="build the model with one output per class of the data "
                          "(array labels are 0..K-1: K is the largest label + 1)")
    _check_exportable(model, x, space.source, where, name)
    return model


def _classifies(task) -> bool:
    """Our data tasks (folders, arrays, loaders, digits): cross-entropy on logits, accuracy by argmax."""
    return isinstance(task, DatasetTask) and type(task).loss is DatasetTask.loss \
        and type(task).evaluate is DatasetTask.evaluate


def _check_exportable(model, x, source, where: str, name: str) -> None:
    """Every trial deploys through torch.export: a forward it cannot trace (a Python branch on a tensor's
    value, ...) is refused now, in one paragraph, instead of failing the baseline with torch's traceback."""
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch.export")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:  # they (and a print to stderr) dump the graph; the exception says it
            log.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.export.export(model, (x,), strict=False)
    except Exception as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"torch.export cannot trace the model's forward ({type(exc).__name__}: {reason[:300]})",
                          file=source, key=where, value=name,
                          fix="make the forward traceable: no Python if/for on a tensor's values (use torch.where "
                              "or torch.cond), no .item() or .tolist() on activations") from None
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def measure_baseline(space, task, run_dir: Path, costing=None, log=print) -> Optional[Dict]:
    """The baseline's metrics (None for a search over built-in families), measured at most once per run."""
    if space.model is None:
        return None
    path = Path(run_dir) / BASELINE_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("space_hash") == space.hash:
            return saved["metrics"]
    started = time.time()
    log("automl search: measuring the uncompressed model (the baseline every trial is compared with)")
    result = apply_recipe(baseline_recipe(space), Path(run_dir) / BASELINE_DIR, task=task)
    metrics = dict(result.metrics)
    if costing is not None:
        from automl.search.costing import example_batch

        metrics = costing.trial_metrics(metrics, result.model, result.artifact,
                                        example_batch(task, space.deploy.batch), space.source)
    write_json(path, {"space_hash": space.hash, "seconds": time.time() - started, "metrics": metrics})
    log(f"automl search: baseline accuracy {metrics['accuracy']:.4f}, latency {metrics['latency_ms']:.4g} ms, "
        f"size {metrics['size_kb']:.1f} kB")
    return metrics


def relative_metrics(metrics: Dict, baseline: Optional[Dict]) -> Dict[str, float]:
    """accuracy_drop, speedup and size_reduction of a trial against the baseline."""
    if not baseline:
        return {}
    out = {"accuracy_drop": float(baseline["accuracy"]) - float(metrics["accuracy"])}
    if metrics.get("latency_ms", 0) > 0 and baseline.get("latency_ms", 0) > 0:
        out["speedup"] = float(baseline["latency_ms"]) / float(metrics["latency_ms"])
    if metrics.get("size_kb", 0) > 0 and baseline.get("size_kb", 0) > 0:
        out["size_reduction"] = float(baseline["size_kb"]) / float(metrics["size_kb"])
    return out
