"""Training threads per trial: the same recipe trained with train.threads 1, 2, ... (what a trial
holding budget.resources {cpu: N} uses), wall time of the training epochs and the accuracy reached.

    python bench/threads.py                    # ResNet on 32x32 digits, threads 1 and 2, 3 rounds
    python bench/threads.py --threads 1 2 4 --rounds 1
Writes bench/results/threads.json.
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

RECIPE = """
version: 1
task: digits32
arch: {family: resnet, width: 16, stages: 3, blocks: 1}
train: {epochs: EPOCHS, lr: 0.003, batch_size: 64, seed: 0}
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads.json"))
    args = parser.parse_args()
    from automl.hardware.profile import cpu_model
    from automl.recipe import Recipe, apply_recipe

    base = Recipe.loads(RECIPE.replace("EPOCHS", str(args.epochs)), "threads.yaml")
    seconds = {n: [] for n in args.threads}
    accuracy = {}
    for _ in range(args.rounds):
        for n in args.threads:  # interleaved, so a slow moment of the machine hits every setting
            recipe = dataclasses.replace(base, train=dataclasses.replace(base.train, threads=n))
            epochs = []
            with tempfile.TemporaryDirectory() as work:
                started = [time.perf_counter()]

                def on_epoch(epoch, metrics):
                    epochs.append(time.perf_counter() - started[0])
                    started[0] = time.perf_counter()

                result = apply_recipe(recipe, work, on_epoch=on_epoch)
            seconds[n].append(sum(epochs))
            accuracy[n] = result.metrics["accuracy"]
    rows = [{"threads": n, "train_s": round(statistics.median(seconds[n]), 2), "accuracy": accuracy[n],
             "speedup_vs_first": round(statistics.median(seconds[args.threads[0]]) / statistics.median(seconds[n]), 2)}
            for n in args.threads]
    out = {"cpu": cpu_model(), "recipe": RECIPE.replace("EPOCHS", str(args.epochs)).strip(), "rounds": args.rounds,
           "rows": rows, "command": "python bench/threads.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        print(f"threads {r['threads']}: {r['train_s']} s of training ({r['speedup_vs_first']}x), "
              f"accuracy {r['accuracy']:.4f}")


if __name__ == "__main__":
    main()
