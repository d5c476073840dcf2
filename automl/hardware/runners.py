"""Runners: callables that run one layer, a layer in context, an empty model or a whole candidate in
its deployed form (onnxruntime session or torch eager), for the timing protocol (timing.py).

Layers holding at least ``cold_min_kb`` of weights are also timed *cold*: round-robin over copies of
the layer with their own weights, together three times the size of L2 (``cold_copies`` at most), so
each call finds its weights evicted to L3 as in a whole model too big for L2 while the code and the
input stay hot (see profile.Entry). Flushing L2 with a buffer before each call was tried and
rejected: it evicts the runtime's code too, and a 50 KB model then seemed to lose 30 us to L3.
An early-exit candidate with an exit plan runs through its deployed runner, one runner per batch of
the plan's inputs (the cost depends on where each input leaves, so no single example represents it).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import onnx
import torch

from automl.errors import ProfileError
from automl.hardware.layer_models import (context_onnx, identity_onnx, input_array, input_shape, layer_module,
                                          layer_onnx, quantize_onnx)
from automl.hardware.layers import LayerKey, weight_bytes
from automl.hardware.profile import Protocol

# onnxruntime runs these in its own blocked layouts (NCHWc fp32, NHWC uint8), converting at a graph's
# edges: a layer timed alone pays conversions that inside a network happen once (measured here: an int8
# maxpool cost 8.9 us alone, 3.8 us in a network). Their entries are timed in context.
CONTEXT_PRECISIONS = ("fp32", "int8_static")


def _ort_runner(path, x: np.ndarray, threads: int) -> Callable[[], object]:
    from automl.runtime import OrtModel

    model = OrtModel(path, threads=threads)   # the deployed session options
    return lambda: model(x)


def _torch_runner(module: torch.nn.Module, x: np.ndarray) -> Callable[[], object]:
    tensor = torch.from_numpy(x)

    def run():
        with torch.inference_mode():
            return module(tensor)
    return run


def layer_runner(key: LayerKey, runtime: str, threads: int, work_dir: Path, copies: int = 1) -> Callable[[], object]:
    """One layer alone on ``runtime`` at its precision; with ``copies`` > 1, each call runs the next of
    that many instances, each holding its own weights (see cold_runner)."""
    x = input_array(key)
    if runtime == "torch":
        if key.precision != "fp32":
            raise ProfileError("the torch runtime runs fp32 layers only", key="--runtime", value=key.id,
                               fix="profile int8 layers with --runtime onnxruntime")
        torch.set_num_threads(threads)
        runs = [_torch_runner(layer_module(key), x) for _ in range(copies)]
    else:
        path = _onnx_at_precision(layer_onnx(key), key, Path(work_dir) / f"layer_{abs(hash(key))}.onnx", alone=True)
        runs = [_ort_runner(path, x, threads) for _ in range(copies)]   # a session holds its own weights
    if copies == 1:
        return runs[0]
    turn = itertools.cycle(runs)
    return lambda: next(turn)()


def _onnx_at_precision(model: onnx.ModelProto, key: LayerKey, path: Path, alone: bool = False) -> Path:
    """``model`` saved at ``path``, quantized to ``key.precision`` (calibrated on the key's inputs)."""
    onnx.save(model, path)
    if key.precision == "fp32":
        return path
    return quantize_onnx(path, path.with_name(path.stem + f".{key.precision}.onnx"), key.precision,
                         [input_array(key, seed=s) for s in range(1, 5)], alone=alone)


def context_runner(key: LayerKey, threads: int, work_dir: Path, with_layer: bool = True,
                   session: int = 0) -> Callable[[], object]:
    """The layer behind its producer, or the producer alone (context_onnx), quantized as a network;
    ``session`` numbers independent copies (own file, own onnxruntime session)."""
    name = f"{'ctx' if with_layer else 'prod'}{session}_{abs(hash(key if with_layer else input_shape(key)))}"
    path = _onnx_at_precision(context_onnx(key, with_layer), key, Path(work_dir) / f"{name}.onnx")
    return _ort_runner(path, input_array(key), threads)


def cold_runner(key: LayerKey, runtime: str, threads: int, work_dir: Path, protocol: Protocol,
                l2_cache_kb: int) -> Callable[[], object]:
    """The layer cycling over copies whose weights together are 3x L2 (6 MB when L2 is unknown)."""
    copies = min(protocol.cold_copies, max(2, math.ceil(3 * 1024 * (l2_cache_kb or 2048) / weight_bytes(key))))
    return layer_runner(key, runtime, threads, work_dir, copies)


def times_cold(key: LayerKey, protocol: Protocol) -> bool:
    return weight_bytes(key) >= protocol.cold_min_kb * 1024


def overhead_runner(runtime: str, threads: int, work_dir: Path) -> Callable[[], object]:
    x = np.zeros((1, 1, 8, 8), dtype=np.float32)
    if runtime == "torch":
        return _torch_runner(torch.nn.Identity(), x)
    path = Path(work_dir) / "identity.onnx"
    onnx.save(identity_onnx(x.shape), path)
    return _ort_runner(path, x, threads)


def model_runner(candidate, runtime: str, threads: int, work_dir: Path, name: str) -> Callable[[], object]:
    """A whole candidate in its deployed form: exported ONNX (quantized at its precision) or torch eager."""
    x = candidate.example.numpy().astype(np.float32)
    if runtime == "torch":
        torch.set_num_threads(threads)
        return _torch_runner(candidate.model.eval(), x)
    from automl.runtime import export_onnx

    path = export_onnx(candidate.model, candidate.example[:1], Path(work_dir) / f"{name}.onnx").path
    if candidate.precision != "fp32":
        rng = np.random.default_rng(0)
        calib = [rng.standard_normal(x.shape).astype(np.float32) for _ in range(4)]
        path = quantize_onnx(path, path.with_name(f"{name}.{candidate.precision}.onnx"), candidate.precision, calib)
    return _ort_runner(path, x, threads)


def early_exit_runners(candidate, runtime: str, threads: int, work_dir: Path
                       ) -> Tuple[Dict[str, Callable[[], object]], Tuple[float, ...]]:
    """One runner per batch of ``candidate.exit_plan.inputs`` through the deployed early-exit model (the
    segment graphs of ``export_early_exit`` chained by EarlyExitRunner; torch: ``EarlyExitModel.infer``),
    and the share of the inputs leaving at each early exit there."""
    plan = candidate.exit_plan
    if candidate.precision != "fp32":
        raise ProfileError("early exit deploys float segment graphs only", key="precision",
                           value=candidate.precision, fix="validate early-exit candidates with an fp32 profile")
    size = candidate.example.shape[0]
    x = plan.inputs.detach().numpy().astype(np.float32)
    batches = [np.ascontiguousarray(x[i:i + size]) for i in range(0, len(x) - size + 1, size)]
    if runtime == "torch":
        torch.set_num_threads(threads)
        model, tensors = candidate.model.eval(), [torch.from_numpy(b) for b in batches]
        run = lambda b: model.infer(b, list(plan.thresholds), plan.criterion)  # noqa: E731
        inputs = tensors
    else:
        from automl.compress.early_exit.export import EarlyExitRunner, export_early_exit

        manifest = export_early_exit(candidate.model, candidate.example[:1], Path(work_dir) / "early_exit",
                                     list(plan.thresholds), plan.criterion)
        run, inputs = EarlyExitRunner.load(manifest.parent, threads=threads), batches
    taken = np.concatenate([np.asarray(run(b)[1]) for b in inputs])
    counts = np.bincount(taken, minlength=len(plan.thresholds) + 1)
    shares = tuple(float(c) / len(taken) for c in counts[:-1])
    return {f"batch_{j}": (lambda b=b: run(b)) for j, b in enumerate(inputs)}, shares


