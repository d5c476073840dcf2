"""Half precision: fp32 vs the `fp16` method's float16 ONNX model in onnxruntime, beside torch bf16, in one run.

For each model one recipe with the `fp16` stage is applied (trained once, seed 0); its work directory
holds the fp32 ONNX model the stage started from and the float16 one it deployed. Rows:

  ort_fp32        the exported fp32 ONNX model in onnxruntime
  ort_fp16        the `fp16` method's deployed model (float16 weights and activations, float32 inputs)
  torch_fp32      the trained torch model, eager
  torch_bf16      the same model cast to bfloat16, eager (oneDNN bf16 kernels where the CPU has
                  AVX512-BF16 or AMX); its torch.export program's file size is reported

Latency: 1 thread, batch 1 and batch 32, interleaved rounds (median of round medians); ratios are to
ort_fp32 within the run. Accuracy on the validation and test splits; files are the bytes on disk.
Writes JSON (default bench/results/half.json) and prints a Markdown table.

    python bench/half.py            # the README table (about 2 minutes on 2 shared cores)
    python bench/half.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import copy
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

MODELS = {  # name -> (task, family, arch, epochs)
    "digits_cnn": ("digits", "cnn", {"width": 32, "depth": 3, "kernel": 3, "pooling": "stride"}, 8),
    "digits32_resnet": ("digits32", "resnet", {"width": 16, "stages": 3, "blocks": 2}, 4),
}
ROOT = Path(__file__).resolve().parents[1]


class TorchRunner:
    """numpy batch -> logits of a torch model at ``dtype`` (inputs cast inside, as a deployed model would)."""

    def __init__(self, model, dtype):
        self.model, self.dtype = copy.deepcopy(model).to(dtype).eval(), dtype

    @torch.no_grad()
    def __call__(self, x):
        return self.model(torch.from_numpy(x).to(self.dtype)).float().numpy()


def exported_kb(model, example, path: Path) -> float:
    """Size of the torch.export program of ``model`` in bfloat16 (what a torch bf16 deployment ships)."""
    program = torch.export.export(copy.deepcopy(model).to(torch.bfloat16).eval(), (example.to(torch.bfloat16),))
    torch.export.save(program, str(path))
    return path.stat().st_size / 1024


def accuracy(runner, task, loader) -> float:
    right = total = 0
    for x, y in loader:
        right += int((torch.from_numpy(runner(x.numpy())).argmax(1) == y).sum())
        total += len(y)
    return right / total


def bench_model(name, args, tmp: Path):
    task_name, family, arch, epochs = MODELS[name]
    task = get_task(task_name)
    recipe = Recipe.from_dict({"version": 1, "task": task_name, "arch": {"family": family, **arch},
                               "train": {"epochs": 1 if args.quick else epochs, "lr": 0.005, "seed": 0},
                               "stages": [{"method": "fp16", "config": {}}]})
    result = apply_recipe(recipe, tmp / name, task=task)
    fp32_path = tmp / name / "model.onnx"
    runners = {"ort_fp32": OrtModel(fp32_path), "ort_fp16": OrtModel(result.artifact.path),
               "torch_fp32": TorchRunner(result.model, torch.float32),
               "torch_bf16": TorchRunner(result.model, torch.bfloat16)}
    lat, _ = latencies(runners, task, args.rounds)
    files = {"ort_fp32": fp32_path.stat().st_size / 1024, "ort_fp16": result.artifact.path.stat().st_size / 1024,
             "torch_bf16": exported_kb(result.model, task.example_input(2), tmp / name / "bf16.pt2")}
    rows = {}
    for row, runner in runners.items():
        rows[row] = {"val": accuracy(runner, task, task.val_loader()), "test": accuracy(runner, task, task.test_loader()),
                     "b1_ms": lat[row]["b1"], "b32_ms": lat[row]["b32"],
                     "b1_speedup": lat["ort_fp32"]["b1"] / lat[row]["b1"],
                     "b32_speedup": lat["ort_fp32"]["b32"] / lat[row]["b32"], "file_kb": files.get(row)}
    return {"fp16_parity": result.metrics["fp16_parity"], "rows": rows}


def table(results) -> str:
    lines = ["| model | row | val % | test % | file kB | b1 x | b32 x |", "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for row, r in res["rows"].items():
            kb = "" if r["file_kb"] is None else f"{r['file_kb']:.0f}"
            lines.append(f"| {name} | {row} | {100 * r['val']:.1f} | {100 * r['test']:.1f} | {kb} | "
                         f"{r['b1_speedup']:.2f} | {r['b32_speedup']:.2f} |")
    return "\n".join(lines)


def cpu_flags() -> list:
    try:
        words = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({w for w in words if w in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16",
                                             "avx512_vnni", "f16c")})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 training epoch, 1 round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "half.json"))
    args = parser.parse_args(argv)
    args.rounds = 1 if args.quick else args.rounds
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: bench_model(name, args, Path(tmp)) for name in MODELS}
    write_json(Path(args.out), {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "versions": library_versions(),
                                "protocol": "1 thread; median of interleaved rounds, each the median of >=100 (b1) / "
                                            ">=30 (b32) runs; speed-ups against ort_fp32 in the same run",
                                "quick": args.quick, "models": results})
    print(table(results))


if __name__ == "__main__":
    main()
