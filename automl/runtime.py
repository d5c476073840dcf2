"""The deployed form: ONNX export, onnxruntime sessions and the latency protocol.

Latency is always measured on the deployed artifact (ONNX model in onnxruntime with fixed
threads): median of repeated runs after warm-up. Nothing here estimates speed from FLOPs.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from automl.errors import MeasurementError


@dataclass(frozen=True)
class QuantInfo:
    """How a deployed model is quantized, typed for pricing by a hardware profile; ``Artifact.precision``
    is the label for people. Set by the quantization method that deployed it."""

    priced_as: str = "fp32"       # the profile precision that prices it (fp32, int8_static, int8_dynamic, ...)
    simulated: bool = False       # low-bit values computed in float: priced as float, without its fake-quantizers
    w_bits: Optional[int] = None  # weight bits of every quantized layer, where one number holds for all
    a_bits: Optional[int] = None  # their input bits, where one number holds (None: float or per layer)
    layer_w_bits: Dict[str, int] = field(default_factory=dict)  # per quantized layer, where the method records it


@dataclass
class Artifact:
    """A deployable model file and what it is."""

    path: Path
    runtime: str = "onnxruntime"
    precision: str = "fp32"
    notes: Dict[str, str] = field(default_factory=dict)
    quant: QuantInfo = field(default_factory=QuantInfo)
    # The file a user ships when it is not the ONNX model that is run and timed (e.g. a Deep
    # Compression file that decodes into the same weights); sizes are measured on it.
    shipped: Optional[Path] = None
    # Further files the deployed model consists of (early exit: one graph per segment; ``path`` is
    # then the manifest that names them). Sizes count them all.
    files: Tuple[Path, ...] = ()

    def deployed_files(self) -> List[Path]:
        return [self.shipped] if self.shipped is not None else [self.path, *self.files]


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path) -> Artifact:
    """Export with the dynamo exporter and a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_export(model.eval(), example, path, ["logits"])
    return Artifact(path=path)


def onnx_export(module: torch.nn.Module, example: torch.Tensor, path: Path, outputs: List[str]):
    """torch.onnx.export (dynamo) with input ``input``, the named outputs and a dynamic batch."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), _shared_onnx_registry():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["input"],
                          output_names=outputs, dynamic_shapes=({0: batch},), verbose=False,
                          external_data=False)


_REGISTRIES: Dict[str, object] = {}


def warm_onnx_exporter():
    """Export a tiny model once, so processes forked from this one find the exporter's op registry
    and first-call caches built (about a second off each of their first exports)."""
    tiny = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2, 2))
    with tempfile.TemporaryDirectory(prefix="automl-warm-") as tmp:
        export_onnx(tiny, torch.zeros(1, 1, 1, 1), Path(tmp) / "warm.onnx")


def _registered_ops():
    """How many operators torch's dispatcher knows (about 5 ms); None where torch lacks the call."""
    names = getattr(torch._C, "_dispatch_get_all_op_names", None)
    return len(names()) if names is not None else None


@contextlib.contextmanager
def _shared_onnx_registry():
    """Build torch.onnx's op registry once per process instead of once per export.

    The exporter rebuilds it from onnxscript's op library on every call (0.5-0.8 s, a third of a
    small model's export); a search exports several models per trial. Patched only while our own
    export runs, which passes no custom ops (the one thing that would mutate it). Where torch has
    moved the private class, exports simply run uncached."""
    if _registered_ops() is None:
        yield None
        return
    try:
        from torch.onnx._internal.exporter import _registration
        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, KeyError):
        yield None
        return
    build = original.__func__
    signature = inspect.signature(build)

    def cached(cls, *args, **kwargs):
        bound = signature.bind(cls, *args, **kwargs)
        bound.apply_defaults()  # from_torchlib() and from_torchlib(opset_version=<default>) are one entry
        # The registry holds only the ops that exist when it is built (quantized_decomposed appears when
        # torchao is imported): a registry built before is rebuilt, never reused without them.
        key = repr((list(bound.arguments.items())[1:], _registered_ops()))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(cls, *args, **kwargs)
        return _REGISTRIES[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield _registration.ONNXRegistry
    finally:
        _registration.ONNXRegistry.from_torchlib = original


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
