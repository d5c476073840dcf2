"""`automl sensitivity`: the flags of automl.recipe.sensitivity.run_sensitivity, and its table."""
from __future__ import annotations

from automl.errors import ConfigError

DEFAULT_LEVELS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
FLAGS = {"levels": "--levels", "granularity": "--granularity", "layers": "--layers", "max_drop": "--max-drop",
         "write_recipe": "--write-recipe"}


def _levels(text: str):
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError("levels must be comma-separated numbers", key="--levels", value=text,
                          fix="write e.g. 0.1,0.3,0.5") from None


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
    from automl.recipe.sensitivity import run_sensitivity

    result = run_sensitivity(args.recipe, args.out, levels=_levels(args.levels), granularities=args.granularity,
                             layers=args.layers, max_drop=args.max_drop, write_recipe=args.write_recipe, keys=FLAGS,
                             log=lambda line: print(line, flush=True))
    _sensitivity_table(result.ranked, result.ratios[result.granularity], args.max_drop, result.granularity)
    print(f"\nwrote {args.out}/sensitivity.csv, {args.out}/sensitivity.png, {args.out}/ratios.yaml")
    if result.written_recipe is not None:
        stage = result.written_recipe.stages[result.written_stage]
        note = f" (not pruned by the stage, left out: {', '.join(result.skipped_layers)})" \
            if result.skipped_layers else ""
        print(f"wrote {args.write_recipe}: stage '{stage.method}' with per_layer for "
              f"{len(stage.config.per_layer)} layers{note}")
    return 0
