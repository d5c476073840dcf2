"""Bring your own model: third-party zoo models, trained once, then compressed from their checkpoint.

For each pytorchcv model (bench/zoo.py; random init, no download) on digits as a folder of 32x32 PNG
images (val 20 %, test 20 %):

1. the user's side: train it (``--train-epochs``, SGD with momentum, cosine) and save a state_dict;
2. baseline: the checkpoint exported as is (fp32 ONNX), measured;
3. automl: ``structured`` 2x MACs (thinned, ``--allocation``, ``--round-to`` channel grid, BatchNorm-scale
   criterion) +
   ``int8_ptq`` static (calibration auto), ``kd`` from the checkpoint, ``--finetune-epochs`` of fine-tuning
   (SGD at ``--finetune-lr``, default the training's lr: learning-rate rewinding), all through
   ``apply_recipe`` (what ``automl apply`` runs) with only the model builder and the data folder;
4. hand-written: what a user chaining the tools would write -- Torch-Pruning's MagnitudePruner (L1)
   to the same MACs as (3), the same fine-tune epochs, optimizer and learning rate (plain cross-entropy),
   torch.onnx export, onnxruntime ``quantize_static`` (QDQ, per channel, its defaults otherwise);
5. search: ``automl search --model ... --checkpoint ... --data ... --max-drop 0.01`` with the
   embedded compression space, ``--trials`` trials of ``--finetune-epochs`` each; the fastest point
   within the budget; for the ``--scratch`` models, the same search with no checkpoint (every trial
   trains the dense model for train + fine-tune epochs), to compare wall times.

Latency: onnxruntime, 1 thread, batch 1 and batch 32, rounds interleaved over the deployed files,
median; ratios against the baseline in the same run. Writes bench/results/byom.json.

    python bench/byom.py                       # every model (about 90 minutes on 2 cores)
    python bench/byom.py --models resnet20 --trials 2 --quick
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from zoo import MODELS  # noqa: E402

from automl.recipe import Recipe, apply_recipe  # noqa: E402
from automl.recipe.apply import train_with_stages  # noqa: E402
from automl.compress import ApplyContext  # noqa: E402
from automl.modelstats import count_macs, count_params  # noqa: E402
from automl.runtime import OrtModel, export_onnx, measure_latency  # noqa: E402
from automl.tasks.data import data_task, parse_data  # noqa: E402
from automl.validate import Where  # noqa: E402

BENCH = Path(__file__).resolve().parent
BUILDER = f"{BENCH / 'zoo.py'}:build"
# the user's training (SGD, cosine) and the fine-tune both pipelines get (same optimizer, lr and epochs;
# the lr is set by --finetune-lr, default the training's: "learning-rate rewinding", Renda et al. 2020)
TRAIN = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
FINETUNE = {**TRAIN}


def write_digits(root: Path):
    """scikit-learn's digits as 32x32 RGB PNG files, one folder per class (what a user's data looks like)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if root.is_dir():
        return
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = (image / 16.0 * 255).astype(np.uint8).repeat(4, 0).repeat(4, 1)
        folder = root / f"{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(folder / f"{i:04d}.png")


def recipe(name, data, *, checkpoint=None, epochs=0, stages=(), seed=0):
    model = {"builder": BUILDER, "kwargs": {"name": name}, **({"checkpoint": str(checkpoint)} if checkpoint else {})}
    train = {"epochs": epochs, **(FINETUNE if checkpoint else TRAIN), "batch_size": 32, "seed": seed}
    return Recipe.from_dict({"version": 1, "data": data, "model": model, "train": train, "stages": list(stages)})


def train_user_model(name, data, task, epochs, path: Path, reuse=False):
    started = time.time()
    done = path.with_suffix(".json")
    if reuse and path.is_file() and done.is_file() and json.loads(done.read_text()).get("epochs") == epochs:
        return json.loads(done.read_text())["train"]
    model, _ = train_with_stages(recipe(name, data, epochs=epochs), task,
                                 ApplyContext(task=task, work_dir=path.parent, epochs=epochs))
    torch.save(model.state_dict(), path)
    row = {"seconds": time.time() - started, "torch_val_accuracy": task.evaluate(model, task.val_loader())}
    done.write_text(json.dumps({"epochs": epochs, "train": row}))
    return row


