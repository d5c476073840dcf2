"""``--measure-front``: every Pareto point's recipe is applied again and its deployed model measured
for real, then compared with the latency the profile predicted for it during the search.

The deployed models are timed with the profile's own protocol (interleaved, chunk by chunk, a chunk
measured again when the reference layer shows the machine drifted), the protocol the profile's
whole-model correction was fitted with, so the error says how well the prediction holds and not
how two timing loops differ. The latency ``apply_recipe`` measured is kept beside it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from automl.hardware.profile import HardwareProfile, cpu_model
from automl.search.costing import Costing, example_batch

FRONT_DIR = "front_measured"
TOLERANCE = 0.10


def time_artifacts(paths: Sequence[Path], x: np.ndarray, profile: HardwareProfile) -> List[float]:
    """Median latency (ms) of each deployed ONNX file under the profile's protocol."""
    from automl.hardware.measure import time_with_reference
    from automl.runtime import OrtModel

    proto, threads = profile.protocol, profile.device.threads
    out: List[float] = []
    for start in range(0, len(paths), proto.chunk):
        chunk = list(paths[start:start + proto.chunk])
        with tempfile.TemporaryDirectory(prefix="automl-front-") as tmp:
            runners = {f"m{i}": (lambda m=OrtModel(p, threads=threads): m(x)) for i, p in enumerate(chunk)}
            stats, _ = time_with_reference(runners, profile.device.runtime, threads, proto, Path(tmp))
        out += [stats[f"m{i}"].median_ms for i in range(len(chunk))]
    return out


def compare(rows: List[Dict], tolerance: float = TOLERANCE) -> Dict:
    """Per-point error (predicted - measured) / measured and the share within +-tolerance."""
    for r in rows:
        r["error"] = (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"]
    errors = np.array([r["error"] for r in rows], dtype=float)
    if not rows:
        return {"points": 0, "within_10pct": None, "mean_error": None, "max_abs_error": None, "rows": []}
    return {"points": len(rows), "within_10pct": float(np.mean(np.abs(errors) <= tolerance + 1e-12)),
            "mean_error": float(np.mean(errors)), "max_abs_error": float(np.max(np.abs(errors))), "rows": rows}


def measure_front(run_dir, space, front: Sequence[Dict], costing: Costing, *, task=None,
                  apply_fn: Optional[Callable] = None, time_fn: Optional[Callable] = None,
                  log: Callable[[str], None] = print) -> Dict:
    """Apply each front recipe (``recipes/<trial>.yaml``) into ``front_measured/<trial>/``, time the
    deployed models and compare with the trials' predicted ``latency_ms``."""
    from automl.recipe import Recipe, apply_recipe

    run_dir = Path(run_dir)
    apply_fn = apply_fn or apply_recipe
    task = task if task is not None else space.build_task()
    applied = []
    for i, r in enumerate(front):
        tid = r["trial_id"]
        log(f"measure-front [{i + 1}/{len(front)}]: applying recipes/{tid}.yaml")
        recipe = Recipe.load(run_dir / "recipes" / f"{tid}.yaml")
        applied.append((r, apply_fn(recipe, run_dir / FRONT_DIR / tid, task=task)))
    x = example_batch(task, space.deploy.batch).numpy().astype(np.float32)
    timed = (time_fn or time_artifacts)([res.artifact.path for _, res in applied], x, costing.profile)
    rows = [{"trial_id": r["trial_id"], "precision": res.metrics.get("precision"),
             "predicted_ms": float(r["metrics"]["latency_ms"]), "measured_ms": float(ms),
             "apply_latency_ms": res.metrics.get("latency_ms"),
             "predicted_energy_mj": r["metrics"].get("energy_mj"),
             "search_accuracy": r["metrics"].get("accuracy"), "measured_accuracy": res.metrics.get("accuracy")}
            for (r, res), ms in zip(applied, timed)]
    here = cpu_model()
    out = compare(rows)
    out.update(tolerance=TOLERANCE, measured_on=here, same_cpu=here == costing.profile.device.cpu_model,
               protocol="the profile's whole-model protocol (interleaved medians, drift re-measured)",
               artifacts=f"{FRONT_DIR}/<trial>/")
    return out
