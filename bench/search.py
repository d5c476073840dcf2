"""Search settings at equal budget: the search strategy (joint vs sequential vs random), early stopping
(asha vs pareto) and the sampler (tpe vs random).

Each setting runs a space -- the embedded default (digits, cnn family, magnitude pruning, int8) or
``--space rich`` (search_spaces/digits_resnet_joint.yaml: resnet, KD, structured pruning, int8, exits)
-- with ``--trials`` trials of ``--epochs`` epochs (ASHA grace 2 epochs, pruning fine-tune a third of
them), 3 seeds, and is scored by the hypervolume of its front over all three objectives (accuracy,
latency_ms, size_kb), each scaled to [0, 1] by the range seen over all runs of this benchmark (accuracy
reversed), reference point (1.05, 1.05, 1.05): larger is a better front. ``--split test`` takes the
front of completed, feasible trials on validation accuracy and scores its points by their test-split
accuracy (what the deployed models do on data no choice saw); ``--split val`` scores every completed
trial on validation accuracy. Latency is measured inside each trial (no profile), so the figures
carry the noise of those measurements. Also reported: trials completed, stopped early, wall time.

    python bench/search.py --settings joint sequential random --split test --out bench/results/strategy.json
    python bench/search.py --space rich --settings joint sequential random --split test \
        --out bench/results/strategy-rich.json
    python bench/search.py --settings asha+tpe pareto+tpe asha+random pareto+random --split val
    python bench/search.py --trials 8 --seeds 0  # smoke run
Writes bench/results/search.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from automl.search.pareto import hypervolume, pareto_front

SETTINGS = {"asha+tpe": {"scheduler": "asha", "sampler": "tpe"},
            "pareto+tpe": {"scheduler": "pareto", "sampler": "tpe"},
            "asha+random": {"scheduler": "asha", "sampler": "random"},
            "pareto+random": {"scheduler": "pareto", "sampler": "random"},
            # budget.strategy, each with the default scheduler (pareto) and, for joint and sequential, sampler
            "joint": {"strategy": "joint"},
            "sequential": {"strategy": "sequential"},
            "random": {"strategy": "random", "sampler": "random"}}
SPACES = {"default": None,
          "rich": Path(__file__).resolve().parent.parent / "search_spaces" / "digits_resnet_joint.yaml"}
OBJECTIVES = ("accuracy", "latency_ms", "size_kb")


def run_setting(name, overrides, seed, trials, base_raw, epochs, split="val"):
    from automl.search import run_search
    from automl.spaces import parse_space

    raw = dict(base_raw)
    raw["budget"] = {**raw["budget"], **overrides, "trials": trials, "seed": seed, "grace_epochs": 2}
    raw["train"] = {**raw["train"], "epochs": epochs}
    raw["compression"] = {**raw["compression"],
                          "pruning": {**raw["compression"]["pruning"], "finetune_epochs": max(1, epochs // 3)}}
    space = parse_space(raw, f"default space ({name})")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="automl-bench-search-") as work:
        outcome = run_search(space, Path(work) / "run")
    rows = [r for r in outcome.rows if r["status"] == "completed" and r.get("feasible")]
    if split == "test":  # the validation front, scored on the test split
        rows = [rows[i] for i in pareto_front([r["metrics"] for r in rows], space.objectives)]
    return {"setting": name, "seed": seed, "wall_s": round(time.time() - started, 1),
            "completed": sum(r["status"] == "completed" for r in outcome.rows),
            "early_stopped": sum(r["status"] == "early_stopped" for r in outcome.rows),
            "points": [[r["metrics"]["test_accuracy" if split == "test" else "accuracy"],
                        *(r["metrics"][k] for k in OBJECTIVES[1:])] for r in rows]}


def score(runs, settings):
    """Hypervolume per run (objectives scaled to [0, 1] by the range seen over all runs), then the mean
    per setting."""
    points = [p for r in runs for p in r["points"]]
    lows = [min((p[k] for p in points), default=0.0) for k in range(3)]
    highs = [max((p[k] for p in points), default=1.0) for k in range(3)]
    span = [max(h - lo, 1e-12) for lo, h in zip(lows, highs)]
    for r in runs:
        scaled = [((highs[0] - a) / span[0], (lat - lows[1]) / span[1], (size - lows[2]) / span[2])
                  for a, lat, size in r["points"]]
        r["hypervolume"] = round(hypervolume(scaled, (1.05, 1.05, 1.05)), 5)
    summary = {}
    for name in settings:
        mine = [r for r in runs if r["setting"] == name]
        summary[name] = {"hypervolume_mean": round(statistics.mean(r["hypervolume"] for r in mine), 5),
                         "hypervolume_per_seed": [r["hypervolume"] for r in mine],
                         "completed_mean": statistics.mean(r["completed"] for r in mine),
                         "wall_s_mean": round(statistics.mean(r["wall_s"] for r in mine), 1)}
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=6, help="train.epochs (the default space has 12)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=["asha+tpe", "pareto+tpe"], choices=list(SETTINGS))
    parser.add_argument("--space", default="default", choices=list(SPACES))
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "search.json"))
    args = parser.parse_args()
    from automl.hardware.profile import cpu_model
    from automl.spaces import load_default_space, load_space

    base_raw = load_default_space().raw if SPACES[args.space] is None else load_space(SPACES[args.space]).raw
    runs = [run_setting(name, SETTINGS[name], seed, args.trials, base_raw, args.epochs, args.split)
            for seed in args.seeds for name in args.settings]
    summary = score(runs, args.settings)
    out = {"cpu": cpu_model(), "space": args.space, "split": args.split, "trials": args.trials, "epochs": args.epochs,
           "seeds": args.seeds, "summary": summary,
           "runs": runs, "command": "python bench/search.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, s in summary.items():
        print(f"{name}: hypervolume {s['hypervolume_mean']:.4f} (per seed {s['hypervolume_per_seed']}), "
              f"{s['completed_mean']:.1f} completed, {s['wall_s_mean']:.0f} s")


if __name__ == "__main__":
    main()
