"""What ``automl apply`` leaves in its output directory, and loading the compressed model back.

``model.pt`` (the compressed model's state_dict) + ``structure.json`` (its layers' shapes and
replaced modules, see ``automl.arch.structure``) load into a fresh model from the recipe's builder or
family: :func:`load_model` returns the nn.Module, to train further or evaluate in PyTorch.
``model.pt2`` (torch.export) and the ONNX files load without the model's class.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from automl.arch.structure import record_structure
from automl.arch.user import APPLY_STRUCTURE, APPLY_WEIGHTS, load_checkpoint
from automl.errors import ConfigError, RunDirError
from automl.io import atomic_write_bytes, write_json
from automl.recipe.apply import ApplyResult, apply_recipe
from automl.runtime import Artifact
from automl.recipe.build import recipe_model, recipe_task
from automl.recipe.schema import Recipe
from automl.recipe.usermodel import check_user_model
from automl.validate import Where

RECIPE_FILE, METRICS_FILE, EXPORTED = "recipe.yaml", "metrics.json", "model.pt2"


def check_output(out: Path, force: bool) -> Path:
    """Refuse an --out that cannot receive the result; deletes nothing."""
    out = Path(out).resolve()
    blocker = next((p for p in [out, *out.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise RunDirError(f"--out {out}: {blocker} is a file, not a directory. Fix: choose another --out")
    if blocker is not None and not os.access(blocker, os.W_OK):
        raise RunDirError(f"--out {out}: cannot write in {blocker}. Fix: choose a directory you can write to")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RunDirError(f"output directory {out} exists and is not empty. Fix: choose another --out "
                          "or pass --force to replace it")
    return out


def _rebased(artifact: Artifact, old: Path, new: Path) -> Artifact:
    move = (lambda p: None if p is None else new / Path(p).relative_to(old))  # noqa: E731
    return dataclasses.replace(artifact, path=move(artifact.path), shipped=move(artifact.shipped),
                               files=tuple(move(f) for f in artifact.files))


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> Optional[str]:
    """Save a torch.export program (loads without the model's class); the reason when it cannot."""
    logging.getLogger("torch.export").setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
            except Exception:  # a forward that fixes the batch size: export it as it is
                program = torch.export.export(model.eval(), (example,))
            torch.export.save(program, str(path))
        return None
    except Exception as exc:  # early exit's control flow, custom ops ...: the ONNX files still load
        path.unlink(missing_ok=True)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def save_result(recipe: Recipe, result: ApplyResult, out: Path, task) -> dict:
    """model.pt, structure.json, model.pt2, recipe.yaml and metrics.json; returns the metrics written."""
    import io

    buffer = io.BytesIO()
    torch.save(result.model.state_dict(), buffer)
    atomic_write_bytes(out / APPLY_WEIGHTS, buffer.getvalue())
    record_structure(result.model, out / APPLY_STRUCTURE)
    # batch 2: torch.export specializes a dimension of size 1, and the program should take any batch
    export_error = export_program(result.model, task.example_input(2), out / EXPORTED)
    recipe.save(out / RECIPE_FILE)
    # paths relative to --out: the file that runs (ONNX, or an early-exit manifest) and what ships
    metrics = {**result.metrics, "artifact": str(result.artifact.path.relative_to(out)),
               "deployed_files": [str(f.relative_to(out)) for f in result.artifact.deployed_files()],
               "torch_files": [APPLY_WEIGHTS, APPLY_STRUCTURE] + ([] if export_error else [EXPORTED]),
               "recorded": {k: v for k, v in recipe.metrics.items() if k in result.metrics}}
    if export_error:
        metrics["torch_export_error"] = export_error
    write_json(out / METRICS_FILE, metrics)
    return metrics


def apply_to_dir(recipe: Recipe, out, *, force: bool = False, on_epoch=None, task=None, model=None,
                 price_layers=None):
    """``automl apply``: replay ``recipe`` into ``out`` and save everything there. ``model`` is the
    model object a recipe from the Python API was searched on; ``task`` replaces the recipe's task."""
    out = check_output(Path(out), force)
    if model is not None:
        if recipe.model is None:
            raise ConfigError("this recipe builds a model of a built-in family; a model object is for recipes "
                              "searched on one", key="model", value=type(model).__name__,
                              fix="call apply without model=, or give the recipe of a search on your model")
        recipe = dataclasses.replace(recipe, model=recipe.model.with_object(model))
    task = task if task is not None else recipe_task(recipe)
    check_user_model(recipe, task)  # a model that cannot take the data or export fails before any training
    # Everything is written to a staging directory beside --out and renamed into place at the end:
    # a bad recipe, a crash or Ctrl+C never costs the user the directory they had.
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        result = apply_recipe(recipe, staging, task=task, on_epoch=on_epoch, price_layers=price_layers)
        metrics = save_result(recipe, result, staging, task)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(result, artifact=_rebased(result.artifact, staging, out)), metrics


def load_model(directory, *, model: Optional[nn.Module] = None) -> nn.Module:
    """The compressed model of an ``automl apply`` directory as an nn.Module (eval mode).

    It is rebuilt from the recipe (the user's builder, or the built-in family) without the original
    checkpoint, given the recorded structure and loaded with model.pt. ``model``: a fresh instance of
    the original class, for recipes searched on a model object given to the Python API."""
    directory = Path(directory)
    if not (directory / RECIPE_FILE).is_file():
        raise ConfigError(f"not an `automl apply` output directory (no {RECIPE_FILE})", file=directory,
                          fix="give the --out directory of `automl apply`")
    if model is not None and not isinstance(model, nn.Module):
        what = f"the class {model.__name__}" if isinstance(model, type) else type(model).__name__
        raise ConfigError(f"model must be a torch.nn.Module instance, got {what}", key="model", value=what,
                          fix="pass a fresh instance: automl.load(dir, model=MyNet(...))")
    base = untrained_model(Recipe.load(directory / RECIPE_FILE), model=model)
    return load_checkpoint(base, directory, Where(str(directory), "model.pt")).eval()


def untrained_model(recipe: Recipe, task=None, *, model: Optional[nn.Module] = None) -> nn.Module:
    """A fresh model of ``recipe``'s architecture, before any weights are loaded: the user's builder
    (not its checkpoint; ``model`` replaces a model object of the Python API) or the built-in family."""
    if recipe.model is not None:
        source = recipe.model.with_object(model) if model is not None else recipe.model
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(source, checkpoint=None, sha256=None))
        return recipe_model(recipe, None)
    return recipe_model(recipe, task if task is not None else recipe_task(recipe))
