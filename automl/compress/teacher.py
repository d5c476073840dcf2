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

Trained teachers (``self`` and recipe teachers) are pickled into the cache directory under a hash of
everything that determines them, written atomically; a later trial with the same teacher loads it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import torch
import torch.nn as nn

from automl.errors import ConfigError
from automl.io import atomic_write_bytes

KEY = "distillation.teacher"


def teacher_recipe(spec: str, recipe, teacher_epochs: int = 0):
    """The Recipe that trains the teacher, or None when ``spec`` names a trained checkpoint."""
    from automl.recipe.schema import Recipe

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
    """A model rebuilt from an ``automl apply`` directory's recipe.yaml with its model.pt weights."""
    from automl.recipe.schema import Recipe

    from automl.recipe.build import recipe_model

    weights, recipe_path = _checkpoint_files(spec)
    recipe = Recipe.load(recipe_path)
    model = recipe_model(recipe, task)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"the teacher weights do not fit the architecture in {recipe_path} ({first})",
                          key=KEY, value=spec,
                          fix="a thinned, factorized or quantized model changes its layers: give the recipe "
                              "YAML as the teacher instead, so it is rebuilt by replaying the recipe") from None
    return model


def _cache_key(recipe) -> str:
    body = {k: v for k, v in recipe.to_dict().items() if k not in ("provenance", "metrics")}
    body["torch"] = torch.__version__
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_teacher(recipe, task, work_dir: Path, cache_dir: Path) -> nn.Module:
    """Replay ``recipe`` without export, through the cache."""
    from automl.compress.base import ApplyContext
    from automl.recipe.apply import train_with_stages

    path = Path(cache_dir) / f"teacher-{_cache_key(recipe)}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a cache file from another version: train again and overwrite it
            pass
    rng = torch.get_rng_state()  # the student's run must not depend on whether the cache was warm
    try:
        ctx = ApplyContext(task=task, work_dir=Path(work_dir) / "teacher", epochs=recipe.train.epochs,
                           seed=recipe.train.seed, recipe=recipe, cache_dir=cache_dir)
        model, _ = train_with_stages(recipe, task, ctx)
    finally:
        torch.set_rng_state(rng)
    buffer = io.BytesIO()
    try:
        torch.save(model, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    except Exception:  # a model that cannot be pickled is simply not cached
        pass
    return model


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


def check_outputs_match(teacher: nn.Module, student: nn.Module, example: torch.Tensor, spec: str):
    """The teacher must produce logits of the student's shape."""
    was_training = student.training
    with torch.no_grad():
        t_out, s_out = teacher(example), student.eval()(example)
    student.train(was_training)
    t_shape = tuple(t_out.shape) if isinstance(t_out, torch.Tensor) else type(t_out).__name__
    s_shape = tuple(s_out.shape) if isinstance(s_out, torch.Tensor) else type(s_out).__name__
    if t_shape != s_shape:
        raise ConfigError(f"the teacher outputs {t_shape}, the student {s_shape}", key=KEY, value=spec,
                          fix="use a teacher classifier trained on the same task")


__all__ = ["check_outputs_match", "load_checkpoint", "load_teacher", "teacher_recipe", "train_teacher"]
