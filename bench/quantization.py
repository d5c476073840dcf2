"""Quantization and weight coding: our int8 vs torchao's stock PTQ vs onnxruntime quantize_static, in one run.

For each model one fp32 model is trained once (same seed); every int8 variant starts from it:

  fp32            the exported ONNX model (BatchNorm folded by the exporter)
  int8_pt2e       ours: torchao pt2e with our ONNX-target quantizer (int8 residual adds), 8 calibration batches
  torchao_stock   torchao pt2e with the stock X86InductorQuantizer recipe, converted, exported to ONNX
  ort_static      onnxruntime quantize_static (QDQ, per-channel, 8 calibration batches): our int8_ptq method
  data_free_int8  weights quantized without data (CLE + bias correction, per-tensor), activations calibrated
  data_free_synthetic  the same with activations calibrated on inputs generated from the BatchNorm statistics
  *_inductor      torch.compile (Inductor, static shapes, 1 thread): fp32, and the stock recipe's int8 model on
                  its intended back end (oneDNN int8 kernels); these run in torch, not in onnxruntime
Data-free ablation (weights only, simulated, no activation quantization): 8/6/4-bit per-tensor round-to-nearest
with and without CLE + bias correction. QAT rows train the same recipe with the stage in its last epochs
(same seed, same total epochs as fp32). Deep Compression runs recipes/digits_mlp_deep_compression.yaml
beside an fp32 MLP trained for the same epochs.

Latency: 1 thread, batch 1 and batch 32, interleaved rounds (median of round medians); ratios are to the
onnxruntime fp32 model within the run. ``resnet_32px`` is the same ResNet on generated 3x32x32 inputs
(latency only: its accuracy is meaningless). Writes JSON (default bench/results/quantization.json) and
prints Markdown tables.

    python bench/quantization.py            # the README tables (about 20 minutes on 2 shared cores)
    python bench/quantization.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch

from automl.compress import ApplyContext, get_method
from automl.compress.quantization import pt2e
from automl.compress.quantization.datafree import datafree_quantize
from automl.compress.quantization.int8_methods import calibration_batches
from automl.compress.quantization.synthetic import bn_matching_inputs
from automl.configs import parse_config
from automl.io import write_json
from automl.recipe import Recipe, apply_recipe
from automl.recipe.apply import train_with_stages
from automl.runtime import OrtModel, export_onnx
from automl.search.versions import library_versions
from automl.tasks import get_task
from automl.validate import Where
from common import GeneratedTask, latencies

MODELS = {
    "digits_cnn": ("cnn", {"width": 32, "depth": 3, "kernel": 3, "pooling": "stride"}, "digits"),
    "digits_resnet": ("resnet", {"width": 16, "stages": 3, "blocks": 2}, "digits"),
    "resnet_32px": ("resnet", {"width": 16, "stages": 3, "blocks": 2}, "generated"),
}
QAT_ROWS = {  # name -> stage (finetune epochs set from --qat-epochs)
    "mixed_w4a8": {"method": "mixed", "config": {"target_bits": 4.0, "a_bits": 8}},
    "mixed_w4a4": {"method": "mixed", "config": {"target_bits": 4.0, "a_bits": 4}},
    "qat_w4a4": {"method": "qat", "config": {"w_bits": 4, "a_bits": 4}},
}
ROOT = Path(__file__).resolve().parents[1]


def recipe_for(task, family, arch, epochs, lr, stages=()):
    data = {"version": 1, "task": task.name, "arch": {"family": family, **arch},
            "train": {"epochs": epochs, "lr": lr, "seed": 0}, "stages": list(stages)}
    return Recipe.from_dict(data)


def trained(task, family, arch, epochs, lr, stages=()):
    recipe = recipe_for(task, family, arch, epochs, lr, stages)
    ctx = ApplyContext(task=task, work_dir=".", epochs=epochs)
    return train_with_stages(recipe, task, ctx)


def untrained(task, family, arch):
    """Random weights with realistic BatchNorm statistics (a few forward passes in train mode)."""
    torch.manual_seed(0)
    model = task.build_model(family, arch).train()
    with torch.no_grad():
        for x, _ in task.train_loader(batch_size=32, seed=0):
            model(x)
    return model.eval()


def handler(name, config=None, ctx=None, model=None):
    info = get_method(name)
    h = info.handler_cls(parse_config(info.config_cls, config or {}, Where(key=name)))
    h.prepare(model, ctx)
    h.finalize(model, ctx)
    return h


def int8_variants(model, task, tmp: Path, calib_n: int):
    """{name: (onnx path, extra row fields)} for fp32 and every int8 variant of ``model``."""
    ctx = ApplyContext(task=task, work_dir=tmp, epochs=0)
    fp32 = export_onnx(model, task.example_input(1), tmp / "fp32.onnx")
    out = {"fp32": (fp32.path, {"precision": "fp32"})}
    h = handler("int8_pt2e", {"calibration_batches": calib_n}, ctx, model)
    art = h.deploy(copy.copy(fp32), ctx)
    out["int8_pt2e"] = (art.path, {"precision": art.precision, "int8_ops": art.notes["int8_ops"],
                                   "float_ops": art.notes["float_ops"], "parity_vs_torch_int8": h.stats["int8_parity"],
                                   "torch_int8_val": h.stats["int8_torch_accuracy"]})
    calib = calibration_batches(task, calib_n)
    stock = pt2e.quantize_pt2e(model, task.example_input(2), calib, target="inductor")
    path = export_onnx(stock, task.example_input(2), tmp / "torchao_stock.onnx").path
    int8_ops, float_ops = pt2e.onnx_op_counts(path)
    fmt = lambda ops: ",".join(f"{k}:{v}" for k, v in sorted(ops.items())) or "none"  # noqa: E731
    out["torchao_stock"] = (path, {"precision": "int8 (stock x86 recipe)", "int8_ops": fmt(int8_ops),
                                   "float_ops": fmt(float_ops),
                                   "parity_vs_torch_int8": pt2e.parity(stock, OrtModel(path), task.test_loader()),
                                   "torch_int8_val": task.evaluate(stock, task.val_loader())})
    h = handler("int8_ptq", {"calibration_batches": calib_n}, ctx, model)
    art = h.deploy(copy.copy(fp32), ctx)
    int8_ops, float_ops = pt2e.onnx_op_counts(art.path)
    out["ort_static"] = (art.path, {"precision": art.precision, "int8_ops": fmt(int8_ops), "float_ops": fmt(float_ops)})
    for name, calibration in (("data_free_int8", "data"), ("data_free_synthetic", "synthetic")):
        h = handler("data_free", {"calibration_batches": calib_n, "calibration": calibration}, ctx,
                    copy.deepcopy(model))
        art = h.deploy(copy.copy(fp32), ctx)
        out[name] = (art.path, {"precision": art.precision, "parity_vs_torch_int8": h.stats["int8_parity"],
                                "torch_int8_val": h.stats["int8_torch_accuracy"],
                                "activations": art.notes["activations"]})
    return out


def range_fidelity(model, task, calib_n: int) -> dict:
    """Mean |log(range / range on training data)| over the conv / linear outputs, for activation ranges
    taken on synthetic inputs (BatchNorm-matched) and on Gaussian noise: 0 = the real data's ranges."""
    model = copy.deepcopy(model).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}

    def ranges(batches):
        seen = {n: 0.0 for n in layers}
        hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, max(seen[n], float(o.abs().max()))))
                 for n, m in layers.items()]
        with torch.no_grad():
            for b in batches:
                model(b)
        for h in hooks:
            h.remove()
        return seen

    real = ranges(calibration_batches(task, calib_n))
    noise = [torch.randn(32, *task.example_input(1).shape[1:], generator=torch.Generator().manual_seed(i))
             for i in range(calib_n)]
    error = lambda got: statistics.mean(abs(math.log(got[n] / real[n])) for n in real)  # noqa: E731
    return {"synthetic": error(ranges(bn_matching_inputs(model, task.example_input(2), batches=calib_n))),
            "noise": error(ranges(noise))}


