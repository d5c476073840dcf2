"""Int8 post-training quantization of the deployed ONNX model with onnxruntime (real int8 kernels).

static: QDQ model calibrated on training batches; onnxruntime fuses each DQ -> op -> Q group into
QLinearConv / QLinearAdd / QGemm, so convolutions and residual adds both run in int8.
dynamic: int8 weights, activations quantized on the fly (ConvInteger / MatMulInteger). Grouped and
depthwise convolutions stay float: onnxruntime's ConvInteger gives wrong results on them (measured:
chance accuracy on trained ShuffleNetV2 and MobileNetV2, 97 % with them left in float).

Both modes report ``int8_parity``, the share of validation inputs on which the int8 model predicts the
class the float ONNX model predicts, and refuse a model below ``min_parity``.

Static activations are always stored as uint8. onnxruntime's x86 int8 kernels take uint8 activations
and int8 weights; its optimizer relabels an int8 Q/DQ pair as uint8 only when the Q feeds a single
DQ. In a residual net a block's input feeds both its first conv and the add, so int8 activations left
those convs (and every add) in float between Q/DQ pairs: 2-3x slower than fp32 on our ResNets.
Asymmetric int8 and uint8 activations have the same scale and levels (zero point shifted by 128), so
storing uint8 loses nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from automl.compress.base import KEEPS_SHAPE, Method, register_method
from automl.compress.quantization.fallback import ParityProbe, describe, float_fallback
from automl.configs import option
from automl.runtime import Artifact, QuantInfo, int8_reduce_range
from automl.runtime.ort_quantize import (grouped_convs, pre_process, quantize_dynamic_int8, quantize_static_qdq,
                                         quiet_root_logger)


@dataclass(frozen=True)
class Int8PTQConfig:
    mode: str = option("static", choices=("static", "dynamic"), doc="calibrated or on-the-fly activations")
    per_channel: bool = option(True, doc="one weight scale per output channel")
    symmetric_activations: bool = option(
        False, doc="static only: activation ranges symmetric about zero (zero point mid-range, as some int8 "
                   "accelerators require) instead of min/max; on ReLU nets it wastes half the levels and "
                   "keeps each ReLU as a float op (measured slower)")
    calibration_batches: int = option(8, low=1, high=10_000, doc="training batches used to calibrate")
    calibration_method: str = option("minmax", choices=("minmax", "percentile", "entropy", "auto"),
                                     doc="how static activation ranges are set; auto: minmax, and where that model "
                                         "misses target_parity, percentile too (clips outliers), the better kept")
    target_parity: float = option(0.0, low=0.0, high=1.0,
                                  doc="when the int8 model agrees with the float model on fewer validation inputs than "
                                      "this, keep its most harmful layers float until it does (fallback.py; 0 = off)")
    max_float_share: float = option(0.25, low=0.0, high=1.0,
                                    doc="target_parity: at most this share of the quantizable layers kept float")
    min_parity: float = option(0.5, low=0.0, high=1.0,
                               doc="refuse an int8 model that predicts the float model's class on fewer than this "
                                   "share of validation inputs (0 keeps any)")


def calibration_arrays(task, n_batches: int, batch_size: int = 32, seed: int = 0):
    loader = task.train_loader(batch_size=batch_size, seed=seed)
    out = []
    for x, _ in loader:
        out.append(x.numpy().astype(np.float32))
        if len(out) >= n_batches:
            break
    return out


def _fmt(ops) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(ops.items())) or "none"


@register_method("int8_ptq", "quantization", Int8PTQConfig)
class Int8PTQ(Method):
    """Acts at deploy time on the exported fp32 ONNX model."""

    deployed_shape = KEEPS_SHAPE

    @classmethod
    def profile_precision(cls, config) -> str:
        return f"int8_{config.mode}"

    def _deploy(self, artifact: Artifact, ctx):
        with quiet_root_logger():  # onnxruntime.quantization logs warnings via the root logger
            return self._quantize(artifact, ctx)

    def _quantize(self, artifact: Artifact, ctx):
        from automl.compress.quantization.pt2e import onnx_op_counts

        src = artifact.path
        pre = src.with_name(src.stem + ".pre.onnx")
        ranges = src.with_name(src.stem + ".ranges.json")
        out = src.with_name(src.stem + f".int8_{self.config.mode}.onnx")
        pre_process(src, pre)
        ranges.unlink(missing_ok=True)  # ranges of another model would be read as this one's
        cfg = self.config
        notes = {}
        try:
            if cfg.mode == "dynamic":
                notes["float_grouped_convs"] = len(grouped_convs(pre))
                quantize = partial(quantize_dynamic_int8, per_channel=cfg.per_channel)
            probe = ParityProbe(src, ctx.task.val_loader(), threads=ctx.threads)
            share = cfg.max_float_share if cfg.target_parity > 0 else 0.0
            if cfg.mode == "dynamic":
                done = float_fallback(quantize, pre, out, probe, cfg.target_parity, share)
            else:
                done = self._calibrated(ctx, pre, out, ranges, probe, share)
        finally:
            pre.unlink(missing_ok=True)
            ranges.unlink(missing_ok=True)
        self._check_parity(done["parity"])
        if cfg.mode == "static":
            notes["calibration"] = done["calibration"]
        if cfg.target_parity > 0:
            self.stats["int8_float_layers"] = len(done["float_layers"])
            notes["float_layers"] = describe(done["float_layers"])
        # What onnxruntime actually runs after its fusions: a model that stayed mostly float shows here.
        int8_ops, float_ops = onnx_op_counts(out)
        return Artifact(path=out, precision=f"int8_{cfg.mode}",
                        quant=QuantInfo(f"int8_{cfg.mode}", w_bits=8, a_bits=8),
                        notes={**notes, "kernels": "onnxruntime int8", "int8_ops": _fmt(int8_ops),
                               "float_ops": _fmt(float_ops),
                               "weight_bits": "7 (no VNNI on this CPU)" if int8_reduce_range() else "8"})

    def _check_parity(self, parity: float):
        from automl.errors import MeasurementError

        self.stats["int8_parity"] = parity
        if parity < self.config.min_parity:
            raise MeasurementError(
                f"int8_ptq ({self.config.mode}): the int8 model predicts the float model's class on only "
                f"{parity:.0%} of validation inputs (min_parity {self.config.min_parity}). Fix: try "
                f"{self._other_settings()}, or leave this model in float")

    def _other_settings(self) -> str:
        if self.config.mode == "dynamic":
            return "mode static"
        method = self.config.calibration_method
        tried = ("minmax", "percentile") if method == "auto" else (method,)
        others = [m for m in ("percentile", "entropy", "minmax") if m not in tried]
        fallback = ("target_parity (e.g. 0.98: the most harmful layers stay float), "
                    if not self.config.target_parity else "")
        return f"{fallback}calibration_method {' or '.join(others[:2])}, more calibration_batches, or mode dynamic"

    def _calibrated(self, ctx, pre, out, ranges, probe, share) -> dict:
        """float_fallback with the configured calibration; for ``auto``, minmax first and, when it misses
        the target or keeps layers float, percentile too: the model meeting the target with the fewest
        float layers (then the higher parity) is written to ``out``."""
        cfg = self.config
        batches = calibration_arrays(ctx.task, cfg.calibration_batches, seed=ctx.seed)
        methods = ("minmax", "percentile") if cfg.calibration_method == "auto" else (cfg.calibration_method,)
        best = None
        for method in methods:
            path = out if best is None else out.with_name(f"{out.stem}.{method}.onnx")
            ranges.unlink(missing_ok=True)  # each method calibrates its own ranges
            quantize = partial(quantize_static_qdq, batches=batches, per_channel=cfg.per_channel,
                               symmetric_activations=cfg.symmetric_activations, calibration_method=method,
                               calibration_cache=ranges)
            try:
                done = {**float_fallback(quantize, pre, path, probe, cfg.target_parity, share), "calibration": method}
            except Exception:
                if best is None:
                    raise
                path.unlink(missing_ok=True)  # the minmax model in ``out`` stands
                break
            if best is None:
                best = done
            elif _better(done, best, cfg.target_parity):
                path.replace(out)
                best = done
            else:
                path.unlink(missing_ok=True)
            if best["parity"] >= cfg.target_parity and not best["float_layers"]:
                break
        return best


def _better(a: dict, b: dict, target: float) -> bool:
    """Meeting the target first; then, among models that meet it, fewer float layers; else higher parity."""
    key = lambda d: (d["parity"] >= target, -len(d["float_layers"]) if d["parity"] >= target else d["parity"],  # noqa
                     d["parity"])
    return key(a) > key(b)
