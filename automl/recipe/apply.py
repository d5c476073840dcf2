"""Replay a Recipe: build, train with compression stages on their epochs, deploy, evaluate, measure.

This is the only code path that runs compression handlers; the search trial and ``automl apply``
both call :func:`apply_recipe`.
"""
from __future__ import annotations

import math
import random
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from automl.compress import ApplyContext
from automl.compress.base import check_stage_combination
from automl.compress.early_exit.method import RUNTIME as EARLY_EXIT_RUNTIME
from automl.compress.schedule import build_scheduler
from automl.errors import MeasurementError
from automl.modelstats import count_macs, count_nonzero, count_params
from automl.recipe.build import recipe_model, recipe_task
from automl.recipe.schema import Recipe
from automl.runtime import Artifact, OrtModel, export_onnx, measure_latency
from automl.runtime.threads import torch_threads
from automl.tasks.augment import augmented
from automl.validate import Where

EpochCallback = Callable[[int, Dict[str, float]], None]


@dataclass
class ApplyResult:
    metrics: Dict[str, float]
    model: torch.nn.Module
    artifact: Artifact


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(model, train, extra=()):
    params = list(model.parameters()) + list(extra)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)


def train_with_stages(recipe: Recipe, task, ctx: ApplyContext, on_epoch: Optional[EpochCallback] = None):
    """Train for ``recipe.train.epochs`` with every stage's hooks and the recipe's schedule policies;
    returns (model, handlers)."""
    seed_everything(recipe.train.seed)
    model = recipe_model(recipe, task)
    loader = augmented(task.train_loader(batch_size=recipe.train.batch_size, seed=recipe.train.seed),
                       recipe.train.augment, recipe.train.seed)
    ctx.steps_per_epoch = len(loader)
    if ctx.load_teacher is None:  # distillation replays recipes: this layer, not compress/, knows how
        from automl.recipe.teacher import load_teacher

        ctx.load_teacher = load_teacher
    handlers = [stage.handler() for stage in recipe.stages]
    for h in handlers:
        model = h.prepare(model, ctx)
    extra = [p for h in handlers for p in h.trainable_parameters()]
    optimizer = _optimizer(model, recipe.train, extra)
    scheduler = build_scheduler(recipe.schedule, model, optimizer, epochs=recipe.train.epochs,
                                where=Where(key="schedule"))
    # a schedule with its own lr policy owns the learning rate; otherwise cosine over the whole run
    cosine = None if any(s.policy == "lr" for s in recipe.schedule) else \
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(recipe.train.epochs, 1))
    val = task.val_loader()
    epoch = 0

    def after_step():
        scheduler.on_minibatch_end(epoch, 0)
        for h in handlers:
            h.after_step(model)

    def loss_hook(x, y, output, loss):
        loss = scheduler.before_backward(epoch, 0, loss)
        for h in handlers:
            loss = h.adjust_loss(model, x, y, output, loss)
        return loss

    # only pass the hook when something uses it, so tasks written before it existed keep working
    hooks = {"loss_hook": loss_hook} if recipe.schedule or any(h.adjusts_loss for h in handlers) else {}
    for epoch in range(recipe.train.epochs):
        for h in handlers:
            h.on_epoch_start(model, epoch, ctx)
        scheduler.on_epoch_begin(epoch)
        loss = task.train_epoch(model, optimizer, loader, after_step=after_step, **hooks)
        scheduler.on_epoch_end(epoch)
        if cosine is not None:
            cosine.step()
        if not math.isfinite(loss):
            raise MeasurementError(f"training loss became {loss} in epoch {epoch}; lower train.lr")
        if on_epoch is not None:
            on_epoch(epoch, {"accuracy": task.evaluate(model, val), "train_loss": loss})
    for h in handlers:
        model = h.finalize(model, ctx)
    return model.eval(), handlers


def deployed_runner(artifact: Artifact, task, deploy):
    """(predict function, latency dict) of the deployed artifact.

    A model with data-dependent cost (early exit) is timed as the mean over the test split in
    batches of ``deploy.batch``; any other on one example batch (runtime.measure_latency)."""
    if artifact.runtime == EARLY_EXIT_RUNTIME:
        from automl.compress.early_exit.export import EarlyExitRunner, mean_latency

        runner = EarlyExitRunner.load(artifact.path.parent, threads=deploy.threads)
        samples = torch.cat([x for x, _ in task.test_loader()])
        return runner.predict, mean_latency(runner, samples, batch=deploy.batch, rounds=3)
    runner = OrtModel(artifact.path, threads=deploy.threads)
    return runner, measure_latency(runner, task.example_input(deploy.batch).numpy())


