"""Every graph of the third-party zoo through the profiler's tracer and `automl apply`, to show what
works on models automl has never seen -- and that everything else is refused with a message, never a
crash.

For each pytorchcv model of bench/zoo.py's SWEEP (random weights, adapted to 32x32 inputs):

1. tracer: the layers a hardware profile would price (`automl profile measure --model` starts here),
   or the refusal naming the layer and the fix;
2. `automl apply` (a subprocess, as a user runs it) of a recipe with the model builder and the digits
   folder: 1 training epoch, ``structured`` ``--mac-reduction`` (thinned, 16-channel grid) and
   ``int8_ptq`` static. Exit 0: the reached MAC reduction, int8 parity, speed-up of the int8 model over
   its float form (batch 1, 1 thread), seconds; exit 2: the refusal (a bad input, e.g. a MAC target
   the graph cannot reach, found before training); anything else is a crash, a bug.

Accuracy after one epoch from random weights means nothing here (bench/byom.py measures accuracy).

    python bench/zoo_sweep.py                   # all 36 models, about 15 minutes on 2 cores
    python bench/zoo_sweep.py --models mixnet_s octresnet
Writes bench/results/zoo_sweep.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from byom import write_digits  # noqa: E402
from zoo import SWEEP, build  # noqa: E402

BENCH = Path(__file__).resolve().parent
KEPT = ("mac_reduction", "int8_parity", "speedup_vs_float", "warning", "precision", "structured_groups_skipped")


def trace(name: str) -> dict:
    from automl.errors import ConfigError
    from automl.hardware.layers import trace_layers

    try:
        return {"layers": len(trace_layers(build(name).eval(), torch.zeros(1, 3, 32, 32)))}
    except ConfigError as exc:
        return {"refused": str(exc).splitlines()[0][:400]}


def apply(name: str, data: Path, work: Path, mac_reduction: float) -> dict:
    recipe = {"version": 1, "model": {"builder": f"{BENCH / 'zoo.py'}:build", "kwargs": {"name": name}},
              "data": {"path": str(data), "mean": 0.5, "std": 0.25, "val_fraction": 0.2, "test_fraction": 0.2},
              "train": {"epochs": 1, "lr": 1e-3, "batch_size": 64},
              "stages": [{"method": "structured", "config": {"mac_reduction": mac_reduction, "finetune_epochs": 0}},
                         {"method": "int8_ptq", "config": {"mode": "static"}}]}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "automl", "apply", str(path), "--out", str(work / name), "--force"],
                          capture_output=True, text=True)
    row = {"exit": proc.returncode, "seconds": round(time.time() - started, 1)}
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    if proc.returncode == 0:
        metrics = json.loads((work / name / "metrics.json").read_text())
        row.update({k: metrics.get(k) for k in KEPT})
    else:
        row["message"] = next((line for line in lines if "error:" in line), lines[-1] if lines else "")[:400]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SWEEP))
    parser.add_argument("--mac-reduction", type=float, default=2.0)
    parser.add_argument("--work", default="/tmp/automl-zoo-sweep")
    parser.add_argument("--out", default=str(BENCH / "results" / "zoo_sweep.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    write_digits(work / "digits32")
    rows = []
    for name in args.models:
        row = {"model": name, "graph": SWEEP[name][2], "tracer": trace(name),
               "apply": apply(name, work / "digits32", work, args.mac_reduction)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    exits = [r["apply"]["exit"] for r in rows]
    summary = {"models": len(rows), "compressed": exits.count(0), "refused": exits.count(2),
               "crashed": [r["model"] for r in rows if r["apply"]["exit"] not in (0, 2)],
               "traced": sum("layers" in r["tracer"] for r in rows),
               "int8_slower_than_float": [r["model"] for r in rows if (r["apply"].get("speedup_vs_float") or 9) < 1]}
    out = {"cpu": cpu_name(), "args": vars(args), "summary": summary, "models": rows,
           "command": "python bench/zoo_sweep.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(summary, indent=1))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
