"""Data-free pruning by weight similarity (`structured` criterion `similarity`, Srinivas & Babu 2015)
against magnitude (`l1`, `l2`) at equal ratio, before any fine-tune.

Every row applies the same recipe (same seed, same epochs): train the dense model, then thin away
the same share of channels in every structure group at the end of training, with no fine-tune, and
measure the deployed model. `similarity` folds each removed channel's outgoing weights into its
nearest twin; magnitude just drops the weakest channels. Accuracy on the validation and test splits
of the digits task, mean and per seed. Writes JSON (default bench/results/similarity.json) and prints
a Markdown table.

    python bench/similarity.py            # the README table (about 8 minutes on 2 shared cores)
    python bench/similarity.py --quick    # smoke run
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

RESNET = ("resnet", {"width": 16, "stages": 3, "blocks": 2})
MODELS = {  # name -> (family, arch, layers the stage prunes)
    "digits_cnn": ("cnn", {"width": 32, "depth": 3, "kernel": 3, "pooling": "stride"}, ["re:.*"]),
    "digits_mlp": ("mlp", {"width": 128, "depth": 2}, ["re:.*"]),
    "digits_resnet": (*RESNET, ["re:.*"]),
    "digits_resnet, inside the blocks": (*RESNET, ["re:.*conv1$"]),  # not the residual stream
}
CRITERIA = ("l1", "l2", "similarity")
ROOT = Path(__file__).resolve().parents[1]


def run(model: str, criterion: str, ratio: float, seed: int, args, tmp: Path) -> dict:
    """One trained model; ratio 0: left dense (the reference row)."""
    family, arch, layers = MODELS[model]
    stages = [{"method": "structured", "start_epoch": args.epochs, "config": {
        "ratio": ratio, "criterion": criterion, "round_to": 1, "finetune_epochs": 0, "layers": layers}}]
    recipe = Recipe.from_dict({
        "version": 1, "task": "digits", "arch": {"family": family, **arch},
        "train": {"epochs": args.epochs, "lr": 0.005, "seed": seed}, "stages": stages if ratio else []})
    work = tmp / "-".join(str(p).replace(" ", "_").replace(",", "") for p in (model, criterion, ratio, seed))
    m = apply_recipe(recipe, work, task=get_task("digits")).metrics
    return {"val": m["accuracy"], "test": m["test_accuracy"], "params": m["params"],
            "merges": m.get("similarity_merges"), "unfolded_groups": m.get("similarity_unfolded_groups")}


def table(results) -> str:
    lines = ["| model | share of channels removed | criterion | val % (mean of seeds) | test % | per seed (val) | "
             "params |", "|---|---|---|---|---|---|---|"]
    for model, by_ratio in results.items():
        for ratio, rows in by_ratio.items():
            for criterion, runs in rows.items():
                val, test = [r["val"] for r in runs], [r["test"] for r in runs]
                lines.append(f"| {model} | {ratio} | {criterion} | {100 * statistics.mean(val):.2f} | "
                             f"{100 * statistics.mean(test):.2f} | " + " / ".join(f"{100 * v:.1f}" for v in val)
                             + f" | {runs[0]['params']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, the CNN only")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "similarity.json"))
    args = parser.parse_args(argv)
    models = ["digits_cnn"] if args.quick else list(MODELS)
    if args.quick:
        args.seeds, args.epochs = 1, 3
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: {"0": {"dense": [run(m, "-", 0.0, seed, args, Path(tmp)) for seed in range(args.seeds)]},
                       **{str(r): {c: [run(m, c, r, seed, args, Path(tmp)) for seed in range(args.seeds)]
                                for c in CRITERIA} for r in args.ratios}} for m in models}
    write_json(Path(args.out), {"cpu": cpu_model(), "versions": library_versions(), "epochs": args.epochs,
                                "ratios": args.ratios, "seeds": args.seeds, "quick": args.quick, "models": results,
                                "command": "python bench/similarity.py"})
    print(table(results))


if __name__ == "__main__":
    main()
