"""onnxruntime sessions, the latency protocol and the CPU's int8 constraint.

Latency is always measured on the deployed artifact (ONNX model in onnxruntime with fixed threads):
median of repeated runs after warm-up. Nothing here estimates speed from FLOPs."""
from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from typing import Callable, Dict

import numpy as np
import torch

from automl.errors import MeasurementError


class OrtModel:
    """An onnxruntime session on the CPU provider with fixed thread counts."""

    def __init__(self, path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def measure_latency(fn: Callable, example, *, warmup: int = 30, repeats: int = 300,
                    min_seconds: float = 0.2) -> Dict[str, float]:
    """Median / p10 / p90 wall time in ms of ``fn(example)``; repeats at least ``min_seconds`` long."""
    for _ in range(warmup):
        fn(example)
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 100 * repeats):
        t0 = time.perf_counter_ns()
        fn(example)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    median = statistics.median(times)
    if not np.isfinite(median) or median <= 0:
        raise MeasurementError(f"latency measurement gave {median} ms")
    qs = np.percentile(times, [10, 90])
    return {"median_ms": median, "p10_ms": float(qs[0]), "p90_ms": float(qs[1]), "runs": len(times)}


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def int8_reduce_range() -> bool:
    """Whether int8 models must keep one operand to 7 bits on this CPU.

    x86 CPUs without VNNI multiply uint8 activations by int8 weights with vpmaddubsw, which adds pairs
    of products in int16 and saturates at full 8-bit ranges (255 x 127 x 2 > 32767): onnxruntime's
    int8 kernels then give wrong results on such CPUs (measured on an AVX2-only AMD EPYC: residual
    ResNet logits off by 1.5 where one quantization step is 0.065, accuracy 95 -> 91 %). With 7-bit
    weights (onnxruntime's reduce_range) or 7-bit activations (torchao's), no pair overflows.
    ``AUTOML_INT8_REDUCE_RANGE=0/1`` overrides the detection."""
    forced = os.environ.get("AUTOML_INT8_REDUCE_RANGE")
    if forced in ("0", "1"):
        return forced == "1"
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and not any(f in flags for f in VNNI_FLAGS)
