"""Deployable int8 through torchao pt2e (``int8_pt2e``) and data-free quantization (``data_free``).

Both act after training. ``int8_pt2e`` calibrates activation ranges on training batches and writes
an ONNX model whose convolutions, matmuls and residual adds run in int8 in onnxruntime (BatchNorm is
folded into the int8 convolutions by the pt2e export). ``data_free`` quantizes the weights without
data (cross-layer equalization + bias correction, Nagel et al. 2019): at 8 bits the result is made
deployable through pt2e (activation ranges still need a few calibration batches); at lower widths
it stays a simulated, weight-only quantized float model and is labelled so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from automl.compress.base import KEEPS_SHAPE, Method, register_method
from automl.configs import option
from automl.errors import ConfigError, MeasurementError
from automl.runtime import Artifact, OrtModel, QuantInfo


def calibration_batches(task, count: int, seed: int = 0, batch_size: int = 32) -> List[torch.Tensor]:
    """The first ``count`` shuffled training batches (inputs only)."""
    out = []
    for x, _ in task.train_loader(batch_size=batch_size, seed=seed):
        out.append(x)
        if len(out) >= count:
            break
    return out


def deploy_int8(model, ctx, path, *, per_channel: bool, batches: int, precision: str,
                method: str, calib: Optional[List[torch.Tensor]] = None) -> Tuple[Artifact, Dict[str, float]]:
    """pt2e int8 of ``model`` written to ``path``; returns the artifact and its parity stats. Activation
    ranges come from ``calib`` when given (e.g. synthetic inputs), else ``batches`` training batches.

    Stats: ``int8_torch_accuracy`` (validation accuracy of the pt2e int8 torch model, computed with
    reference Q/DQ ops) and ``int8_parity`` (share of test samples on which the onnxruntime int8
    model predicts the same class as that torch model).
    """
    from automl.compress.quantization import pt2e

    task = ctx.task
    source = "synthetic batches (no training data)" if calib is not None else "training batches"
    calib = calib if calib is not None else calibration_batches(task, batches, seed=ctx.seed)
    example = task.example_input(2)
    try:
        converted = pt2e.quantize_pt2e(model, example, calib, per_channel=per_channel)
    except ConfigError:
        raise
    except Exception as exc:  # torch.export / the quantizer refused this model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise MeasurementError(
            f"{method}: pt2e could not quantize this model ({type(exc).__name__}: {first[:300]}). Fix: use the "
            "quantization method int8_ptq (onnxruntime quantize_static on the exported ONNX model), which "
            "does not need torch.export") from exc
    artifact = pt2e.deploy_pt2e(model, example, calib, path, per_channel=per_channel, converted=converted)
    session = OrtModel(artifact.path, threads=ctx.threads)
    stats = {"int8_torch_accuracy": task.evaluate(converted, task.val_loader()),
             "int8_parity": pt2e.parity(converted, session, task.test_loader())}
    artifact.precision, artifact.quant = precision, QuantInfo("int8_static", w_bits=8, a_bits=8)
    artifact.notes["activations"] = f"calibrated on {len(calib)} {source}"
    return artifact, stats


@dataclass(frozen=True)
class Int8PT2EConfig:
    per_channel: bool = option(True, doc="one weight scale per output channel (false: one per tensor)")
    calibration_batches: int = option(8, low=1, high=10_000, doc="training batches that set activation ranges")
    cle: bool = option(False, doc="cross-layer equalization (BN folded first) before calibration")


@register_method("int8_pt2e", "quantization", Int8PT2EConfig)
class Int8PT2E(Method):
    """Real int8: torchao pt2e static quantization, deployed as an int8 ONNX model."""

    deployed_shape = KEEPS_SHAPE

    @classmethod
    def profile_precision(cls, config) -> str:
        return "int8_static"

    def _finalize(self, model, ctx):
        self.model = model  # the float model stays the torch result; int8 is made at deploy
        return model

    def _deploy(self, artifact, ctx):
        model = self.model
        if self.config.cle:
            from automl.compress.quantization.datafree import cross_layer_equalize

            model, scales = _traced(lambda: cross_layer_equalize(model), "int8_pt2e", "cle")
            self.stats["cle_pairs"] = len(scales)
        out, stats = deploy_int8(model, ctx, artifact.path.with_name(artifact.path.stem + ".int8.onnx"),
                                 per_channel=self.config.per_channel, batches=self.config.calibration_batches,
                                 precision="int8_pt2e", method="int8_pt2e")
        self.stats.update(stats)
        return out


def _traced(fn, method: str, key: str):
    """Run an fx-tracing transform; a model torch.fx cannot trace gets a clear error."""
    try:
        return fn()
    except torch.fx.proxy.TraceError as exc:
        raise ConfigError(f"{method}: torch.fx cannot trace this model ({exc})", key=key, value=True,
                          fix="turn the option off, or make forward() free of data-dependent Python control flow"
                          ) from None


@dataclass(frozen=True)
class DataFreeConfig:
    bits: int = option(8, low=2, high=8, doc="weight bit-width; 8 deploys as real int8 through pt2e")
    per_channel: bool = option(False, doc="per-channel weight scales (DFQ targets per-tensor)")
    equalize: bool = option(True, doc="cross-layer equalization before quantizing")
    correct_bias: bool = option(True, doc="subtract the expected output error from each bias")
    relu6_to_relu: bool = option(False, doc="swap ReLU6 for ReLU so MobileNet-style blocks can be equalized")
    int8_deploy: bool = option(True, doc="at 8 bits, deploy real int8 (pt2e) instead of the simulated float model")
    calibration_batches: int = option(8, low=1, high=10_000,
                                      doc="int8 deploy only: batches that set activation ranges")
    calibration: str = option("data", choices=("data", "synthetic"),
                              doc="int8 deploy only: activation ranges from training batches, or from inputs "
                                  "generated to match the model's BatchNorm statistics (no data at all)")
    synthetic_steps: int = option(500, low=1, high=100_000,
                                  doc="calibration synthetic: optimisation steps generating the inputs")


@register_method("data_free", "quantization", DataFreeConfig)
class DataFree(Method):
    """Weights quantized without data (CLE + bias correction) after training."""

    deployed_shape = KEEPS_SHAPE

    @classmethod
    def profile_precision(cls, config) -> Optional[str]:
        return "int8_static" if config.bits == 8 and config.int8_deploy else None

    def _finalize(self, model, ctx):
        from automl.compress.quantization.datafree import datafree_quantize

        cfg = self.config
        self.synthetic = None
        if self.real_int8 and cfg.calibration == "synthetic":  # before datafree_quantize folds the BatchNorms
            from automl.compress.quantization.synthetic import bn_matching_inputs

            self.synthetic = bn_matching_inputs(model, ctx.task.example_input(2), batches=cfg.calibration_batches,
                                                steps=cfg.synthetic_steps, seed=ctx.seed)
        gm, report = _traced(lambda: datafree_quantize(model, bits=cfg.bits, per_channel=cfg.per_channel,
                                                       equalize=cfg.equalize, correct_bias=cfg.correct_bias,
                                                       relu6_to_relu=cfg.relu6_to_relu),
                             "data_free", "equalize")
        self.stats = {"datafree_equalized_pairs": len(report.equalized),
                      "datafree_corrected_layers": len(report.corrected)}
        self.model = gm
        return gm  # BN folded, weights on the quantization grid: the simulated model

    @property
    def real_int8(self) -> bool:
        return self.config.bits == 8 and self.config.int8_deploy

    def _deploy(self, artifact, ctx):
        if not self.real_int8:
            artifact.precision = f"w{self.config.bits} (simulated, weight-only)"
            artifact.quant = QuantInfo(simulated=True, w_bits=self.config.bits)
            artifact.notes["simulated"] = "weights fake-quantized in float; activations float; no int8 kernels"
            return artifact
        out, stats = deploy_int8(self.model, ctx, artifact.path.with_name(artifact.path.stem + ".int8.onnx"),
                                 per_channel=self.config.per_channel, batches=self.config.calibration_batches,
                                 precision="int8_datafree", method="data_free", calib=self.synthetic)
        out.notes["weights"] = "data-free (CLE + bias correction)"
        self.stats.update(stats)
        return out
