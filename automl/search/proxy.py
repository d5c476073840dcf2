"""Scoring a candidate (architecture x compression) on inherited weights in milliseconds, not seconds:
its compression stages run in PyTorch with no training (masks, thinning, low-rank ...), accuracy is
the PyTorch model's on the validation split, and latency and energy are predicted from the hardware
profile (MACs without one) for the deployed shape and precision the candidate's methods declare.
Nothing is exported: what a candidate's int8 or other deployment costs in accuracy is not seen here,
which is why the front's points are then applied, deployed and measured for real."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

from automl.compress import ApplyContext, get_method
from automl.compress.base import changes_shape
from automl.configs import config_to_dict
from automl.errors import AutoMLError
from automl.hardware.candidates import build_candidate
from automl.hardware.predict import predict_model
from automl.modelstats import count_macs, count_nonzero, count_params
from automl.recipe.apply import train_with_stages
from automl.recipe.from_config import recipe_from_config



MAX_PRICED = 100_000  # entries of a pricing cache


def bytes_per_weight(precision: str) -> float:
    """int8 -> 1, fp16 / bf16 -> 2, anything else (fp32, simulated low-bit) -> 4."""
    return 1.0 if "int8" in precision else 2.0 if precision in ("fp16", "bf16") else 4.0


def proxy_metrics(space, config: Dict, task, profile=None, *, work: Optional[Path] = None,
                  cache: Optional[Dict] = None) -> Dict[str, float]:
    """Validation accuracy of ``config`` on its inherited weights, its parameters and MACs, and, with a
    ``profile``, its predicted latency_ms and energy_mj. ``seconds`` is what scoring took."""
    started = time.perf_counter()
    recipe = recipe_from_config(space, {**config, "train.epochs": 0})
    with tempfile.TemporaryDirectory(prefix="automl-proxy-") if work is None else _keep(work) as tmp:
        ctx = ApplyContext(task=task, work_dir=Path(tmp), epochs=0, seed=recipe.train.seed,
                           threads=recipe.deploy.threads, recipe=recipe)
        model, _ = train_with_stages(recipe, task, ctx)
        accuracy = task.evaluate(model, task.val_loader())
    out = {"accuracy": accuracy, **priced_metrics(space, config, task, profile, cache)}
    # what ships, estimated: the non-zero weights (pruned ones compress away) at the deployed width
    out["size_kb"] = count_nonzero(model) * bytes_per_weight(out.pop("precision")) / 1024.0
    out["seconds"] = time.perf_counter() - started
    return out


def priced_metrics(space, config: Dict, task, profile=None, cache: Optional[Dict] = None) -> Dict:
    """What a candidate costs without its weights: parameters and MACs of its deployed shape, and with a
    ``profile`` its predicted latency_ms and energy_mj; ``precision`` is the one it deploys at. With a
    ``cache`` (one per space and profile), candidates that deploy the same structure at the same precision
    are priced once (``cost_key``)."""
    key = cost_key(space, config) if cache is not None else None
    if key is not None and key in cache:
        return dict(cache[key])
    out = _price(space, config, task, profile)
    if key is not None and len(cache) < MAX_PRICED:
        cache[key] = dict(out)
    return out


def cost_key(space, config: Dict) -> Optional[tuple]:
    """What the deployed cost depends on: the architecture, the options of the stages that change the
    structure (Method.deployed_shape) and the precision each stage deploys at; None when a stage cannot
    say (the candidate is then priced on its own)."""
    recipe = recipe_from_config(space, config)
    stages = []
    for stage in recipe.stages:
        handler = get_method(stage.method).handler_cls
        try:
            precision = handler.profile_precision(stage.config)
        except AutoMLError:
            return None
        options = json.dumps(config_to_dict(stage.config), sort_keys=True) if changes_shape(handler) else None
        stages.append((stage.method, precision, options))
    return json.dumps(recipe.arch, sort_keys=True, default=str), tuple(stages)


def _price(space, config: Dict, task, profile) -> Dict:
    cand = build_candidate(space, config, task=task)
    out = {"params": float(count_params(cand.model)), "macs": float(count_macs(cand.model, cand.example[:1])),
           "precision": cand.precision}
    if profile is not None:
        prediction = predict_model(profile, cand.model, cand.example, cand.precision, space=space.source)
        out["latency_ms"] = prediction.latency_ms
        if prediction.energy_mj is not None:
            out["energy_mj"] = prediction.energy_mj
    return out


def predicted_metrics(space, config: Dict, task, predictor, profile=None, cache: Optional[Dict] = None) -> Dict:
    """A candidate scored without its weights: accuracy and size from ``predictor`` (automl.search.predictor),
    cost as priced_metrics gives it."""
    started = time.perf_counter()
    out = priced_metrics(space, config, task, profile, cache)
    out.pop("precision")
    out.update(predictor.predict([config])[0], predicted=1.0, seconds=time.perf_counter() - started)
    return out


class _keep:
    """A context manager yielding an existing directory (a caller-owned work dir)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self):
        self.path.mkdir(parents=True, exist_ok=True)
        return str(self.path)

    def __exit__(self, *exc):
        return False


def safe_proxy(space, config, task, profile=None, predictor=None, cache: Optional[Dict] = None) -> Dict:
    """proxy_metrics (predicted_metrics with a ``predictor``), or ``{"error": ...}`` for a candidate its
    methods refuse on its architecture."""
    try:
        if predictor is not None:
            return predicted_metrics(space, config, task, predictor, profile, cache)
        return proxy_metrics(space, config, task, profile, cache=cache)
    except AutoMLError as exc:
        return {"error": str(exc)[:500]}


__all__ = ["predicted_metrics", "priced_metrics", "proxy_metrics", "safe_proxy"]
