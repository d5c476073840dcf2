"""Command line: a thin front over the public API. Exit codes: 0 ok, 1 runtime error, 2 usage/config."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from automl.errors import AutoMLError, ConfigError, RunDirError


def _space(path):
    from automl.spaces import load_default_space, load_space

    return load_default_space() if path is None else load_space(path)


def _override_budget(space, args):
    import dataclasses

    changes = {k: getattr(args, k) for k in ("trials", "concurrency") if getattr(args, k, None) is not None}
    for key, value in changes.items():
        if value < 1:
            raise ConfigError("must be at least 1", key=f"--{key}", value=value)
    return dataclasses.replace(space, budget=dataclasses.replace(space.budget, **changes)) if changes else space


def cmd_search(args) -> int:
    from automl.search import run_search

    space = _override_budget(_space(args.space), args)
    out = Path(args.out or f"runs/search-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"automl search: {space.budget.trials} trials of '{space.source}' -> {out}", flush=True)
    outcome = run_search(space, out, address=args.address, force=args.force)
    _summary(outcome)
    return 0


def cmd_resume(args) -> int:
    from automl.search import resume_search

    _summary(resume_search(args.run_dir, address=args.address))
    return 0


def _summary(outcome):
    report = outcome.report
    print(f"\n{report['trials']} trials ({report['status_counts']}) in {report['wall_time_s']:.0f} s; "
          f"{len(report['front'])} on the Pareto front")
    for metric, best in report["best"].items():
        print(f"  best {metric}: {best['value']:.6g} (trial {best['trial_id']})")
    print(f"results: {outcome.run_dir}/report.md, front.csv, pareto.png, recipes/")


def cmd_apply(args) -> int:
    from automl.io import write_json
    from automl.recipe import Recipe, apply_recipe

    recipe = Recipe.load(args.recipe)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.force:
            raise RunDirError(f"output directory {out} exists and is not empty. Fix: choose another --out "
                              "or pass --force to replace it")
        shutil.rmtree(out)
    result = apply_recipe(recipe, out, on_epoch=lambda e, m: print(
        f"epoch {e + 1}/{recipe.train.epochs}: val accuracy {m['accuracy']:.4f}", flush=True))
    import torch

    torch.save(result.model.state_dict(), out / "model.pt")
    recipe.save(out / "recipe.yaml")
    metrics = {**result.metrics, "artifact": result.artifact.path.name,
               "recorded": {k: v for k, v in recipe.metrics.items() if k in result.metrics}}
    write_json(out / "metrics.json", metrics)
    print(json.dumps({k: v for k, v in result.metrics.items()}, indent=1, default=str))
    if "accuracy" in recipe.metrics:
        print(f"accuracy {result.metrics['accuracy']:.4f} (recorded by the search: "
              f"{recipe.metrics['accuracy']:.4f}); deployed model: {out / result.artifact.path.name}")
    return 0


def cmd_check(args) -> int:
    space = _space(args.space)
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
    s = sub.add_parser("search", help="run a search (default: the embedded digits space)")
    s.add_argument("--space", help="search-space YAML (default: embedded digits_cnn.yaml)")
    s.add_argument("--out", help="run directory (default: runs/search-<time>)")
    s.add_argument("--address", help="address of an existing Ray cluster (default: start a local one)")
    s.add_argument("--trials", type=int, help="override budget.trials")
    s.add_argument("--concurrency", type=int, help="override budget.concurrency")
    s.add_argument("--force", action="store_true", help="replace an existing run directory")
    s.set_defaults(fn=cmd_search)
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AutoMLError as exc:
        print(f"automl {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("automl: interrupted; results written so far are kept"
              + ("; continue with 'automl resume <run dir>'" if args.command == "search" else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
