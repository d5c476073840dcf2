"""Learned rounding (AdaRound, GPTQ) against nearest: post-training quantization of trained models, no fine-tuning.

Each model is trained once in float; then the registered ``qat`` method with ``finetune_epochs: 0``
quantizes it at w4a8, w3a8 and w2a8 (first and last layer 8 bits, LSQ grids from the MSE observer,
activations calibrated on 4 training batches), with ``rounding: nearest``, ``adaround`` (8 training
batches, 1000 steps per layer) and ``gptq`` (8 training batches), the learned ones for each seed (3 on
ours, 1 on the zoo models). A learned rounding is kept only where the model then agrees with the
float model's predictions on the validation split at least as often as with nearest rounding, so
validation accuracy is not a clean measure of the choice: read the test column. Models: our digits CNN and ResNet (12 epochs, Adam, as in bench/quantization.py) and
pytorchcv's ResNet-20 and MobileNetV2 w0.5 on 32x32 digit images (24 epochs, SGD, as in bench/byom.py).

    python bench/rounding.py                      # README table
    python bench/rounding.py --quick              # smoke run
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

from automl.compress import ApplyContext, get_method
from automl.configs import parse_config
from automl.io import write_json
from automl.recipe.apply import train_with_stages
from automl.search.versions import library_versions
from automl.tasks import get_task
from automl.tasks.data import data_task, parse_data
from automl.validate import Where
from byom import recipe as zoo_recipe, write_digits
from quantization import MODELS as OUR_MODELS, trained

BENCH = Path(__file__).resolve().parent
ZOO = ("resnet20", "mobilenetv2")


def train_model(name, args, zoo_task):
    """(model, task) trained in float."""
    if name in OUR_MODELS:
        family, arch, task_name = OUR_MODELS[name]
        task = get_task(task_name)
        model, _ = trained(task, family, arch, args.epochs, 0.005)
        return model.eval(), task
    data = {"path": str(args.work / "digits32"), "mean": 0.5, "std": 0.25, "val_fraction": 0.2, "test_fraction": 0.2}
    model, _ = train_with_stages(zoo_recipe(name, data, epochs=args.zoo_epochs), zoo_task,
                                 ApplyContext(task=zoo_task, work_dir=args.work, epochs=args.zoo_epochs))
    return model.eval(), zoo_task


def quantize(model, task, config, seed):
    """The qat method applied to a copy of the trained model at its last epoch (no fine-tuning)."""
    info = get_method("qat")
    handler = info.handler_cls(parse_config(info.config_cls, config, Where(key="qat")))
    ctx = ApplyContext(task=task, work_dir=".", epochs=1, seed=seed)
    copy_ = copy.deepcopy(model)
    handler.prepare(copy_, ctx)
    started = time.time()
    simulated = handler.finalize(copy_, ctx)
    return simulated.eval(), handler.stats, time.time() - started


def accuracy(model, task):
    return {"val_accuracy": task.evaluate(model, task.val_loader()),
            "test_accuracy": task.evaluate(model, task.test_loader())}


def bench_model(name, args, zoo_task):
    started = time.time()
    model, task = train_model(name, args, zoo_task)
    rows = [{"model": name, "bits": "fp32", "rounding": "float", **accuracy(model, task),
             "train_s": time.time() - started}]
    print(rows[0], flush=True)
    for bits in args.bits:
        base = {"w_bits": bits, "a_bits": 8, "finetune_epochs": 0, "rounding_iterations": args.iterations}
        simulated, _, seconds = quantize(model, task, {**base, "rounding": "nearest"}, 0)
        rows.append({"model": name, "bits": f"w{bits}a8", "rounding": "nearest", **accuracy(simulated, task),
                     "seconds": seconds})
        print(rows[-1], flush=True)
        for rounding in args.roundings:
            for seed in range(args.zoo_seeds if name in ZOO else args.seeds):
                simulated, stats, seconds = quantize(model, task, {**base, "rounding": rounding}, seed)
                rows.append({"model": name, "bits": f"w{bits}a8", "rounding": rounding, "seed": seed,
                             **accuracy(simulated, task), "seconds": seconds,
                             **{k: v for k, v in stats.items() if k.startswith(("rounding_", "nearest"))}})
                print(rows[-1], flush=True)
    return rows


def table(rows) -> str:
    out = ["| model | bits | fp32 val / test | rounding | val / test (mean of seeds) | kept | output error vs nearest "
           "| s per run |", "|---|---|---|---|---|---|---|---|"]
    fp32 = {r["model"]: r for r in rows if r["rounding"] == "float"}
    pct = lambda r, key: f"{100 * r[key]:.1f}"  # noqa: E731
    for (model, bits, rounding) in dict.fromkeys((r["model"], r["bits"], r["rounding"]) for r in rows
                                                 if r["rounding"] != "float"):
        runs = [r for r in rows if (r["model"], r["bits"], r["rounding"]) == (model, bits, rounding)]
        mean = lambda key: statistics.mean(r[key] for r in runs)  # noqa: E731
        learned = rounding != "nearest"
        out.append(f"| {model} | {bits} | {pct(fp32[model], 'val_accuracy')} / {pct(fp32[model], 'test_accuracy')} | "
                   f"{rounding} | {100 * mean('val_accuracy'):.1f} / {100 * mean('test_accuracy'):.1f} | "
                   + (f"{sum(int(r['rounding_kept']) for r in runs)}/{len(runs)} | "
                      f"{mean('rounding_error_ratio'):.2f} | {mean('seconds'):.0f} |" if learned else "- | 1 | 0 |"))
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "digits_resnet", *ZOO])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    parser.add_argument("--roundings", nargs="+", default=["adaround", "gptq"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--zoo-seeds", type=int, default=1, help="seeds of each learned rounding on the (slower) zoo models")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--zoo-epochs", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/automl-adaround-bench"))
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "rounding.json")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.bits, args.seeds, args.epochs, args.iterations = ["digits_cnn"], [2], 1, 2, 50
    torch.set_num_threads(1)
    started = time.time()
    zoo_task = None
    if any(m in ZOO for m in args.models):
        write_digits(args.work / "digits32")
        data = {"path": str(args.work / "digits32"), "mean": 0.5, "std": 0.25, "val_fraction": 0.2,
                "test_fraction": 0.2}
        zoo_task = data_task(parse_data(data, Where("bench", "data")))
    rows = []
    for name in args.models:
        rows += bench_model(name, args, zoo_task)
        write_json(args.out, {"benchmark": "rounding", "settings": {k: str(v) for k, v in vars(args).items()},
                              "cpu": platform.processor(), "rows": rows, "wall_time_s": round(time.time() - started, 1),
                              "versions": library_versions()})
    print(table(rows))


if __name__ == "__main__":
    main()
