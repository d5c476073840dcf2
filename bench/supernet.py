"""Supernet search against the from-scratch joint search on the same space and machine.

Per seed: the supernet trained once on the space's architectures (``--supernet-epochs``, sandwich
rule, all cores); the supernet search (``--candidates`` scored on inherited weights, priced by the
shipped profile of this CPU when there is one, else by MACs; the ``--front-size`` best applied with
``--finetune-epochs`` and measured); then the from-scratch search of the same space (every trial
trains its candidate for train.epochs, latency measured in each trial), launching trials until the
supernet's wall time (training included) has passed. Reported:

- wall times: supernet training, supernet search, from-scratch search (and its trials' training time);
- candidates scored per minute (supernet) vs trials per minute (from scratch);
- for each applied front point: validation accuracy with inherited weights (PyTorch, before deployment),
  after the fine-tune (deployed), and the same architecture + compression trained from scratch with the
  space's full budget (train.epochs), all through ``apply_recipe``;
- hypervolume of the two searches' fronts (accuracy, latency_ms, size_kb of completed feasible trials,
  scaled over all runs as bench/search.py does), with the supernet's wall time including its training.

    python bench/supernet.py                       # default space, 3 seeds
    python bench/supernet.py --seeds 0 --candidates 200 --supernet-epochs 5  # smoke run
    python bench/supernet.py --candidates 10000 --predictor-samples 400 --out bench/results/supernet-predictor.json
Writes bench/results/supernet.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from search import OBJECTIVES, score

SPACES = {"default": None,
          "mobilenetv2": Path(__file__).resolve().parent.parent / "search_spaces" / "digits32_mobilenetv2.yaml"}


def load(name, seed):
    from automl.spaces import load_default_space, load_space, parse_space

    base = load_default_space() if SPACES[name] is None else load_space(SPACES[name])
    return parse_space({**base.raw, "budget": {**base.raw.get("budget", {}), "seed": seed}}, base.source)


def points(rows):
    return [[r["metrics"]["accuracy"], *(r["metrics"][k] for k in OBJECTIVES[1:])]
            for r in rows if r["status"] == "completed" and r.get("feasible")]


def scratch_search(space, work: Path, wall_s: float):
    """The from-scratch search given the supernet's wall time: trials launch until ``wall_s`` has passed."""
    from automl.search import run_search
    from automl.spaces import parse_space

    raw = {**space.raw, "budget": {**space.raw.get("budget", {}), "trials": 100_000, "time_limit_s": wall_s}}
    space = parse_space(raw, space.source)
    started = time.time()
    outcome = run_search(space, work / "scratch")
    timing = outcome.report["timing"]
    trials = len(outcome.rows)
    train_s = sum(r["metrics"].get("train_s", 0.0) for r in outcome.rows)
    return {"wall_s": round(time.time() - started, 1), "trials": trials, "trials_s": timing["trials_s"],
            "trials_per_minute": round(60 * trials / max(timing["trials_s"], 1e-9), 1),
            "completed_train_s": round(train_s, 1), "status": outcome.report["status_counts"],
            "points": points(outcome.rows)}


def supernet_search(space, args, seed, work: Path):
    from automl.search.supernet_search import SupernetSearch, run_supernet_search
    from automl.spaces.user import with_supernet
    from automl.supernet.train import SupernetTraining, train_supernet

    started = time.time()
    manifest = train_supernet(space, work / "supernet", SupernetTraining(epochs=args.supernet_epochs, seed=seed),
                              log=lambda m: None)
    trained_s = time.time() - started
    tuned = with_supernet(space, work / "supernet", epochs=args.finetune_epochs)
    began = time.time()
    options = SupernetSearch(args.candidates, args.front_size, args.predictor_samples)
    outcome = run_supernet_search(tuned, work / "search", options, profile="auto", log=lambda m: None)
    info = outcome.report["supernet"]
    return tuned, outcome, {
        "train_s": round(trained_s, 1), "search_s": round(time.time() - began, 1),
        "wall_s": round(time.time() - started, 1), "manifest_accuracy": manifest["accuracy"],
        "candidates": info["candidates"], "candidates_per_minute": info["candidates_per_minute"],
        "measured_candidates": info["measured_candidates"], "predictor": info.get("predictor"),
        "cost_basis": info["cost_basis"], "points": points(outcome.rows)}


def from_scratch(space, rows, work: Path):
    """Each applied front point's architecture + compression trained from scratch with the full budget."""
    from automl.recipe import apply_recipe, recipe_from_config

    out = []
    for row in (r for r in rows if r["status"] == "completed"):
        config = {**row["config"], "train.epochs": space.epochs}
        recipe = dataclasses.replace(recipe_from_config(space, config), supernet=None)
        metrics = apply_recipe(recipe, work / "retrain" / row["trial_id"]).metrics
        out.append({"trial_id": row["trial_id"], "inherited": round(row["metrics"]["proxy_accuracy"], 4),
                    "finetuned": round(row["metrics"]["accuracy"], 4), "scratch": round(metrics["accuracy"], 4)})
    return out


def run_seed(args, seed):
    space = load(args.space, seed)
    with tempfile.TemporaryDirectory(prefix="automl-bench-supernet-") as tmp:
        work = Path(tmp)
        tuned, outcome, sn = supernet_search(space, args, seed, work)
        scratch = scratch_search(space, work, sn["wall_s"])
        sn["front"] = from_scratch(space, outcome.rows, work)
    gaps = [p["finetuned"] - p["scratch"] for p in sn["front"]]
    sn["gap_mean"] = round(statistics.mean(gaps), 4) if gaps else None
    sn["gap_worst"] = round(min(gaps), 4) if gaps else None
    return {"seed": seed, "scratch": scratch, "supernet": sn}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="default", choices=list(SPACES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--supernet-epochs", type=int, default=30)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--front-size", type=int, default=20)
    parser.add_argument("--predictor-samples", type=int, default=0,
                        help="candidates measured on inherited weights before a predictor scores the rest (0: all)")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "supernet.json"))
    args = parser.parse_args()
    from automl.hardware.profile import cpu_model

    runs = []
    for seed in args.seeds:  # each seed's figures are kept as soon as they exist
        runs.append(run_seed(args, seed))
        Path(args.out).write_text(json.dumps({"partial": True, "runs": runs}, indent=2, default=str) + "\n")
    flat = [{"setting": kind, "points": r[kind]["points"], "completed": len(r[kind]["points"]),
             "wall_s": r[kind]["wall_s"]} for r in runs for kind in ("scratch", "supernet")]
    summary = score(flat, ["scratch", "supernet"])
    for r, (a, b) in zip(runs, zip(flat[::2], flat[1::2])):
        r["scratch"]["hypervolume"], r["supernet"]["hypervolume"] = a["hypervolume"], b["hypervolume"]
    speed = [r["supernet"]["candidates_per_minute"] / max(r["scratch"]["trials_per_minute"], 1e-9) for r in runs]
    out = {"cpu": cpu_model(), "space": args.space, "args": vars(args), "summary": {
        **summary, "candidates_per_minute_ratio": [round(s, 1) for s in speed],
        "front_gap_mean": [r["supernet"]["gap_mean"] for r in runs],
        "front_gap_worst": [r["supernet"]["gap_worst"] for r in runs]},
        "runs": runs, "command": "python bench/supernet.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    main()
