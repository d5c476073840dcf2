"""Device-cost allocation for structured pruning: `allocation: energy` with each group's cost taken from
the hardware profile (`cost: latency` / `cost: energy`) against MACs (`cost: macs`) and `uniform`.

Every row applies the same recipe (same seed, same epochs): train, thin at ``--prune-epoch`` at a
level (`ratio`; several levels, so each allocation draws its accuracy / latency trade-off), fine-tune the
remaining epochs. The energy allocation removes the share `ratio`
of the groups' total cost, taken where it is cheap in accuracy and large in cost: in MACs, or in the
latency / energy the profile prices for the layers. The deployed models (onnxruntime, 1 thread) are
timed against the dense model in the same process, interleaved, at batch 1 and 32; accuracy on the
validation and test splits, mean of seeds. The profile is `auto` (the shipped profile of this CPU)
unless ``--profile`` names one; the digits CNN is what the shipped profiles cover.

    python bench/energy_allocation.py            # the README table (about 15 minutes on 2 shared cores)
    python bench/energy_allocation.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from automl.hardware.layer_costs import price_layers
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
}
ROWS = {  # row -> structured config (None: the dense model)
    "dense": None,
    "uniform": {"allocation": "uniform"},
    "energy, cost macs": {"allocation": "energy", "cost": "macs"},
    "energy, cost latency": {"allocation": "energy", "cost": "latency"},
    "energy, cost energy": {"allocation": "energy", "cost": "energy"},
}
ROOT = Path(__file__).resolve().parents[1]


def run(model: str, row: str, ratio: float, seed: int, args, work: Path) -> dict:
    config = ROWS[row]
    stages = [] if config is None else [{"method": "structured", "start_epoch": args.prune_epoch, "config": {
        **config, "ratio": ratio, "profile": args.profile, "finetune_epochs": args.epochs - args.prune_epoch}}]
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": MODELS[model],
                               "train": {"epochs": args.epochs, "lr": 0.005, "seed": seed}, "stages": stages})
    m = apply_recipe(recipe, work, task=get_task("digits"), price_layers=price_layers).metrics
    return {"val": m["accuracy"], "test": m["test_accuracy"], "macs": m["macs"], "params": m["params"],
            "channels_kept": m.get("channels_kept"), "onnx": str(work / "model.onnx")}


def summary(runs, timed, ratio) -> dict:
    return {"ratio": ratio, "val": statistics.mean(r["val"] for r in runs), "test": statistics.mean(r["test"] for r in runs),
            "macs": runs[0]["macs"], "channels_kept": runs[0]["channels_kept"], **timed}


def table(results) -> str:
    lines = ["| model | allocation | level | val % | test % | MACs x | b1 x | b32 x | channels kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, rows in results.items():
        dense = rows["dense"]
        for row, r in rows.items():
            kept = ", ".join(sorted(r["channels_kept"].values())) if r["channels_kept"] else "-"
            lines.append(f"| {model} | {row.split(' @ ')[0]} | {r['ratio']} | {100 * r['val']:.2f} | {100 * r['test']:.2f} | "
                         f"{dense['macs'] / r['macs']:.2f} | {dense['b1'] / r['b1']:.2f} | "
                         f"{dense['b32'] / r['b32']:.2f} | {kept} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, the small CNN only")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--prune-epoch", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="the pruning levels")
    parser.add_argument("--profile", default="auto")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "energy_allocation.json"))
    args = parser.parse_args(argv)
    models = list(MODELS)[:1] if args.quick else list(MODELS)
    if args.quick:
        args.seeds, args.epochs, args.prune_epoch, args.rounds, args.ratios = 1, 3, 2, 1, [0.5]
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            points = [("dense", 0.0)] + [(row, r) for r in args.ratios for row in ROWS if ROWS[row] is not None]
            runs = {(row if not r else f"{row} @ {r}"): (r, [run(model, row, r, seed, args, Path(tmp) / f"{model}-{i}-{seed}")
                                                         for seed in range(args.seeds)])
                    for i, (row, r) in enumerate(points)}
            runners = {name: OrtModel(rs[0]["onnx"], threads=1) for name, (_, rs) in runs.items()}
            timed, _ = latencies(runners, get_task("digits"), args.rounds)
            results[model] = {name: summary(rs, timed[name], r) for name, (r, rs) in runs.items()}
    write_json(Path(args.out), {"cpu": cpu_model(), "versions": library_versions(), "epochs": args.epochs,
                                "prune_epoch": args.prune_epoch, "ratios": args.ratios, "profile": args.profile,
                                "seeds": args.seeds, "quick": args.quick, "models": results,
                                "command": "python bench/energy_allocation.py"})
    print(table(results))


if __name__ == "__main__":
    main()
