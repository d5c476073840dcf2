"""Packed low-bit weights: what binary, ternary and 2-8-bit models ship, against the fp32 ONNX file, in one run.

For each model and method one recipe is applied (same seed, same epochs, the method in the last
epochs); its work directory holds the fp32 ONNX model exported before deployment and the `.packed`
file the method ships. Reported: accuracy of the deployed model, the fp32 file and the packed file on
disk (the plain fp32 model's ONNX file, trained with the same recipe minus the method), their ratio,
and whether the packed file reloads into the model exactly.

    python bench/packed.py            # the README table (about 3 minutes on 2 shared cores)
    python bench/packed.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from automl.compress.coding.deepcomp_format import read_compressed
from automl.hardware.profile import cpu_model
from automl.io import write_json
from automl.recipe import Recipe, apply_recipe
from automl.search.versions import library_versions
from automl.tasks import get_task

MODELS = {  # name -> (family, arch)
    "digits_cnn": ("cnn", {"width": 32, "depth": 3, "kernel": 3, "pooling": "stride"}),
    "digits_resnet": ("resnet", {"width": 16, "stages": 3, "blocks": 2}),
}
METHODS = {  # row -> stage (finetune epochs set from --qat-epochs)
    "binary": {"method": "binary", "config": {}},
    "binary, first/last too": {"method": "binary", "config": {"keep_first_last": False}},
    "ternary": {"method": "ternary", "config": {}},
    "qat w4a8": {"method": "qat", "config": {"w_bits": 4, "a_bits": 8}},
    "qat w2a8": {"method": "qat", "config": {"w_bits": 2, "a_bits": 8}},
    "mixed 4-bit average": {"method": "mixed", "config": {"target_bits": 4.0, "a_bits": 8}},
}
ROOT = Path(__file__).resolve().parents[1]


def run(model: str, row: str, args, tmp: Path) -> dict:
    family, arch = MODELS[model]
    stage = {**METHODS[row], "config": {**METHODS[row]["config"], "finetune_epochs": args.qat_epochs}}
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": {"family": family, **arch},
                               "train": {"epochs": args.epochs, "lr": 0.005, "seed": 0}, "stages": [stage]})
    work = tmp / f"{model}-{row.replace(' ', '_').replace('/', '_').replace(',', '')}"
    result = apply_recipe(recipe, work, task=get_task("digits"))
    _, tensors = read_compressed(result.artifact.shipped)
    exact = all(torch.equal(tensors[k], v) for k, v in result.model.state_dict().items())
    m = result.metrics
    return {"val": m["accuracy"], "test": m["test_accuracy"], "precision": m["precision"],
            "packed_kb": m["packed_kb"], "packed_bits": m["packed_bits"], "reloads_exactly": exact}


def fp32_row(model: str, args, tmp: Path) -> dict:
    family, arch = MODELS[model]
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": {"family": family, **arch},
                               "train": {"epochs": args.epochs, "lr": 0.005, "seed": 0}})
    m = apply_recipe(recipe, tmp / f"{model}-fp32", task=get_task("digits")).metrics
    return {"val": m["accuracy"], "test": m["test_accuracy"], "fp32_onnx_kb": m["file_kb"]}


def table(results) -> str:
    lines = ["| model | weights | val % | test % | file kB | x smaller than fp32 | reloads exactly |",
             "|---|---|---|---|---|---|---|"]
    for model, rows in results.items():
        base = rows["fp32"]
        lines.append(f"| {model} | fp32 | {100 * base['val']:.1f} | {100 * base['test']:.1f} | "
                     f"{base['fp32_onnx_kb']:.1f} | 1.0 | - |")
        for row, r in rows.items():
            if row != "fp32":
                lines.append(f"| {model} | {row} | {100 * r['val']:.1f} | {100 * r['test']:.1f} | {r['packed_kb']:.1f} "
                             f"| {r['ratio_to_fp32']:.1f} | {r['reloads_exactly']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 quantized")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs per recipe")
    parser.add_argument("--qat-epochs", type=int, default=3, help="the last epochs, trained quantized")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "packed.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.qat_epochs = 2, 1
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {model: {"fp32": fp32_row(model, args, Path(tmp)),
                           **{row: run(model, row, args, Path(tmp)) for row in METHODS}} for model in MODELS}
    for rows in results.values():
        for row in METHODS:
            rows[row]["ratio_to_fp32"] = rows["fp32"]["fp32_onnx_kb"] / rows[row]["packed_kb"]
    write_json(Path(args.out), {"cpu": cpu_model(), "versions": library_versions(), "epochs": args.epochs,
                                "qat_epochs": args.qat_epochs, "quick": args.quick, "models": results})
    print(table(results))


if __name__ == "__main__":
    main()
