"""The Python API for a model you already have: objects in, no files needed.

    import automl
    outcome = automl.search_compression(model, train_loader, val_loader, out="runs/mine", max_drop=0.01)
    best = outcome.report["within_budget"]["fastest"]
    result, metrics = automl.apply(f"runs/mine/recipes/{best['trial_id']}.yaml", "model/", model=model,
                                   train_loader=train_loader, val_loader=val_loader)
    compressed = automl.load("model/", model=model_class())   # the nn.Module, thinned

``model`` is your trained nn.Module (every trial starts from a copy of it); the loaders yield
(inputs, labels) batches. A search over a builder function and data files is the same with
``automl.spaces.user.user_space(...)`` + ``automl.search.run_search``, which is what the CLI does.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.nn as nn

from automl.arch.user import class_name
from automl.hardware.layer_costs import price_layers
from automl.recipe.saved import apply_to_dir, load_model
from automl.recipe.schema import Recipe
from automl.tasks import LOADERS_TASK
from automl.tasks.data import LoaderTask


def search_compression(model: nn.Module, train_loader, val_loader, test_loader=None, *, out, space=None,
                       max_drop: Optional[float] = None, epochs: Optional[int] = None, trials: Optional[int] = None,
                       concurrency: Optional[int] = None, profile=None, address: Optional[str] = None,
                       force: bool = False):
    """Search compression policies for ``model`` (see the module docstring); returns the SearchOutcome.

    ``space``: a space file (default: the embedded compression space); ``max_drop``: the accuracy
    budget against the uncompressed model; ``epochs``: fine-tune epochs per trial; ``trials`` /
    ``concurrency`` override the space's budget."""
    from automl.search import run_search
    from automl.spaces.user import user_space, with_budget

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    task = LoaderTask(train_loader, val_loader, test_loader)
    found = user_space(space=space, object_class=class_name(model), task=LOADERS_TASK, max_drop=max_drop,
                       epochs=epochs)
    found = with_budget(found, trials=trials, concurrency=concurrency)
    found = dataclasses.replace(found, model=found.model.with_object(model))
    return run_search(found, out, task=task, profile=profile, address=address, force=force)


def apply(recipe, out, *, model: Optional[nn.Module] = None, train_loader=None, val_loader=None, test_loader=None,
          force: bool = False):
    """Replay a recipe into ``out`` (as ``automl apply``); returns (ApplyResult, metrics written).
    Recipes searched on objects need them again: ``model`` and the loaders."""
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    task = LoaderTask(train_loader, val_loader, test_loader) if train_loader is not None else None
    return apply_to_dir(recipe, out, force=force, task=task, model=model, price_layers=price_layers)


def load(directory, *, model: Optional[nn.Module] = None) -> nn.Module:
    """The compressed nn.Module of an ``automl apply`` directory (see automl.recipe.saved.load_model)."""
    return load_model(directory, model=model)