class Compiled:
    """torch.compile'd module (Inductor, static shapes: one compilation per batch size), numpy in."""

    def __init__(self, module, examples, int8: bool):
        self.fns = {}
        for x in examples:
            if int8:  # freezing is needed by the int8 lowering; compile each batch size under it
                self.fns[x.shape[0]] = pt2e.compile_inductor(module, x)
            else:
                fn = torch.compile(module, dynamic=False)
                with torch.no_grad():
                    fn(x)
                self.fns[x.shape[0]] = fn

    def __call__(self, x):
        x = torch.from_numpy(x) if not isinstance(x, torch.Tensor) else x
        with torch.no_grad():
            return self.fns[x.shape[0]](x)


def bench_model(key, args, tmp):
    family, arch, task_name = MODELS[key]
    real = task_name == "digits"
    task = get_task("digits") if real else GeneratedTask()
    model = trained(task, family, arch, args.epochs, args.lr)[0] if real else untrained(task, family, arch)
    variants = int8_variants(model, task, tmp / key, args.calibration_batches)
    runners = {n: OrtModel(p, threads=1) for n, (p, _) in variants.items()}
    if args.inductor:  # the stock recipe's intended back end, and fp32 on the same back end
        examples = [task.example_input(1), task.example_input(32)]
        stock = pt2e.quantize_pt2e(model, task.example_input(2), calibration_batches(task, args.calibration_batches),
                                   target="inductor")
        runners["fp32_inductor"] = Compiled(model.eval(), examples, int8=False)
        runners["torchao_stock_inductor"] = Compiled(stock, examples, int8=True)
        variants["fp32_inductor"] = (None, {"precision": "fp32", "runtime": "torch.compile (Inductor)"})
        variants["torchao_stock_inductor"] = (None, {"precision": "int8 (stock x86 recipe)",
                                                     "runtime": "torch.compile (Inductor, oneDNN int8)"})
    lat, raw = latencies(runners, task, args.rounds)
    rows = []
    for name, (path, extra) in variants.items():
        extra = {"runtime": "onnxruntime", **extra}
        row = {"model": key, "variant": name, **extra, "file_kb": path.stat().st_size / 1024 if path else None,
               "latency_b1_ms": lat[name]["b1"], "latency_b32_ms": lat[name]["b32"],
               "speedup_b1": lat["fp32"]["b1"] / lat[name]["b1"], "speedup_b32": lat["fp32"]["b32"] / lat[name]["b32"],
               "latency_rounds": raw[name]}
        if real and path is not None:
            runner = OrtModel(path)
            row["val_accuracy"] = task.evaluate(runner, task.val_loader())
            row["test_accuracy"] = task.evaluate(runner, task.test_loader())
        rows.append(row)
    rows[0]["range_fidelity"] = range_fidelity(model, task, args.calibration_batches)
    extra_rows = []
    if real:
        extra_rows += datafree_ablation(model, task, key)
        extra_rows += qat_rows(task, family, arch, key, args)
    return rows, extra_rows


