"""Pruning sensitivity of a recipe's model: train it dense once, prune each layer alone at several
levels, and write the chart, the per-layer ratios within an accuracy budget and, optionally, a copy of
the recipe whose pruning stage takes those ratios. What `automl sensitivity` runs.

Every option is checked before training, so a typo costs no training time; ``keys`` renames the
options in error messages (the CLI passes its flag names)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence


from automl.compress import ApplyContext
from automl.compress.layers import select_layers
from automl.compress.pruning import sensitivity as sens
from automl.errors import ConfigError, UnknownNameError
from automl.io import write_yaml
from automl.recipe.apply import train_with_stages
from automl.recipe.build import recipe_model, recipe_task
from automl.recipe.schema import Recipe
from automl.runtime.threads import torch_threads

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
KEYS = {"levels": "levels", "granularity": "granularity", "layers": "layers", "max_drop": "max_drop",
        "write_recipe": "write_recipe"}


@dataclass
class SensitivityResult:
    baseline_accuracy: float
    rows: List[dict]                    # one per (layer, granularity, level)
    ratios: Dict[str, Dict[str, float]]  # granularity -> layer -> largest ratio within max_drop
    ranked: List[tuple]                 # (layer, mean drop, params) of the main granularity, most sensitive first
    granularity: str                    # the main granularity (that of the written recipe, if any)
    written_recipe: Optional[Recipe] = None
    written_stage: Optional[int] = None  # index of the stage given per_layer in written_recipe
    skipped_layers: Sequence[str] = ()


def _check(recipe: Recipe, recipe_path, levels, granularities, layers, max_drop, write_recipe, keys):
    levels = sens.check_levels(levels, key=keys["levels"])
    grans = sens.check_granularities(granularities, key=keys["granularity"])
    if not 0.0 <= max_drop < 1.0:
        raise ConfigError(f"{keys['max_drop']} is an accuracy share in [0, 1)", key=keys["max_drop"],
                          value=max_drop, fix="use e.g. 0.01 for one percentage point")
    target = None
    if write_recipe:
        if recipe_path is not None and Path(write_recipe).resolve() == Path(recipe_path).resolve():
            raise ConfigError(f"{keys['write_recipe']} would overwrite the input recipe", key=keys["write_recipe"],
                              value=str(write_recipe), fix="write the new recipe to another file")
        target = sens.per_layer_target(recipe, grans, key=keys["write_recipe"])
    task = recipe_task(recipe)
    try:
        select_layers(recipe_model(recipe, task), layers)
    except UnknownNameError as exc:
        raise UnknownNameError(exc.message, key=keys["layers"], value=exc.value, fix=exc.fix) from None
    return levels, grans, target, task


def _analyze(recipe, recipe_path, task, out: Path, layers, levels, grans, log):
    """Train the recipe's dense model, then prune its layers one at a time: (model, baseline, rows)."""
    dense = dataclasses.replace(recipe, stages=())   # the recipe's training without its compression
    ctx = ApplyContext(task=task, work_dir=out, epochs=recipe.train.epochs, seed=recipe.train.seed,
                       threads=recipe.deploy.threads)
    log(f"automl sensitivity: training the dense {recipe.describe_model} of {recipe_path or 'the recipe'} "
        f"({recipe.train.epochs} epochs)")
    model, _ = train_with_stages(dense, task, ctx, on_epoch=lambda e, m: log(
        f"epoch {e + 1}/{recipe.train.epochs}: val accuracy {m['accuracy']:.4f}"))
    val = task.val_loader()
    chosen = select_layers(model, layers)
    base = task.evaluate(model, val)
    log(f"dense val accuracy {base:.4f}; pruning {len(chosen)} layers one at a time at {len(levels)} "
        f"levels ({', '.join(grans)})")
    return model, base, sens.analyze(model, lambda m: task.evaluate(m, val), chosen, levels, grans, baseline=base)


def run_sensitivity(recipe, out, *, levels: Sequence[float] = LEVELS, granularities=("element", "filter"),
                    layers=("re:.*",), max_drop: float = 0.01, write_recipe=None, keys: Dict[str, str] = KEYS,
                    log: Callable[[str], None] = print) -> SensitivityResult:
    """``recipe``: a Recipe or a recipe file. Writes sensitivity.csv, sensitivity.png and ratios.yaml to
    ``out`` (and the new recipe to ``write_recipe``)."""
    recipe_path = None if isinstance(recipe, Recipe) else recipe
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    levels, grans, target, task = _check(recipe, recipe_path, levels, granularities, layers, max_drop,
                                         write_recipe, keys)
    main_gran = target[1] if target else ("element" if "element" in grans else grans[0])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(recipe.deploy.threads):  # the caller's setting comes back after
        model, base, rows = _analyze(recipe, recipe_path, task, out, layers, levels, grans, log)
    ratios = {g: sens.ratios_from_sensitivity(rows, max_drop, g) for g in grans}
    name = Path(recipe_path).name if recipe_path else "recipe"
    sens.write_csv(out / "sensitivity.csv", rows)
    sens.plot_sensitivity(out / "sensitivity.png", rows,
                          title=f"pruning sensitivity: {name} (dense val accuracy {base:.4f})")
    write_yaml(out / "ratios.yaml", {"version": 1, "recipe": str(recipe_path or ""), "metric": "val accuracy",
                                     "baseline_accuracy": base, "max_drop": max_drop, "levels": levels,
                                     "ratios": ratios})
    result = SensitivityResult(base, rows, ratios, sens.rank_layers(rows, main_gran), main_gran)
    if target:
        index, gran = target
        result.written_recipe, result.skipped_layers = sens.recipe_with_per_layer(
            recipe, index, ratios[gran], model, provenance={"per_layer_from": {
                "command": "automl sensitivity", "recipe": str(recipe_path or ""), "granularity": gran,
                "max_drop": max_drop, "baseline_accuracy": base}})
        result.written_recipe.save(write_recipe)
        result.written_stage = index
    return result


__all__ = ["LEVELS", "SensitivityResult", "run_sensitivity"]
