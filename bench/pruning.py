"""Structured pruning: our pipeline vs Torch-Pruning's default at equal MAC reductions, in one run.

For each model and seed, one dense model is trained; then, for each target MAC reduction, both
pipelines start from a copy of it and get the same fine-tune budget (epochs, optimizer, lr
schedule, data order):

  automl         our `structured` method (criterion, allocation and schedule in OURS) aiming at the
                 target, gradual masks during the fine-tune, thinned at the end; any channel count.
  automl_fast    the same with kept channels a multiple of 16 (fast kernels on this CPU); where that
                 grid cannot get within 10 % of the target, 8, then any.
  torch_pruning  GroupMagnitudeImportance(p=2) + BasePruner, one shot, its pruning ratio bisected
                 so MACs drop exactly as much as `automl`'s did (equal MACs), then fine-tuned: the
                 library's default recipe.

Accuracy is the mean over seeds on the validation split, the test split, and both pooled
("held-out": 720 digits). The MobileNetV2-style model runs on generated 3x32x32 inputs, for latency.

Every model is exported to ONNX and measured in onnxruntime (1 thread) at batch 1 and batch 32,
interleaved round by round. Writes JSON (default bench/results/pruning.json) and prints a Markdown table.

    python bench/pruning.py                 # the README table (about 12 minutes on 2 cores)
    python bench/pruning.py --quick         # smoke run
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch_pruning as tp

from automl.compress import ApplyContext, get_method
from automl.configs import parse_config
from automl.errors import ConfigError
from automl.io import write_json
from automl.modelstats import count_macs, count_params
from automl.recipe import Recipe
from automl.recipe.apply import seed_everything, train_with_stages
from automl.runtime import OrtModel, export_onnx, measure_latency
from automl.search.versions import library_versions
from automl.settings import TrainSettings
from automl.tasks import get_task
from automl.validate import Where
from common import GeneratedTask

# our best structured pipeline (chosen on the digits validation split; see the README)
# automl: any channel count (the accuracy comparison at equal MACs); automl_fast: multiples of 16 where
# that reaches the target (this CPU's conv kernels are fastest there), else 8, else any
GRIDS = {"automl": (1,), "automl_fast": (16, 8, 1)}
OURS = {"criterion": "taylor", "allocation": "global", "schedule": "agp", "ramp_epochs": 3, "agp_every": 5,
        "granularity": "filter", "thin": True}

MODELS = {
    "digits_cnn": ("cnn", {"width": 32, "depth": 3, "kernel": 3, "pooling": "stride"}, "digits"),
    "digits_resnet": ("resnet", {"width": 32, "stages": 2, "blocks": 2}, "digits"),
    "mobilenetv2_32px": ("mobilenetv2", {"width_mult": 1.0, "stages": 3, "blocks": 2}, "generated"),
}


def pretrain(task, family, arch, epochs, seed, lr):
    train = parse_config(TrainSettings, {"epochs": epochs, "lr": lr, "seed": seed}, Where())
    recipe = Recipe(task=task.name, family=family, arch=arch, train=train)
    model, _ = train_with_stages(recipe, task, ApplyContext(task=task, work_dir=".", epochs=epochs, seed=seed))
    return model


def finetune(model, task, epochs, seed, lr, handler=None):
    """The shared fine-tune loop: Adam, cosine lr over ``epochs``, the same data order for everyone."""
    seed_everything(seed)
    ctx = ApplyContext(task=task, work_dir=".", epochs=epochs, seed=seed)
    loader = task.train_loader(batch_size=32, seed=seed)
    ctx.steps_per_epoch = len(loader)
    if handler is not None:
        model = handler.prepare(model, ctx)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    for epoch in range(epochs):
        if handler is not None:
            handler.on_epoch_start(model, epoch, ctx)
        task.train_epoch(model, optimizer, loader,
                         after_step=(lambda: handler.after_step(model)) if handler is not None else None)
        cosine.step()
    if handler is not None:
        model = handler.finalize(model, ctx)
    return model.eval()


def head_of(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def tp_prune_to(model, example, factor):
    """Torch-Pruning's default pruner, with the ratio bisected so MACs drop by ``factor``."""
    base = count_macs(model, example)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(20):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        pruner = tp.pruner.BasePruner(trial, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=mid, ignored_layers=[head_of(trial)])
        pruner.step()
        reached = base / count_macs(trial, example)
        if best is None or abs(reached - factor) < abs(best[1] - factor):
            best = (trial, reached)
        lo, hi = (mid, hi) if reached < factor else (lo, mid)
    return best[0]


def ours_handler(factor, epochs, round_to):
    info = get_method("structured")
    config = parse_config(info.config_cls, {**OURS, "mac_reduction": factor, "finetune_epochs": epochs,
                                            "round_to": round_to,
                                            "ramp_epochs": min(OURS["ramp_epochs"], max(epochs, 1))}, Where())
    return info.handler_cls(config, start_epoch=0)


def prune_ours(dense, task, factor, epochs, seed, lr, grids):
    """Our pipeline on the coarsest of ``grids`` (kept channels a multiple of it) that gets within
    10 % of the target."""
    example = task.example_input(1)
    base = count_macs(dense, example)
    for round_to in grids:
        try:
            model = finetune(copy.deepcopy(dense), task, epochs, seed, lr, ours_handler(factor, epochs, round_to))
        except ConfigError:  # target out of reach on this grid
            continue
        if abs(base / count_macs(model, example) / factor - 1) <= 0.10:
            return model, round_to
    return model, round_to