def automl_stages(finetune, allocation="uniform", target_parity=None, round_to=16):
    return [{"method": "kd", "start_epoch": 0, "config": {"temperature": 4.0, "alpha": 0.5}},
            {"method": "structured", "start_epoch": 0,
             "config": {"mac_reduction": 2.0, "criterion": "bn_scale", "allocation": allocation, "round_to": round_to,
                        "finetune_epochs": finetune}},
            {"method": "int8_ptq", "config": {"mode": "static", "calibration_method": "auto",
                                              **({"target_parity": target_parity} if target_parity else {})}}]


def hand_pipeline(name, data, task, checkpoint, target_macs, finetune, work: Path, seed=0):
    """Torch-Pruning to ``target_macs`` + fine-tune + onnxruntime quantize_static, as a user writes it."""
    import torch_pruning as tp
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from automl.recipe.build import recipe_model

    dense = recipe_model(recipe(name, data, checkpoint=checkpoint), task).eval()
    example = task.example_input(1)

    def pruned(ratio):
        model = copy.deepcopy(dense)
        classifier = [m for m in model.modules()  # a Linear or 1x1 Conv head: its outputs are the classes
                      if getattr(m, "out_features", getattr(m, "out_channels", None)) == task.num_classes]
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=classifier)
        pruner.step()
        return model

    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):  # the ratio that gives the MACs automl reached
        mid = (lo + hi) / 2
        model = pruned(mid)
        macs = count_macs(model, example)
        best = (mid, model, macs) if best is None or abs(macs - target_macs) < abs(best[2] - target_macs) else best
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    ratio, model, macs = best
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=FINETUNE["lr"], momentum=FINETUNE["momentum"],
                                weight_decay=FINETUNE["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(finetune, 1))
    for epoch in range(finetune):
        task.train_epoch(model, optimizer, task.train_loader(batch_size=32, seed=1000 * seed + epoch))
        scheduler.step()
    model.eval()
    fp32 = export_onnx(model, example, work / f"tp-s{seed}.onnx").path
    pre, int8 = work / f"tp-s{seed}.pre.onnx", work / f"tp-s{seed}.int8.onnx"
    quant_pre_process(str(fp32), str(pre))

    class Reader:
        def __init__(self):
            batches = [x.numpy() for _, (x, _) in zip(range(8), task.train_loader(32, 0))]
            self.it = iter({"input": b} for b in batches)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return {"ratio": ratio, "macs": macs, "params": count_params(model), "torch_val_accuracy":
            task.evaluate(model, task.val_loader()), "onnx": str(int8)}


def onnx_accuracy(path, task):
    runner = OrtModel(path)
    return task.evaluate(runner, task.val_loader()), task.evaluate(runner, task.test_loader())


def latencies(paths, task, rounds):
    """Median batch-1 and batch-32 ms per file, rounds interleaved."""
    sessions = {k: OrtModel(p) for k, p in paths.items()}
    x1 = task.example_input(1).numpy()
    x32 = np.repeat(x1, 32, axis=0)
    times = {k: {1: [], 32: []} for k in paths}
    for _ in range(rounds):
        for k, s in sessions.items():
            times[k][1].append(measure_latency(s, x1, warmup=20, repeats=200, min_seconds=0.2)["median_ms"])
            times[k][32].append(measure_latency(s, x32, warmup=5, repeats=30, min_seconds=0.2)["median_ms"])
    return {k: {f"b{b}_ms": statistics.median(v) for b, v in t.items()} for k, t in times.items()}


def search(name, checkpoint, data, trials, epochs, out: Path):
    """The default compression space over the model: from ``checkpoint`` with ``epochs`` of fine-tuning
    per trial, or (checkpoint None) from scratch, every trial training the dense model first."""
    from automl.search import run_search
    from automl.spaces.user import user_space

    space = user_space(builder=BUILDER, checkpoint=str(checkpoint) if checkpoint else None, data=data,
                       max_drop=0.01 if checkpoint else None, epochs=epochs)
    from automl.spaces import parse_space

    # through the raw space, so the run's space.yaml (what `automl resume` reads) says the same
    raw = {**space.raw, "model": {**space.raw["model"], "kwargs": {"name": name}},
           "budget": {**space.raw.get("budget", {}), "trials": trials}}
    space = parse_space(raw, space.source)
    started = time.time()
    outcome = run_search(space, out, force=True)
    picks = outcome.report.get("within_budget", {})
    counts = outcome.report["status_counts"]
    return {"wall_s": time.time() - started, "trials": trials, "status": counts, "fastest": picks.get("fastest"),
            "smallest": picks.get("smallest"), "concurrency": space.budget.concurrency}


def dense_training_s(run: Path, train_epochs: int, concurrency: int) -> float:
    """Wall seconds a from-scratch search spent on dense training: its trials' first ``train_epochs``
    epochs (the first one also trains the distillation teacher), from Tune's per-trial results, divided
    among the concurrent trials."""
    total = 0.0
    for path in (run / "tune").rglob("result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        total += sum(r["time_this_iter_s"] for r in rows if r["training_iteration"] <= train_epochs)
    return total / max(concurrency, 1)


KEPT = ("accuracy", "test_accuracy", "params", "macs", "mac_reduction", "precision", "structured_groups_skipped")


def compress(name, args, data, task, work: Path, baseline_macs, seed):
    """Both pipelines from the checkpoint with fine-tune seed ``seed``: (rows, deployed files)."""
    checkpoint = work / "weights.pt"
    stages = automl_stages(args.finetune_epochs, args.allocation, args.target_parity, args.round_to)
    ours = apply_recipe(recipe(name, data, checkpoint=checkpoint, epochs=args.finetune_epochs, stages=stages,
                               seed=seed), work / f"automl-s{seed}", task=task)
    rows = {"automl": {k: ours.metrics.get(k) for k in KEPT}}
    paths = {"automl": ours.artifact.path}
    try:
        hand = hand_pipeline(name, data, task, checkpoint, ours.metrics["macs"], args.finetune_epochs, work, seed)
        val, test = onnx_accuracy(hand["onnx"], task)
        rows["torch_pruning"] = {**{k: v for k, v in hand.items() if k != "onnx"}, "accuracy": val,
                                 "test_accuracy": test, "mac_reduction": baseline_macs / hand["macs"]}
        paths["torch_pruning"] = hand["onnx"]
    except Exception as exc:  # Torch-Pruning fails on some graphs: that is a result too
        rows["torch_pruning"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return rows, paths


def seed_mean(rows: list) -> dict:
    """One pipeline's figures averaged over seeds (numbers), else the first seed's value."""
    if any("error" in r for r in rows):
        return next(r for r in rows if "error" in r)
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return {k: statistics.mean(r[k] for r in rows) if numeric(v) else v for k, v in rows[0].items()}


def run_model(name, args, data, task, work: Path):
    work.mkdir(parents=True, exist_ok=True)
    row = {"model": name, "graph": MODELS[name][2]}
    checkpoint = work / "weights.pt"
    row["train"] = train_user_model(name, data, task, args.train_epochs, checkpoint, args.reuse_checkpoints)
    base = apply_recipe(recipe(name, data, checkpoint=checkpoint), work / "baseline", task=task)
    row["baseline"] = {k: base.metrics[k] for k in ("accuracy", "test_accuracy", "params", "macs")}
    runs, paths = {}, {"baseline": base.artifact.path}
    for seed in args.seeds:
        runs[seed], files = compress(name, args, data, task, work, row["baseline"]["macs"], seed)
        paths.update({(key, seed): path for key, path in files.items()})
    lat = latencies(paths, task, args.rounds)  # every deployed file of every seed, rounds interleaved
    row["baseline"].update(lat["baseline"])
    for (key, seed), timing in ((k, v) for k, v in lat.items() if k != "baseline"):
        runs[seed][key].update(timing, speedup_b1=lat["baseline"]["b1_ms"] / timing["b1_ms"],
                               speedup_b32=lat["baseline"]["b32_ms"] / timing["b32_ms"],
                               param_ratio=row["baseline"]["params"] / runs[seed][key]["params"])
    for v in [row["baseline"], *(r for seed in runs.values() for r in seed.values() if "error" not in r)]:
        # val and test are the same size (20 % each) and neither pipeline selects on them: their mean
        # halves the noise of one 360-image split
        v["holdout_accuracy"] = (v["accuracy"] + v["test_accuracy"]) / 2
    row["seeds"] = [{"seed": seed, **runs[seed]} for seed in args.seeds]
    for key in ("automl", "torch_pruning"):  # the mean over seeds; each seed's figures are in row["seeds"]
        row[key] = seed_mean([runs[seed][key] for seed in args.seeds])
    if args.trials:
        row["search"] = search(name, checkpoint, data, args.trials, args.finetune_epochs, work / "search")
    if args.trials and name in args.scratch:  # the same trials, each training the dense model first
        epochs = args.train_epochs + args.finetune_epochs
        scratch = search(name, None, data, args.trials, epochs, work / "scratch")
        dense = dense_training_s(work / "scratch", args.train_epochs, scratch["concurrency"])
        row["scratch_search"] = {"wall_s": scratch["wall_s"], "epochs": epochs, "status": scratch["status"],
                                 "finetune_share_s": scratch["wall_s"] * args.finetune_epochs / epochs,
                                 "dense_training_s": dense, "without_dense_training_s": scratch["wall_s"] - dense}
    return row


def table(rows):
    print("\n| model | graph | variant | val % | test % | val+test % | MACs x | params x | b1 x | b32 x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for key in ("baseline", "automl", "torch_pruning"):
            v = r.get(key, {})
            if "error" in v:
                print(f"| {r['model']} | {r['graph']} | {key} | failed: {v['error'][:60]} | | | | | | |")
                continue
            macs = 1.0 if key == "baseline" else v.get("mac_reduction", 0)
            fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            accuracies = " | ".join(f"{100 * v[k]:.1f}" for k in ("accuracy", "test_accuracy", "holdout_accuracy"))
            ratios = " | ".join(fmt(v.get(k, 1.0)) for k in ("param_ratio", "speedup_b1", "speedup_b32"))
            print(f"| {r['model']} | {r['graph']} | {key} | {accuracies} | {fmt(macs)} | {ratios} |")
        if len(r.get("seeds", ())) > 1:
            each = {k: "/".join(f"{100 * s[k]['holdout_accuracy']:.1f}" if "holdout_accuracy" in s[k] else "-"
                                for s in r["seeds"]) for k in ("automl", "torch_pruning")}
            print(f"| {r['model']} | {r['graph']} | val+test % by seed | automl {each['automl']} | "
                  f"torch_pruning {each['torch_pruning']} | | | | | |")
        s = r.get("search", {}).get("fastest")
        if s:
            print(f"| {r['model']} | {r['graph']} | search (fastest within 1 point) | {100 * s['accuracy']:.1f} "
                  f"| | | | | {s['speedup']:.2f} | |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet20", "seresnet20", "mobilenetv2", "shufflenetv2",
                                                        "ghostnet", "regnetx002", "densenet40"])
    parser.add_argument("--train-epochs", type=int, default=24)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--scratch", nargs="*", default=["resnet20"],
                        help="models whose search also runs from scratch (train + fine-tune epochs per trial)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="fine-tune seeds of both pipelines (shuffling, allocation sampling); means reported")
    parser.add_argument("--finetune-lr", type=float, default=TRAIN["lr"],
                        help="SGD lr of both pipelines' fine-tune (default: the training's, cosine again)")
    parser.add_argument("--reuse-checkpoints", action="store_true",
                        help="keep a model's checkpoint from an earlier run in --work (same --train-epochs)")
    parser.add_argument("--allocation", default="uniform", choices=("uniform", "global", "sampled"),
                        help="how automl's structured stage shares the MAC target among groups")
    parser.add_argument("--round-to", type=int, default=16,
                        help="automl's channel grid: every thinned width a multiple of it (16: fast kernels)")
    parser.add_argument("--target-parity", type=float, default=None,
                        help="automl's int8_ptq keeps its most harmful layers float below this agreement")
    parser.add_argument("--work", default="/tmp/automl-byom-bench")
    parser.add_argument("--out", default=str(BENCH / "results" / "byom.json"))
    parser.add_argument("--quick", action="store_true", help="1 training epoch, 1 fine-tune epoch, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.train_epochs, args.finetune_epochs, args.rounds = 1, 1, 2
    torch.set_num_threads(1)
    FINETUNE["lr"] = args.finetune_lr
    work = Path(args.work)
    args.data = work / "digits32"
    write_digits(args.data)
    data = {"path": str(args.data), "mean": 0.5, "std": 0.25, "val_fraction": 0.2, "test_fraction": 0.2}
    task = data_task(parse_data(data, Where("bench", "data")))
    import platform

    results = {"cpu": platform.processor() or platform.machine(), "args": {k: str(v) for k, v in vars(args).items()},
               "models": []}
    try:
        with open("/proc/cpuinfo") as handle:
            results["cpu"] = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for name in args.models:
        started = time.time()
        print(f"== {name}", flush=True)
        row = run_model(name, args, data, task, work / name)
        row["seconds"] = time.time() - started
        results["models"].append(row)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
        table([row])
    table(results["models"])


if __name__ == "__main__":
    main()