def datafree_ablation(model, task, key):
    rows = []
    for bits in (8, 6, 4):
        for cle_bc in (False, True):
            gm, _ = datafree_quantize(model, bits=bits, per_channel=False, equalize=cle_bc, correct_bias=cle_bc)
            rows.append({"model": key, "variant": f"w{bits} per-tensor {'CLE+BC' if cle_bc else 'round-to-nearest'}",
                         "kind": "data-free weights only (simulated)",
                         "val_accuracy": task.evaluate(gm, task.val_loader()),
                         "test_accuracy": task.evaluate(gm, task.test_loader())})
    return rows


def qat_rows(task, family, arch, key, args):
    rows = []
    for name, stage in QAT_ROWS.items():
        stage = {**stage, "start_epoch": args.epochs - args.qat_epochs,
                 "config": {**stage["config"], "finetune_epochs": args.qat_epochs}}
        model, (h,) = trained(task, family, arch, args.epochs, args.lr, [stage])
        rows.append({"model": key, "variant": name, "kind": h.label(), "bits": h.stats.get("mixed_bits", ""),
                     "avg_w_bits": h.stats["quant_avg_w_bits"],
                     "val_accuracy": task.evaluate(model, task.val_loader()),
                     "test_accuracy": task.evaluate(model, task.test_loader())})
    return rows


def deep_compression(args, tmp):
    task = get_task("digits")
    recipe = Recipe.load(ROOT / "recipes" / "digits_mlp_deep_compression.yaml")
    ours = apply_recipe(recipe, tmp / "deepc", task=task)
    base = apply_recipe(Recipe.from_dict({**recipe.to_dict(), "stages": [], "metrics": {}}), tmp / "mlp_fp32",
                        task=task)
    m, b = ours.metrics, base.metrics
    return {"model": "mlp_64_300_100_10", "fp32_val": b["accuracy"], "fp32_test": b["test_accuracy"],
            "val": m["accuracy"], "test": m["test_accuracy"], "sparsity": m["pruned_sparsity"],
            "fp32_onnx_kb": b["file_kb"], "dense_state_dict_kb": m["deepc_kb"] * m["deepc_ratio"],
            "deepc_kb": m["deepc_kb"], "ratio_vs_onnx": b["file_kb"] / m["deepc_kb"],
            "ratio_vs_state_dict": m["deepc_ratio"],
            "han_et_al_lenet_300_100": "40x (1070 KB -> 27 KB, MNIST, 98.36% -> 98.42%), reported"}


