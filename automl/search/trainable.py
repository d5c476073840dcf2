"""The Ray Tune trainable: trial config -> Recipe -> ``apply_recipe`` -> ``tune.report``."""
from __future__ import annotations

import functools
import importlib
import shutil
import tempfile
from pathlib import Path
from typing import Dict

from ray import tune

from automl.recipe.teacher import teacher_entries
from automl.errors import MeasurementError
from automl.hardware.layer_costs import price_layers
from automl.recipe import apply_recipe, recipe_from_config
from automl.runtime import warm_onnx_exporter
from automl.search.baseline import relative_metrics
from automl.search.costing import example_batch
from automl.search.isolate import run_in_child
from automl.search.teachers import fetch, publish
from automl.search.pareto import feasible
from automl.search.pareto_asha import COST_KEY, predicted_cost
from automl.spaces import SearchSpace


# Imported once in the worker, so each trial's forked child starts with them: cold, they cost a
# trial 2-4 s (torch.onnx's exporter, dynamo, onnxscript's op library).
WARM_MODULES = ("onnx", "onnxruntime", "onnxruntime.quantization", "torch._dynamo", "torch.export",
                "torch.onnx._internal.exporter._core", "onnxscript.function_libs.torch_lib.ops")


@functools.cache  # once per worker process: a warm exporter costs 0.8 s per export even when cached
def _warm_up():
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a module another torch version moved: only the warm-up is lost
            continue
    warm_onnx_exporter()


def run_trial(config: Dict, space: SearchSpace = None, task=None, costing=None, teachers=None, baseline=None,
              driver=None):
    """One trial. Reports validation accuracy every epoch (for ASHA), then the deployed metrics.

    With a ``costing`` (a hardware profile), latency_ms and energy_mj are predicted for the trained,
    compressed model; a profile that cannot price it fails the trial with its ProfileError. With a
    ``baseline`` (a search over a user's model) the trial also reports accuracy_drop, speedup and
    size_reduction against it. The work runs in a child process (``isolate``), so a trial whose
    process dies says how; distillation teachers come from and go to the search's ``teachers`` store."""
    trial_id = tune.get_context().get_trial_id()
    _warm_up()
    recipe = recipe_from_config(space, config, provenance={"trial_id": trial_id})
    work = Path(tempfile.mkdtemp(prefix=f"automl-{trial_id}-"))
    cache, entries = work / "cache", teacher_entries(recipe)
    extra, final = {}, {}
    if space.budget.scheduler == "pareto":  # the scheduler ranks every epoch on accuracy and this cost
        cost = predicted_cost(space, config, task, costing)
        extra = {} if cost is None else {COST_KEY: cost}
    try:
        if teachers is not None and entries:
            final["teachers_reused"] = fetch(teachers, entries, cache)

        def report(metrics):  # the final report also says how many teachers came trained from the store
            tune.report({**metrics, **extra, **(final if metrics.get("final") else {})})

        try:
            run_in_child(lambda send: _trial(recipe, space, task, costing, baseline, work, cache, send), report,
                         driver=driver)
        finally:
            if teachers is not None and entries:
                publish(teachers, entries, cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _trial(recipe, space, task, costing, baseline, work, cache, send):

    def on_epoch(epoch: int, metrics: Dict[str, float]):
        # The last epoch is reported with the deployed metrics, so an ASHA rung at max_t sees a
        # finished trial and never stops one that only needed deploying.
        if epoch + 1 < recipe.train.epochs:
            send({**metrics, "epoch": epoch + 1, "final": False})

    # a stage's `profile: auto` is the profile this search prices its trials with
    pricer = price_layers if costing is None else functools.partial(price_layers, auto=costing.profile)
    result = apply_recipe(recipe, work / "apply", task=task, on_epoch=on_epoch, cache_dir=cache,
                          price_layers=pricer)
    metrics = dict(result.metrics)
    if costing is not None:
        metrics = costing.trial_metrics(metrics, result.model, result.artifact,
                                        example_batch(task, space.deploy.batch), space.source)
    metrics.update(relative_metrics(metrics, baseline))
    metrics.update(epoch=recipe.train.epochs, final=True, feasible=feasible(metrics, space.constraints))
    check_above_chance(metrics.get("accuracy"), getattr(task, "num_classes", None))
    send(metrics)


CHANCE_MARGIN = 0.02


def check_above_chance(accuracy, num_classes) -> None:
    """A model no better than guessing fails its trial: being fast, it would otherwise land on the front."""
    if accuracy is None or not num_classes:
        return
    chance = 1.0 / num_classes
    if accuracy <= chance + CHANCE_MARGIN:
        raise MeasurementError(f"validation accuracy {accuracy:.4f} is at chance level (1/{num_classes} classes "
                               f"= {chance:.4f}, margin {CHANCE_MARGIN}): the model does not predict. Fix: lower "
                               "train.lr or remove the stage that broke it (see the trial's metrics)")
