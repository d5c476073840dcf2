"""fp16: the deployed ONNX model in half precision (weights and activations float16).

The exported fp32 graph is converted with onnxruntime's float16 converter, inputs and outputs kept
float32 so callers feed the same arrays. The file holds 2-byte weights, so it ships about half the
size. Speed depends on the CPU and runtime: onnxruntime's float16 CPU kernels target ARM processors
with FP16 arithmetic; on an AMD EPYC Zen 4 the float16 models ran exactly as fast as fp32 (README,
bench/half.py). The deployed model's accuracy and its agreement with the float model
(``fp16_parity``) are measured, never assumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from automl.compress.base import KEEPS_SHAPE, Method, register_method
from automl.compress.quantization.fallback import ParityProbe
from automl.configs import option
from automl.runtime import Artifact, QuantInfo


def not_in_profiles(*_):
    """Profiles price fp32 and int8 layers; an fp16 candidate is refused with what to do instead."""
    from automl.errors import ProfileError

    raise ProfileError("CPU profiles hold fp32 and int8 entries, so they cannot price an fp16 model",
                       key="quantization.method", value="fp16",
                       fix="search a space that deploys fp16 with --no-profile (latency measured in each trial), "
                           "or leave fp16 out of the space you profile")


@dataclass(frozen=True)
class HalfConfig:
    keep_float_ops: Tuple[str, ...] = option(
        (), doc="ONNX op types left in float32 besides the converter's own list (e.g. [Softmax, "
                "ReduceMean] when their float16 range is too small for a model)")
    min_parity: float = option(0.9, low=0.0, high=1.0,
                               doc="refuse an fp16 model that predicts the float model's class on fewer than "
                                   "this share of validation inputs")


@register_method("fp16", "quantization", HalfConfig)
class Half(Method):
    """Acts at deploy time on the exported fp32 ONNX model."""

    deployed_shape = KEEPS_SHAPE

    profile_precision = classmethod(lambda cls, config: not_in_profiles())

    def _deploy(self, artifact: Artifact, ctx):
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        src = artifact.path
        out = src.with_name(src.stem + ".fp16.onnx")
        half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *self.config.keep_float_ops])
        onnx.save(half, str(out))
        parity = ParityProbe(src, ctx.task.val_loader(), threads=ctx.threads)(out)
        self.stats["fp16_parity"] = parity
        if parity < self.config.min_parity:
            from automl.errors import MeasurementError

            raise MeasurementError(
                f"fp16: the float16 model predicts the float model's class on only {parity:.0%} of validation "
                f"inputs (min_parity {self.config.min_parity}): some activations overflow or underflow in "
                "float16. Fix: list the op types that carry them in keep_float_ops (e.g. [Softmax, "
                "ReduceMean]), or deploy in float32")
        return Artifact(path=out, precision="fp16", quant=QuantInfo("fp16", w_bits=16, a_bits=16),
                        notes={"kernels": "onnxruntime float16"})
