"""Int8 post-training quantization of the deployed ONNX model with onnxruntime (real int8 kernels).

static: QDQ model calibrated on training batches (QLinearConv / int8 MatMul in onnxruntime);
dynamic: int8 weights, activations quantized on the fly (ConvInteger / MatMulInteger).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from automl.compress.base import Method, register_method
from automl.configs import option
from automl.runtime import Artifact


@dataclass(frozen=True)
class Int8PTQConfig:
    mode: str = option("static", choices=("static", "dynamic"), doc="calibrated or on-the-fly activations")
    per_channel: bool = option(True, doc="one weight scale per output channel")
    symmetric_activations: bool = option(True, doc="int8 activations (true) or uint8 (false), static only")
    calibration_batches: int = option(8, low=1, high=10_000, doc="training batches used to calibrate")
    calibration_method: str = option("minmax", choices=("minmax", "percentile", "entropy"),
                                     doc="how static activation ranges are set")


class _Batches:
    """onnxruntime CalibrationDataReader over a list of input arrays."""

    def __init__(self, name, batches):
        self._it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self._it, None)


def calibration_arrays(task, n_batches: int, batch_size: int = 32, seed: int = 0):
    loader = task.train_loader(batch_size=batch_size, seed=seed)
    out = []
    for x, _ in loader:
        out.append(x.numpy().astype(np.float32))
        if len(out) >= n_batches:
            break
    return out


@register_method("int8_ptq", "quantization", Int8PTQConfig)
class Int8PTQ(Method):
    """Acts at deploy time on the exported fp32 ONNX model."""

    def _deploy(self, artifact: Artifact, ctx):
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                              quantize_dynamic, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        logging.getLogger("root").setLevel(logging.ERROR)  # onnxruntime.quantization logs via root
        src = artifact.path
        pre = src.with_name(src.stem + ".pre.onnx")
        out = src.with_name(src.stem + f".int8_{self.config.mode}.onnx")
        quant_pre_process(str(src), str(pre))
        cfg = self.config
        if cfg.mode == "dynamic":
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=cfg.per_channel)
        else:
            from automl.runtime import OrtModel

            name = OrtModel(pre).input_name
            method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                      "entropy": CalibrationMethod.Entropy}[cfg.calibration_method]
            reader = _Batches(name, calibration_arrays(ctx.task, cfg.calibration_batches, seed=ctx.seed))
            quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8 if cfg.symmetric_activations else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
                            calibrate_method=method)
        pre.unlink(missing_ok=True)
        return Artifact(path=out, precision=f"int8_{cfg.mode}", notes={"kernels": "onnxruntime int8"})
