"""Distillation teachers: where a trained teacher comes from, and a cache so a search trains it once.

A teacher spec is one of:

- ``self``: for a user's model (``model:``) with a checkpoint, that model with its trained weights;
  for a user's model without one (a search from scratch), that model trained first as below; for a
  built-in family, the uncompressed model of the recipe's own architecture, trained first with the
  recipe's training settings (``teacher_epochs`` may override the epochs) and no compression stages;
- a recipe YAML path: that recipe is replayed (training and compression stages, no export) and its
  final torch model teaches;
- an ``automl apply`` output directory, or the ``model.pt`` in one: the architecture comes from the
  ``recipe.yaml`` beside it and the weights from ``model.pt``.

Trained teachers (``self`` and recipe teachers) are stored in the cache directory under a hash of
everything that determines them, as a state_dict and the layers' structure (nothing pickled, read
with weights_only=True), written as one directory renamed into place; a later trial with the same
teacher rebuilds the model from the recipe and loads them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from automl.compress.base import ApplyContext
from automl.errors import ConfigError
from automl.io import atomic_write_bytes
from automl.recipe.schema import Recipe
from automl.validate import Where

KEY = "distillation.teacher"
LOG = logging.getLogger(__name__)


def teacher_recipe(spec: str, recipe, teacher_epochs: int = 0):
    """The Recipe that trains the teacher, or None when ``spec`` names a trained checkpoint."""
    if spec == "self" and recipe.model is not None and recipe.model.has_weights:
        return None  # the user's trained model teaches as it is
    if spec == "self":
        train = recipe.train
        if teacher_epochs:
            train = dataclasses.replace(train, epochs=teacher_epochs)
        return Recipe(task=recipe.task, family=recipe.family, arch=dict(recipe.arch), train=train,
                      deploy=recipe.deploy, model=recipe.model, data=recipe.data)
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError("teacher recipe not found", key=KEY, value=spec,
                              fix="give an existing recipe YAML path, 'self', or an `automl apply` output directory")
        return Recipe.load(path)
    return None


def _checkpoint_files(spec: str):
    path = Path(spec)
    directory = path if path.is_dir() else path.parent
    weights = path if path.is_file() else directory / "model.pt"
    recipe = directory / "recipe.yaml"
    if not weights.is_file() or not recipe.is_file():
        raise ConfigError("teacher checkpoint not found", key=KEY, value=spec,
                          fix="use 'self', a recipe YAML path, or a directory written by `automl apply --out DIR` "
                              "(it holds model.pt and recipe.yaml)")
    return weights, recipe


def load_checkpoint(spec: str, task) -> nn.Module:
    """A model rebuilt from an ``automl apply`` directory: recipe.yaml's architecture, the thinned
    shapes in structure.json, the weights of model.pt (read with weights_only=True)."""
    from automl.arch.user import APPLY_STRUCTURE, load_checkpoint as load_weights
    from automl.recipe.saved import untrained_model

    weights, recipe_path = _checkpoint_files(spec)
    model = untrained_model(Recipe.load(recipe_path), task)
    source = weights.parent if (weights.parent / APPLY_STRUCTURE).is_file() else weights
    return load_weights(model, source, Where(str(weights), KEY))


def _cache_key(recipe) -> str:
    body = {k: v for k, v in recipe.to_dict().items() if k not in ("provenance", "metrics")}
    body["torch"] = torch.__version__
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_entries(recipe) -> list:
    """The cache entry names of the teachers ``recipe``'s stages train (a trained checkpoint needs none),
    so a search can bring them to a trial before it starts and share the ones it trained."""
    names = []
    for stage in recipe.stages:
        spec = getattr(stage.config, "teacher", None)
        if not isinstance(spec, str):
            continue
        try:
            trained = teacher_recipe(spec, recipe, getattr(stage.config, "teacher_epochs", 0))
        except ConfigError:  # the trial itself reports it
            continue
        if trained is not None:
            names.append(f"teacher-{_cache_key(trained)}")
    return names


def train_teacher(recipe, task, work_dir: Path, cache_dir: Path) -> nn.Module:
    """Replay ``recipe`` without export, through the cache."""
    from automl.recipe.apply import train_with_stages

    entry = Path(cache_dir) / f"teacher-{_cache_key(recipe)}"
    if entry.is_dir():
        return _cached(recipe, task, entry)
    rng = torch.get_rng_state()  # the student's run must not depend on whether the cache was warm
    try:
        ctx = ApplyContext(task=task, work_dir=Path(work_dir) / "teacher", epochs=recipe.train.epochs,
                           seed=recipe.train.seed, recipe=recipe, cache_dir=cache_dir)
        model, _ = train_with_stages(recipe, task, ctx)
    finally:
        torch.set_rng_state(rng)
    _store(model, recipe, task, entry)
    return model


def _cached(recipe, task, entry: Path) -> nn.Module:
    """The teacher stored in ``entry``: weights only, into a model rebuilt from the recipe."""
    from automl.arch.user import load_checkpoint as load_weights
    from automl.recipe.saved import untrained_model

    try:
        return load_weights(untrained_model(recipe, task), entry, Where(str(entry), KEY))
    except ConfigError as exc:
        raise ConfigError(f"the cached distillation teacher does not load: {exc.message}", file=entry,
                          fix="delete that directory; the teacher is trained again") from None


def _store(model: nn.Module, recipe, task, entry: Path):
    """Write the teacher's state_dict and structure into a fresh directory, renamed into place once it
    is known to load back (a model whose layers automl cannot rebuild is not cached: it is said)."""
    from automl.arch.structure import record_structure
    from automl.arch.user import APPLY_STRUCTURE, APPLY_WEIGHTS

    staging = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        atomic_write_bytes(staging / APPLY_WEIGHTS, buffer.getvalue())
        record_structure(model, staging / APPLY_STRUCTURE)
        _cached(recipe, task, staging)
        os.replace(staging, entry)
    except ConfigError as exc:
        LOG.warning("the distillation teacher is not cached (%s); each trial trains it again", exc.message)
    except OSError as exc:
        if not entry.is_dir():  # another trial stored the same teacher first: that one is kept
            LOG.warning("the distillation teacher is not cached (%s)", exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_teacher(spec: str, ctx, teacher_epochs: int = 0) -> nn.Module:
    """The trained teacher for ``spec`` (see the module docstring), frozen in eval mode."""
    if ctx.recipe is None:
        raise ConfigError("distillation needs the recipe being applied to build its teacher", key=KEY,
                          value=spec, fix="run distillation through recipe.apply_recipe")
    recipe = teacher_recipe(spec, ctx.recipe, teacher_epochs)
    if recipe is None and spec == "self":
        from automl.arch.user import build_user_model

        teacher = build_user_model(ctx.recipe.model)
    elif recipe is None:
        teacher = load_checkpoint(spec, ctx.task)
    else:
        if recipe.task != ctx.recipe.task:
            raise ConfigError(f"the teacher recipe is for task '{recipe.task}', the student's for "
                              f"'{ctx.recipe.task}'", key=KEY, value=spec, fix="use a teacher trained on the same task")
        cache = Path(ctx.cache_dir) if ctx.cache_dir is not None else Path(ctx.work_dir) / "cache"
        teacher = train_teacher(recipe, ctx.task, ctx.work_dir, cache)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


__all__ = ["load_checkpoint", "load_teacher", "teacher_entries", "teacher_recipe", "train_teacher"]
