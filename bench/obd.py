"""Second-order pruning: Optimal Brain Damage (`obd`) against magnitude and first-order Taylor, in one run.

Every row applies the same recipe (same seed, same epochs): train, prune once at ``--prune-epoch``,
fine-tune for the remaining epochs. Element-wise: `magnitude` vs `obd` (one global ranking) at equal
sparsity, and each layer pruned to the same share (`scope: layer`). Structured (filters thinned away, uniform, 16-channel grid): `structured` with criterion
`l1`, `taylor` and `obd` at equal ratio. Accuracy of the deployed model, mean and per seed, on the
validation and test splits of the digits task. Writes JSON (default bench/results/obd.json) and prints a
Markdown table.

    python bench/obd.py            # the README table (about 5 minutes on 2 shared cores)
    python bench/obd.py --quick    # smoke run
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
from automl.search.versions import library_versions
from automl.tasks import get_task

MODELS = {
    "digits_cnn": ("cnn", {"width": 32, "depth": 3, "kernel": 3, "pooling": "stride"}),
    "digits_resnet": ("resnet", {"width": 16, "stages": 3, "blocks": 2}),
}
ROWS = {  # row -> (stage method, config)
    "magnitude 90 %": ("magnitude", {"ratio": 0.9}),
    "obd 90 %": ("obd", {"ratio": 0.9}),
    "magnitude 97 %": ("magnitude", {"ratio": 0.97}),
    "obd 97 %": ("obd", {"ratio": 0.97}),
    "magnitude 97 %, per layer": ("magnitude", {"ratio": 0.97, "scope": "layer"}),
    "obd 97 %, per layer": ("obd", {"ratio": 0.97, "scope": "layer"}),
    "structured l1, half the filters": ("structured", {"ratio": 0.5, "criterion": "l1"}),
    "structured taylor, half the filters": ("structured", {"ratio": 0.5, "criterion": "taylor"}),
    "structured obd, half the filters": ("structured", {"ratio": 0.5, "criterion": "obd"}),
}
ROOT = Path(__file__).resolve().parents[1]


def run(model: str, row: str, seed: int, args, tmp: Path) -> dict:
    family, arch = MODELS[model]
    method, config = ROWS[row]
    finetune = args.epochs - args.prune_epoch
    recipe = Recipe.from_dict({
        "version": 1, "task": "digits", "arch": {"family": family, **arch},
        "train": {"epochs": args.epochs, "lr": 0.005, "seed": seed},
        "stages": [{"method": method, "start_epoch": args.prune_epoch,
                    "config": {**config, "finetune_epochs": finetune}}]})
    m = apply_recipe(recipe, tmp / f"{model}-{method}-{seed}", task=get_task("digits")).metrics
    return {"val": m["accuracy"], "test": m["test_accuracy"], "nonzero_params": m["nonzero_params"],
            "params": m["params"]}


def table(results) -> str:
    lines = ["| model | pruning | val % (mean of seeds) | test % | per seed (val) | nonzero params |",
             "|---|---|---|---|---|---|"]
    for model, rows in results.items():
        for row, runs in rows.items():
            val, test = [r["val"] for r in runs], [r["test"] for r in runs]
            lines.append(f"| {model} | {row} | {100 * statistics.mean(val):.2f} | {100 * statistics.mean(test):.2f} | "
                         + " / ".join(f"{100 * v:.1f}" for v in val) + f" | {runs[0]['nonzero_params']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, the CNN only")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--prune-epoch", type=int, default=8, help="the one pruning event; then fine-tuning")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "obd.json"))
    args = parser.parse_args(argv)
    models = ["digits_cnn"] if args.quick else list(MODELS)
    if args.quick:
        args.seeds, args.epochs, args.prune_epoch = 1, 3, 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: {row: [run(m, row, seed, args, Path(tmp)) for seed in range(args.seeds)] for row in ROWS}
                   for m in models}
    write_json(Path(args.out), {"cpu": cpu_model(), "versions": library_versions(), "epochs": args.epochs,
                                "prune_epoch": args.prune_epoch, "seeds": args.seeds, "quick": args.quick,
                                "models": results})
    print(table(results))


if __name__ == "__main__":
    main()
