"""Recipes: schema, construction from a trial config, and replay (apply)."""
from automl.recipe.apply import ApplyResult, apply_recipe
from automl.recipe.from_config import recipe_from_config
from automl.recipe.schema import Recipe, Stage

__all__ = ["Recipe", "Stage", "ApplyResult", "apply_recipe", "recipe_from_config"]
