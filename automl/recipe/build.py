"""The task and the starting model of a recipe: a built-in family built from its parameters (fresh,
or with the weights it inherits from a supernet), or the user's model with its trained weights."""
from __future__ import annotations

import torch.nn as nn

from automl.arch.user import build_user_model
from automl.supernet.inherit import inherit
from automl.tasks import build_task


def recipe_task(recipe, *, file=None):
    """The task ``recipe`` trains and evaluates on."""
    return build_task(recipe.task, recipe.data, file=file)


def recipe_model(recipe, task) -> nn.Module:
    """A fresh starting model: the user's (with its checkpoint), a built-in family model with its
    supernet weights, or a new built-in family model."""
    if recipe.model is not None:
        return build_user_model(recipe.model)
    if recipe.supernet is not None:
        return inherit(recipe.supernet, recipe.family, recipe.arch, task, seed=recipe.train.seed)
    return task.build_model(recipe.family, recipe.arch)
