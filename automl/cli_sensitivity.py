"""`automl sensitivity`: prune each layer alone at several levels, chart the accuracy, and optionally
write a recipe with per-layer ratios."""
from __future__ import annotations

from pathlib import Path

from automl.errors import ConfigError


DEFAULT_LEVELS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


def _levels(text: str):
    from automl.compress.pruning.sensitivity import check_levels

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError("levels must be comma-separated numbers", key="--levels", value=text,
                          fix="write e.g. 0.1,0.3,0.5") from None
    return check_levels(values, key="--levels")


def _sensitivity_table(ranked, ratios, max_drop, granularity, shown=3):
    print(f"\nlayers by sensitivity ({granularity} pruning; mean accuracy drop over the levels):")
    print(f"  {'layer':<28} {'params':>8} {'mean drop':>10} {'ratio at drop <= ' + format(max_drop, 'g'):>22}")
    picks = ranked if len(ranked) <= 2 * shown else ranked[:shown] + [None] + ranked[-shown:]
    for item in picks:
        if item is None:
            print(f"  {'...':<28}")
            continue
        name, drop, params = item
        print(f"  {name:<28} {params:>8} {drop:>10.4f} {ratios[name]:>22.2f}")


def cmd_sensitivity(args) -> int:
    import dataclasses

    import torch

    from automl.compress import ApplyContext
    from automl.compress.layers import select_layers
    from automl.compress.pruning import sensitivity as sens
    from automl.errors import UnknownNameError
    from automl.io import write_yaml
    from automl.recipe import Recipe
    from automl.recipe.apply import train_with_stages
    from automl.tasks import get_task

    # every option is checked before training, so a typo costs no training time
    levels = _levels(args.levels)
    grans = sens.check_granularities(args.granularity, key="--granularity")
    if not 0.0 <= args.max_drop < 1.0:
        raise ConfigError("--max-drop is an accuracy share in [0, 1)", key="--max-drop", value=args.max_drop,
                          fix="use e.g. 0.01 for one percentage point")
    recipe = Recipe.load(args.recipe)
    target = None
    if args.write_recipe:
        if Path(args.write_recipe).resolve() == Path(args.recipe).resolve():
            raise ConfigError("--write-recipe would overwrite the input recipe", key="--write-recipe",
                              value=args.write_recipe, fix="write the new recipe to another file")
        target = sens.per_layer_target(recipe, grans)
    main_gran = target[1] if target else ("element" if "element" in grans else grans[0])
    task = get_task(recipe.task)
    torch.set_num_threads(recipe.deploy.threads)
    try:
        select_layers(task.build_model(recipe.family, recipe.arch), args.layers)
    except UnknownNameError as exc:
        raise UnknownNameError(exc.message, key="--layers", value=exc.value, fix=exc.fix) from None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = dataclasses.replace(recipe, stages=())   # the recipe's training without its compression
    ctx = ApplyContext(task=task, work_dir=out, epochs=recipe.train.epochs, seed=recipe.train.seed,
                       threads=recipe.deploy.threads)
    print(f"automl sensitivity: training the dense {recipe.family} of {args.recipe} "
          f"({recipe.train.epochs} epochs)", flush=True)
    model, _ = train_with_stages(dense, task, ctx, on_epoch=lambda e, m: print(
        f"epoch {e + 1}/{recipe.train.epochs}: val accuracy {m['accuracy']:.4f}", flush=True))
    val = task.val_loader()
    layers = select_layers(model, args.layers)
    base = task.evaluate(model, val)
    print(f"dense val accuracy {base:.4f}; pruning {len(layers)} layers one at a time at {len(levels)} "
          f"levels ({', '.join(grans)})", flush=True)
    rows = sens.analyze(model, lambda m: task.evaluate(m, val), layers, levels, grans, baseline=base)
    ratios = {g: sens.ratios_from_sensitivity(rows, args.max_drop, g) for g in grans}
    sens.write_csv(out / "sensitivity.csv", rows)
    sens.plot_sensitivity(out / "sensitivity.png", rows,
                          title=f"pruning sensitivity: {Path(args.recipe).name} (dense val accuracy {base:.4f})")
    write_yaml(out / "ratios.yaml", {"version": 1, "recipe": str(args.recipe), "metric": "val accuracy",
                                     "baseline_accuracy": base, "max_drop": args.max_drop, "levels": levels,
                                     "ratios": ratios})
    _sensitivity_table(sens.rank_layers(rows, main_gran), ratios[main_gran], args.max_drop, main_gran)
    print(f"\nwrote {out / 'sensitivity.csv'}, {out / 'sensitivity.png'}, {out / 'ratios.yaml'}")
    if target:
        index, gran = target
        new, skipped = sens.recipe_with_per_layer(recipe, index, ratios[gran], model, provenance={
            "per_layer_from": {"command": "automl sensitivity", "recipe": str(args.recipe), "granularity": gran,
                               "max_drop": args.max_drop, "baseline_accuracy": base}})
        new.save(args.write_recipe)
        note = f" (not pruned by the stage, left out: {', '.join(skipped)})" if skipped else ""
        print(f"wrote {args.write_recipe}: stage '{new.stages[index].method}' with per_layer for "
              f"{len(new.stages[index].config.per_layer)} layers{note}")
    return 0