def tables(rows, extra, deepc) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    out = ["| model | variant | runtime | val % | test % | ONNX = torch int8 | file KB | b1 ms (×fp32) | "
           "b32 ms (×fp32) | int8 / float ops |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parity = "-" if "parity_vs_torch_int8" not in r else f"{100 * r['parity_vs_torch_int8']:.1f}%"
        ops = f"{r.get('int8_ops', '')} / {r.get('float_ops', '')}" if "int8_ops" in r else "-"
        size = "-" if r["file_kb"] is None else f"{r['file_kb']:.1f}"
        out.append(f"| {r['model']} | {r['variant']} | {r['runtime'].split(' (')[0]} | {pct(r.get('val_accuracy'))} | "
                   f"{pct(r.get('test_accuracy'))} | {parity} | {size} | {r['latency_b1_ms']:.3f} "
                   f"({r['speedup_b1']:.2f}) | {r['latency_b32_ms']:.3f} ({r['speedup_b32']:.2f}) | {ops} |")
    out += ["", "| model | activation ranges from | mean \\|log(range / range on training data)\\| |", "|---|---|---|"]
    for r in rows:
        for source, err in r.get("range_fidelity", {}).items():
            out.append(f"| {r['model']} | {source} | {err:.3f} |")
    out += ["", "| model | variant | kind | avg weight bits | val % | test % |", "|---|---|---|---|---|---|"]
    for r in extra:
        bits = f"{r['avg_w_bits']:.2f}" if "avg_w_bits" in r else "-"
        out.append(f"| {r['model']} | {r['variant']} | {r['kind']} | {bits} | {pct(r['val_accuracy'])} | "
                   f"{pct(r['test_accuracy'])} |")
    if deepc:
        d = deepc
        out += ["", "| Deep Compression | val % | test % | sparsity | file | × vs fp32 ONNX | × vs fp32 weights |",
                "|---|---|---|---|---|---|---|",
                f"| fp32 {d['model']} | {pct(d['fp32_val'])} | {pct(d['fp32_test'])} | 0 | "
                f"{d['fp32_onnx_kb']:.1f} KB (ONNX) | 1 | - |",
                f"| pruned + 5-bit shared + Huffman | {pct(d['val'])} | {pct(d['test'])} | "
                f"{100 * d['sparsity']:.1f}% | {d['deepc_kb']:.2f} KB | {d['ratio_vs_onnx']:.1f} | "
                f"{d['ratio_vs_state_dict']:.1f} |",
                "| Han et al. 2016, LeNet-300-100 on MNIST (reported) | - | 98.42 (from 98.36) | 92% | 27 KB | - "
                "| 40 |"]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/quantization.json")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--no-deep-compression", action="store_true")
    parser.add_argument("--no-inductor", dest="inductor", action="store_false",
                        help="skip the torch.compile (Inductor) rows")
    parser.add_argument("--quick", action="store_true", help="one model, short training: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.epochs, args.qat_epochs, args.rounds, args.inductor = ["digits_cnn"], 3, 1, 1, False
    torch.set_num_threads(1)
    started = time.time()
    import tempfile

    rows, extra = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            r, e = bench_model(key, args, Path(tmp))
            rows += r
            extra += e
        deepc = None if args.no_deep_compression or args.quick else deep_compression(args, Path(tmp))
    result = {"benchmark": "quantization", "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "rows": rows, "accuracy_rows": extra, "deep_compression": deepc,
              "wall_time_s": round(time.time() - started, 1), "versions": {**library_versions()},
              "protocol": "onnxruntime CPU, 1 thread; median of interleaved rounds, each the median of >=100 (b1) / "
                          ">=30 (b32) runs after warm-up"}
    try:
        from importlib import metadata

        result["versions"]["torchao"] = metadata.version("torchao")
    except Exception:  # noqa: BLE001 - a version string is informative only
        pass
    write_json(args.out, result)
    print(tables(rows, extra, deepc))
    print(f"\nwrote {args.out} in {result['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
