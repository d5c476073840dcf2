"""Ghost modules (GhostNet's cheap feature maps): the `ghost` method on trained convolutions and the
families' `ghost` option trained from scratch, against the dense model and against `structured`
pruning at about the same MACs, in one run.

Every row applies the same recipe (same seed, same epochs): train, replace (or thin) at
``--prune-epoch``, fine-tune the remaining epochs. The deployed models (onnxruntime, 1 thread) are timed
against the dense model in the same process, interleaved, at batch 1 and 32; accuracy on the
validation and test splits, mean of seeds.

    python bench/ghost.py            # the README table (about 8 minutes on 2 shared cores)
    python bench/ghost.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from automl.hardware.profile import cpu_model
from automl.io import write_json
from automl.recipe import Recipe, apply_recipe
from automl.runtime import OrtModel
from automl.search.versions import library_versions
from automl.tasks import get_task
from common import latencies

MODELS = {
    "digits CNN w32 d3": {"family": "cnn", "width": 32, "depth": 3, "kernel": 3, "pooling": "stride"},
    "digits CNN w64 d4": {"family": "cnn", "width": 64, "depth": 4, "kernel": 3, "pooling": "stride"},
    "digits ResNet w16": {"family": "resnet", "width": 16, "stages": 3, "blocks": 2},
}
ROWS = {  # row -> stage (None: the dense model; "arch": the family's ghost option, trained from scratch)
    "dense": None,
    "ghost architecture (ghost: 2), from scratch": ("arch", {"ghost": 2}),
    "ghost, ratio 2": ("ghost", {"ratio": 2}),
    "ghost, ratio 3": ("ghost", {"ratio": 3}),
    "structured 1.9x MACs (l1, 16-channel grid)": ("structured", {"mac_reduction": 1.9, "criterion": "l1"}),
}
ROOT = Path(__file__).resolve().parents[1]


def run(model: str, row: str, seed: int, args, work: Path) -> dict:
    stage, arch = ROWS[row], MODELS[model]
    if stage is not None and stage[0] == "arch":
        stage, arch = None, {**arch, **stage[1]}
    stages = [] if stage is None else [{"method": stage[0], "start_epoch": args.prune_epoch,
                                        "config": {**stage[1], "finetune_epochs": args.epochs - args.prune_epoch}}]
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": arch,
                               "train": {"epochs": args.epochs, "lr": 0.005, "seed": seed}, "stages": stages})
    m = apply_recipe(recipe, work, task=get_task("digits")).metrics
    return {"val": m["accuracy"], "test": m["test_accuracy"], "macs": m["macs"], "params": m["params"],
            "file_kb": m.get("file_kb"), "onnx": str(work / "model.onnx")}


def summary(runs, timed) -> dict:
    return {"val": statistics.mean(r["val"] for r in runs), "test": statistics.mean(r["test"] for r in runs),
            "per_seed_val": [r["val"] for r in runs], "macs": runs[0]["macs"], "params": runs[0]["params"], **timed}


def table(results) -> str:
    lines = ["| model | row | val % | test % | MACs x | params x | b1 x | b32 x |", "|---|---|---|---|---|---|---|---|"]
    for model, rows in results.items():
        dense = rows["dense"]
        for row, r in rows.items():
            lines.append(f"| {model} | {row} | {100 * r['val']:.2f} | {100 * r['test']:.2f} | "
                         f"{dense['macs'] / r['macs']:.2f} | {dense['params'] / r['params']:.2f} | "
                         f"{dense['b1'] / r['b1']:.2f} | {dense['b32'] / r['b32']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, the small CNN only")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--prune-epoch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ghost.json"))
    args = parser.parse_args(argv)
    models = list(MODELS)[:1] if args.quick else list(MODELS)
    if args.quick:
        args.seeds, args.epochs, args.prune_epoch, args.rounds = 1, 3, 2, 1
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, model in enumerate(models):
            runs = {row: [run(model, row, seed, args, Path(tmp) / f"{k}-{i}-{seed}") for seed in range(args.seeds)]
                    for i, row in enumerate(ROWS)}
            runners = {row: OrtModel(rs[0]["onnx"], threads=1) for row, rs in runs.items()}
            timed, _ = latencies(runners, get_task("digits"), args.rounds)
            results[model] = {row: summary(rs, timed[row]) for row, rs in runs.items()}
    write_json(Path(args.out), {"cpu": cpu_model(), "versions": library_versions(), "epochs": args.epochs,
                                "prune_epoch": args.prune_epoch, "seeds": args.seeds, "quick": args.quick,
                                "models": results, "command": "python bench/ghost.py"})
    print(table(results))


if __name__ == "__main__":
    main()