def deployed_metrics(artifact: Artifact, task, deploy) -> Dict[str, float]:
    """Accuracy, size and measured latency of the deployed artifact."""
    predict, latency = deployed_runner(artifact, task, deploy)
    data = [path.read_bytes() for path in artifact.deployed_files()]  # size what ships
    return {
        "accuracy": task.evaluate(predict, task.val_loader()),
        "test_accuracy": task.evaluate(predict, task.test_loader()),
        "latency_ms": latency["median_ms"],
        "latency_p10_ms": latency["p10_ms"],
        "latency_p90_ms": latency["p90_ms"],
        "file_kb": sum(len(d) for d in data) / 1024.0,
        "size_kb": sum(len(zlib.compress(d, 9)) for d in data) / 1024.0,
    }


SLOWER_BELOW = 0.95  # speed-up under which the warning is given: 5 % is beyond run-to-run noise


def against_float(float_artifact: Artifact, artifact: Artifact, deployed_ms: float, task, deploy) -> Dict:
    """The latency of a deployed graph that a method rewrote (int8, fp16 ...) against the fp32 ONNX export
    it came from (same runtime, threads and batch): ``float_latency_ms``, ``speedup_vs_float``, and a
    ``warning`` when it deploys measurably slower (a speed-up under ``SLOWER_BELOW``): int8 does on small
    models and on graphs whose quantize/dequantize steps outweigh the int8 arithmetic. Graphs deployed
    as exported (fp32, simulated low-bit, shared weights) have nothing to compare."""
    if artifact.path == float_artifact.path or artifact.runtime != "onnxruntime" or not float_artifact.path.is_file():
        return {}
    runner = OrtModel(float_artifact.path, threads=deploy.threads)
    float_ms = measure_latency(runner, task.example_input(deploy.batch).numpy())["median_ms"]
    out = {"float_latency_ms": float_ms, "speedup_vs_float": float_ms / deployed_ms}
    if deployed_ms * SLOWER_BELOW > float_ms:
        out["warning"] = (f"the {artifact.precision} model is SLOWER than its float form ({deployed_ms:.4g} vs "
                          f"{float_ms:.4g} ms, batch {deploy.batch}, {deploy.threads} thread(s)): ship the float "
                          "model for speed, or keep this one for size only")
    return out


@contextmanager
def timed(seconds: Dict[str, float], phase: str):
    """Adds the wall time of the block to ``seconds[phase]``: a trial's metrics say where its time went."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - started


def apply_recipe(recipe: Recipe, work_dir, *, task=None, on_epoch: Optional[EpochCallback] = None,
                 cache_dir=None, price_layers=None) -> ApplyResult:
    """Rebuild, train, compress, export and measure. Files go to ``work_dir``; trained distillation
    teachers are cached in ``cache_dir`` (default ``work_dir/cache``). The metrics carry the wall
    seconds of each phase (``train_s``, ``export_s``, ``deploy_s``, ``measure_s``). Runs with the recipe's
    torch threads; the caller's setting is restored after. ``price_layers`` (automl.hardware.layer_costs)
    prices layers for stages that weigh them by a hardware profile."""
    with torch_threads(recipe.train.threads or recipe.deploy.threads):
        return _apply(recipe, Path(work_dir), task, on_epoch, cache_dir, price_layers)


def _apply(recipe: Recipe, work_dir: Path, task, on_epoch, cache_dir, price_layers) -> ApplyResult:
    work_dir.mkdir(parents=True, exist_ok=True)
    check_stage_combination(s.method for s in recipe.stages)
    task = task if task is not None else recipe_task(recipe)
    ctx = ApplyContext(task=task, work_dir=work_dir, epochs=recipe.train.epochs, seed=recipe.train.seed,
                       threads=recipe.deploy.threads, recipe=recipe, cache_dir=cache_dir, price_layers=price_layers)
    seconds: Dict[str, float] = {}
    with timed(seconds, "train_s"):
        model, handlers = train_with_stages(recipe, task, ctx, on_epoch)
    example = task.example_input(1)
    with timed(seconds, "export_s"):
        artifact = float_artifact = export_onnx(model, example, work_dir / "model.onnx")
    ctx.model = model
    with timed(seconds, "deploy_s"):
        for h in handlers:
            artifact = h.deploy(artifact, ctx)
    with timed(seconds, "measure_s"):
        deployed = deployed_metrics(artifact, task, recipe.deploy)
        deployed.update(against_float(float_artifact, artifact, deployed["latency_ms"], task, recipe.deploy))
    metrics = {
        **deployed,
        **seconds,
        "torch_accuracy": task.evaluate(model, task.val_loader()),
        "params": count_params(model),
        "nonzero_params": count_nonzero(model),
        "macs": count_macs(model, example),
        "precision": artifact.precision,
    }
    for h in handlers:
        metrics.update(h.stats)
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise MeasurementError(f"non-finite metrics {bad}: {metrics}")
    return ApplyResult(metrics=metrics, model=model, artifact=artifact)
