"""Command line: a thin front over the public API. Exit codes: 0 ok, 1 runtime error, 2 usage/config."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from automl.cli_sensitivity import DEFAULT_LEVELS, cmd_sensitivity
from automl.cli_common import flags_named, load_space_arg as _space, search_space as _search_space
from automl.cli_profile import add_profile_parser
from automl.cli_supernet import add_supernet_parser, supernet_search
from automl.errors import AutoMLError, ConfigError, with_file


def _override_budget(space, args):
    """The space with --strategy / --trials / --concurrency (spaces.user.with_budget), bounds checked
    first so the message names the flag."""
    import dataclasses

    from automl.spaces.user import with_budget

    changes = {k: getattr(args, k) for k in ("strategy", "trials", "concurrency") if getattr(args, k, None) is not None}
    bounds = {f.name: f.metadata for f in dataclasses.fields(space.budget)}
    for key in ("trials", "concurrency"):
        value, low, high = changes.get(key), bounds[key]["low"], bounds[key]["high"]
        if value is not None and not low <= value <= high:
            raise ConfigError(f"must be between {low} and {high:,}", key=f"--{key}", value=value,
                              fix=f"give --{key} a value in {low}..{high}")
    return with_budget(space, **changes)


def cmd_search(args) -> int:
    with flags_named(args):
        return _search(args)


def _search(args) -> int:
    from automl.search import run_search

    space = _search_space(args)
    if args.supernet is not None:
        return supernet_search(space, args, override_budget=_override_budget, summary=_summary)
    for flag in ("candidates", "front_size", "predictor_samples"):
        if getattr(args, flag) is not None:
            raise ConfigError("applies to a supernet search only", key=f"--{flag.replace('_', '-')}",
                              value=getattr(args, flag), fix="add --supernet DIR (automl supernet train), or drop it")
    space = _override_budget(space, args)
    out = Path(args.out or f"runs/search-{time.strftime('%Y%m%d-%H%M%S')}")
    profile, measure_front = _search_profile(args)
    cost = f", costs predicted from {args.profile}" if args.profile is not None else ""
    print(f"automl search: {space.budget.trials} trials of '{space.source}'{cost} -> {out}", flush=True)
    outcome = run_search(space, out, address=args.address, force=args.force, profile=profile,
                         measure_trials=args.measure_trials, measure_front=measure_front)
    return _summary(outcome)


def _search_profile(args):
    """(profile, measure_front) of a search: the given profile, or for the embedded default search the
    shipped CPU profile when this machine is its device (its front then measured for real)."""
    if args.no_profile:
        given = [f for f, v in (("--profile", args.profile), ("--measure-trials", args.measure_trials),
                                ("--measure-front", args.measure_front)) if v]
        if given:
            raise ConfigError("--no-profile measures latency in every trial and cannot be combined with "
                              + " or ".join(given), key="--no-profile", value=True,
                              fix=f"drop --no-profile or {' and '.join(given)}")
        return None, False
    if args.profile is not None or args.space is not None or getattr(args, "model", None) is not None:
        return args.profile, args.measure_front
    return "auto", True   # run_search decides: the shipped profile of this CPU, if there is one


def cmd_resume(args) -> int:
    from automl.search import resume_search
    from automl.search.supernet_search import OPTIONS, resume_supernet_search

    if (Path(args.run_dir) / OPTIONS).is_file():  # a search on a supernet
        return _summary(resume_supernet_search(args.run_dir, log=lambda m: print(m, flush=True)))
    return _summary(resume_search(args.run_dir, address=args.address))


def _summary(outcome):
    report = outcome.report
    print(f"\n{report['trials']} trials ({report['status_counts']}) in {report['wall_time_s']:.0f} s; "
          f"{len(report['front'])} on the Pareto front")
    for metric, best in report["best"].items():
        print(f"  best {metric}: {best['value']:.6g} (trial {best['trial_id']})")
    check = report.get("front_check")
    if check and check["points"]:
        print(f"  predicted vs measured latency over the front: {100 * check['within_10pct']:.0f}% of "
              f"{check['points']} points within +-10% (mean error {100 * check['mean_error']:+.1f}%)")
    print(f"results: {outcome.run_dir}/report.md, front.csv, pareto.png, recipes/")
    if outcome.interrupted:
        print(f"automl: search stopped by {outcome.interrupted}; the finished trials are kept and the unfinished "
              f"ones are marked 'interrupted'. Continue with 'automl resume {outcome.run_dir}'", file=sys.stderr)
        return 130
    if report["trials"] and not report["status_counts"].get("completed"):
        errors = list(dict.fromkeys(r["error"] for r in outcome.rows if r.get("error")))
        why = "; ".join(e.splitlines()[0][:300] for e in errors[:3]) or "no trial reached its last epoch"
        print(f"automl: no trial completed, so there is no model to ship. First errors: {why}", file=sys.stderr)
        return 1
    return 0


def cmd_apply(args) -> int:
    from automl.hardware.layer_costs import price_layers
    from automl.recipe import Recipe
    from automl.recipe.saved import apply_to_dir

    recipe = Recipe.load(args.recipe)
    try:
        result, metrics = apply_to_dir(recipe, args.out, force=args.force, on_epoch=lambda e, m: print(
            f"epoch {e + 1}/{recipe.train.epochs}: val accuracy {m['accuracy']:.4f}", flush=True),
            price_layers=price_layers)
    except ConfigError as exc:
        raise with_file(exc, args.recipe) from None
    print(json.dumps({k: v for k, v in result.metrics.items()}, indent=1, default=str))
    if "accuracy" in recipe.metrics:
        print(f"accuracy {result.metrics['accuracy']:.4f} (recorded by the search: "
              f"{recipe.metrics['accuracy']:.4f}); deployed model: {result.artifact.path}")
    if "warning" in result.metrics:
        print(f"automl apply: WARNING: {result.metrics['warning']}", file=sys.stderr)
    note = "" if "torch_export_error" not in metrics else f" (no model.pt2: {metrics['torch_export_error']})"
    print(f"PyTorch model: automl.load('{args.out}') (model.pt + structure.json){note}")
    return 0


def cmd_check(args) -> int:
    space = _space(args.space)
    space.build_task()  # a task that does not import, or is not a Task, is not OK
    print(f"{space.source}: OK (hash {space.hash}), task {space.task}, family {space.family}")
    for p in space.params:
        cond = " when " + ", ".join(f"{c.param} {c.op} {c.operand!r}" for c in p.conditions) if p.conditions else ""
        print(f"  {p.name}: {p.domain}{cond}")
    print(f"  objectives: {space.objectives}; constraints: {space.constraints or 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="automl", description="Joint architecture + compression search "
                                     "scored on measured deployed cost.")
    sub = parser.add_subparsers(dest="command", required=True)
    _search_parser(sub)
    _recipe_parsers(sub)
    add_profile_parser(sub)
    add_supernet_parser(sub)
    return parser


def _search_parser(sub):
    s = sub.add_parser("search", help="run a search (default: the embedded digits space)")
    s.add_argument("--space", help="search-space YAML (default: embedded digits_cnn.yaml)")
    s.add_argument("--out", help="run directory (default: runs/search-<time>)")
    s.add_argument("--address", help="address of an existing Ray cluster (default: start a local one)")
    s.add_argument("--model", help="your model: 'package.module:function' or 'file.py:function' returning an "
                   "nn.Module; the search compresses it (default space: the embedded compression space)")
    s.add_argument("--checkpoint", help="trained weights for --model: a state_dict file or an `automl apply` "
                   "directory (read with torch.load(weights_only=True))")
    s.add_argument("--data", help="your data: a folder of class folders (or train/ val/ [test/] folders of them) "
                   "or an .npz with x/y arrays; replaces the space's task")
    s.add_argument("--task", help="a task name (e.g. digits32) or 'package.module:function'; replaces the space's")
    s.add_argument("--max-drop", type=float, help="accuracy budget: constraint accuracy_drop <= this share of the "
                   "uncompressed model's accuracy (e.g. 0.01 = one point)")
    s.add_argument("--epochs", type=int, help="fine-tune epochs of every trial (0: post-training methods only; "
                   "with --supernet: of each front point applied)")
    s.add_argument("--supernet", help="a trained supernet directory (automl supernet train): score --candidates "
                   "candidates on their inherited weights in milliseconds each, then apply the best --front-size for "
                   "real, each fine-tuned --epochs (default 2)")
    s.add_argument("--candidates", type=int, help="with --supernet: candidates scored (default 1000)")
    s.add_argument("--front-size", type=int, help="with --supernet: proxy-front points applied and measured "
                   "(default 20)")
    s.add_argument("--predictor-samples", type=int, help="with --supernet: measure this many candidates on inherited "
                   "weights, fit an accuracy predictor on them and score the rest with it (default 0: measure all)")
    s.add_argument("--trials", type=int, help="override budget.trials")
    s.add_argument("--concurrency", type=int, help="override budget.concurrency")
    s.add_argument("--strategy", choices=("joint", "sequential", "random"),
                   help="override budget.strategy: joint (default), sequential (architectures, then compression of "
                        "the best), random")
    s.add_argument("--force", action="store_true", help="replace an existing run directory")
    s.add_argument("--profile", help="hardware profile YAML: latency_ms and energy_mj are predicted from it "
                   "(default: the shipped CPU profile for the embedded default space on the CPU it was measured "
                   "on, else latency measured inside each trial)")
    s.add_argument("--no-profile", action="store_true",
                   help="measure latency inside each trial even where the shipped profile applies")
    s.add_argument("--measure-trials", action="store_true",
                   help="with --profile: also keep each trial's measured latency as measured_latency_ms")
    s.add_argument("--measure-front", action="store_true",
                   help="with --profile: after the search, apply and measure every Pareto point and report "
                        "predicted vs measured latency")
    s.set_defaults(fn=cmd_search)


def _recipe_parsers(sub):
    r = sub.add_parser("resume", help="finish an interrupted search")
    r.add_argument("run_dir")
    r.add_argument("--address")
    r.set_defaults(fn=cmd_resume)
    a = sub.add_parser("apply", help="rebuild, train, compress, export and measure a recipe")
    a.add_argument("recipe")
    a.add_argument("--out", required=True)
    a.add_argument("--force", action="store_true")
    a.set_defaults(fn=cmd_apply)
    c = sub.add_parser("check", help="validate a search space and list its parameters")
    c.add_argument("space", nargs="?")
    c.set_defaults(fn=cmd_check)
    v = sub.add_parser("sensitivity", help="prune each layer alone at several levels and chart the accuracy")
    v.add_argument("recipe", help="recipe YAML: its task, architecture and training give the dense model")
    v.add_argument("--out", required=True, help="directory for sensitivity.csv, sensitivity.png, ratios.yaml")
    v.add_argument("--levels", default=DEFAULT_LEVELS,
                   help=f"comma-separated shares in (0, 1) (default {DEFAULT_LEVELS})")
    v.add_argument("--granularity", nargs="+", default=["element", "filter"], help="element and/or filter")
    v.add_argument("--layers", nargs="+", default=["re:.*"], help="layer names or 're:' patterns (default: all)")
    v.add_argument("--max-drop", type=float, default=0.01, help="tolerated accuracy drop per layer (default 0.01)")
    v.add_argument("--write-recipe", help="write a copy of the recipe whose pruning stage has per_layer = the ratios")
    v.set_defaults(fn=cmd_sensitivity)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AutoMLError as exc:
        print(f"automl {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        resumable = args.command in ("search", "resume")
        print("automl: interrupted; results written so far are kept"
              + ("; continue with 'automl resume <run dir>'" if resumable else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
