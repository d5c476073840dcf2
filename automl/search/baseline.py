"""The uncompressed reference of a search over a user's model, measured once per search.

Its deployed accuracy, latency and size are what every trial's ``accuracy_drop``, ``speedup`` and
``size_reduction`` are measured against. It is the same ``apply_recipe`` path as a trial: the model
with its trained weights, no training epochs and no compression stage, exported and measured (or
priced from the profile, as the trials are). The figures are kept in ``baseline.json`` in the run
directory, so a resumed search does not measure it again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional

from automl.io import write_json
from automl.recipe import Recipe, apply_recipe
from automl.settings import TrainSettings

BASELINE_FILE = "baseline.json"
BASELINE_DIR = "baseline"


def baseline_recipe(space) -> Recipe:
    """The user's model as given: no training, no compression."""
    return Recipe(task=space.task, family=space.family, arch={}, train=TrainSettings(epochs=0), stages=(),
                  deploy=space.deploy, model=space.model, data=space.data,
                  provenance={"space_hash": space.hash, "trial_id": "baseline"})


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