def latencies(models, task, rounds):
    """{name: {b1, b32}} medians over ``rounds`` interleaved rounds of onnxruntime measurements."""
    out = {name: {"b1": [], "b32": []} for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {n: OrtModel(export_onnx(m, task.example_input(1), Path(tmp) / f"{n}.onnx").path, threads=1)
                   for n, m in models.items()}
        x1, x32 = task.example_input(1).numpy(), task.example_input(32).numpy()
        for _ in range(rounds):
            for name, runner in runners.items():
                out[name]["b1"].append(measure_latency(runner, x1, warmup=20, repeats=100)["median_ms"])
                out[name]["b32"].append(measure_latency(runner, x32, warmup=5, repeats=30)["median_ms"])
    return {n: {k: statistics.median(v) for k, v in d.items()} for n, d in out.items()}


def accuracy(model, task):
    """Validation, test, and both pooled (720 digits never trained on)."""
    val, test = task.evaluate(model, task.val_loader()), task.evaluate(model, task.test_loader())
    n_val, n_test = len(task.val_loader().dataset), len(task.test_loader().dataset)
    return {"val_accuracy": val, "test_accuracy": test, "heldout_accuracy": (val * n_val + test * n_test) / (n_val + n_test)}


def bench_model(key, args):
    """Rows for one model; accuracy is the mean over seeds, latency is measured on the first seed's models."""
    family, arch, task_name = MODELS[key]
    task = get_task("digits") if task_name == "digits" else GeneratedTask()
    train = task_name == "digits"
    example = task.example_input(1)
    ft = args.finetune_epochs if train else 0
    seeds = args.seeds if train else args.seeds[:1]
    models, rows = {}, {}
    for seed in seeds:
        dense = pretrain(task, family, arch, args.pretrain_epochs, seed, args.lr) if train else \
            task.build_model(family, arch).eval()
        base = count_macs(dense, example)
        entries = [("dense", 1.0, dense, 0.0, None)]
        for factor in args.factors:
            ours = {}
            for pipeline, grids in GRIDS.items():
                t0 = time.time()
                model, round_to = prune_ours(dense, task, factor, ft, seed, args.lr / 2, grids)
                ours[pipeline] = model
                entries.append((pipeline, factor, model, time.time() - t0, round_to))
            t1 = time.time()  # Torch-Pruning is matched to the MACs `automl` reached: both at equal MACs
            reached = base / count_macs(ours["automl"], example)
            theirs = finetune(tp_prune_to(copy.deepcopy(dense), example, reached), task, ft, seed, args.lr / 2)
            entries.append(("torch_pruning", factor, theirs, time.time() - t1, None))
        for pipeline, factor, model, secs, round_to in entries:
            name = "dense" if pipeline == "dense" else f"{pipeline}@{factor}"
            if seed == seeds[0]:
                models[name] = model
                rows[name] = {"model": key, "target": factor, "pipeline": pipeline, "round_to": round_to,
                              "params": count_params(model), "macs": count_macs(model, example),
                              "mac_reduction": base / count_macs(model, example), "seconds": [], "per_seed": []}
            rows[name]["seconds"].append(round(secs, 1))
            if train:
                rows[name]["per_seed"].append({"seed": seed, "mac_reduction": base / count_macs(model, example),
                                               **accuracy(model, task)})
    lat = latencies(models, task, args.rounds)
    for name, row in rows.items():
        for metric in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
            row[metric] = statistics.mean(r[metric] for r in row["per_seed"]) if train else None
        row["latency_b1_ms"], row["latency_b32_ms"] = lat[name]["b1"], lat[name]["b32"]
        row["speedup_b1"] = lat["dense"]["b1"] / lat[name]["b1"]
        row["speedup_b32"] = lat["dense"]["b32"] / lat[name]["b32"]
    return list(rows.values())


def table(rows) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| model | target | MACs ÷ | pipeline | held-out % | val % | test % | params | MACs | b1 ms (×) | b32 ms (×) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['target']:g} | {r['mac_reduction']:.2f} | {r['pipeline']} | "
                     f"{pct(r['heldout_accuracy'])} | {pct(r['val_accuracy'])} | "
                     f"{pct(r['test_accuracy'])} | {r['params']:,} | {r['macs']:,} | "
                     f"{r['latency_b1_ms']:.3f} ({r['speedup_b1']:.2f}) | {r['latency_b32_ms']:.3f} "
                     f"({r['speedup_b32']:.2f}) |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/pruning.json")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--factors", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--quick", action="store_true", help="1 model, 1 factor, short training: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.factors, args.pretrain_epochs, args.finetune_epochs, args.rounds, args.seeds = \
            ["digits_cnn"], [2.0], 3, 1, 1, [0]
    torch.set_num_threads(1)
    started = time.time()
    rows = [row for key in args.models for row in bench_model(key, args)]
    result = {"benchmark": "pruning", "ours": OURS, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "rows": rows, "wall_time_s": round(time.time() - started, 1), "versions": library_versions(),
              "protocol": "onnxruntime CPU, 1 thread; median of interleaved rounds, each the median of >=100 "
                          "(b1) / >=30 (b32) runs after warm-up"}
    write_json(args.out, result)
    print(table(rows))
    print(f"\nwrote {args.out} in {result['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
