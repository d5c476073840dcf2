"""Learned weight rounding for fake-quantized layers (the ``rounding:`` option of ``qat`` and ``mixed``).

Rounding every weight to its nearest grid point minimises each weight's error, not the layer's
output error; at 4 bits and below the two differ enough to cost accuracy. Each rounding here keeps
the layer's weight grid (its LSQ step, fixed) and chooses per weight the grid point below or above
(AdaRound) or compensates each column's rounding error in the columns not yet rounded (GPTQ), using
a few hundred calibration inputs, layer by layer from the input: a layer sees the inputs the model
with its earlier layers already rounded gives it, and is fitted to what the float model computes.
The result is exactly on the grid, so the layer's quantizer reproduces it and the shipped packed
weights are these values.

``rounded_if_better`` keeps a learned rounding only where the model then agrees with the float
model's predictions on the validation inputs at least as often as with nearest rounding: a smaller
output error per layer need not mean more agreement (argmax forgives an error that only shrinks the
logits, and not one that turns them).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from automl.compress.quantization.fake_quant import LSQQuantizer
from automl.compress.quantization.qat import QuantLayer, qat_layers
from automl.errors import ConfigError

Weights = Dict[str, torch.Tensor]
LayerReport = Dict[str, float]   # flipped (share of weights off nearest), error, error_nearest


def weight_grid(layer: QuantLayer) -> Tuple[torch.Tensor, int, int]:
    """The weight quantizer's step broadcast over the weight, and its integer range."""
    quant = layer.weight_quant
    if not isinstance(quant, LSQQuantizer):
        raise ConfigError("a learned rounding needs a fixed weight grid", key="quantizer", value=type(quant).__name__,
                          fix="use quantizer: lsq with a learned rounding")
    step, _ = quant.qparams()
    weight = layer.layer.weight
    step = step.reshape(-1, *([1] * (weight.dim() - 1))) if step.dim() else step
    return step.detach(), -quant.qn, quant.qp


class _Capture:
    """Collect one layer's inputs over the calibration batches (float or with earlier layers rounded)."""

    def __init__(self, layer: QuantLayer):
        self.layer, self.inputs = layer, []

    def __call__(self, module, args):
        self.inputs.append(args[0].detach())

    def run(self, model: nn.Module, batches: List[torch.Tensor], floats: Optional[Weights] = None) -> torch.Tensor:
        """The layer's inputs in the float model (``floats``: its original weights) or, without, in the
        fake-quantized model as it stands."""
        handle = self.layer.register_forward_pre_hook(self)
        try:
            with torch.no_grad(), float_reference(model, floats, on=floats is not None):
                for x in batches:
                    model(x)
        finally:
            handle.remove()
        out, self.inputs = torch.cat(self.inputs), []
        return out


def float_weights(model: nn.Module) -> Weights:
    return {name: layer.layer.weight.detach().clone() for name, layer in qat_layers(model).items()}


@contextlib.contextmanager
def float_reference(model: nn.Module, floats: Weights, on: bool = True):
    """Inside, every QuantLayer of ``model`` computes in float with its weight from ``floats`` (the
    weights before any rounding was learned); outside, the (rounded) weights are back."""
    layers = qat_layers(model) if on else {}
    current = {name: layer.layer.weight.detach().clone() for name, layer in layers.items()}
    with torch.no_grad():
        for name, layer in layers.items():
            layer.float_compute = True
            layer.layer.weight.copy_(floats[name])
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.float_compute = False
                layer.layer.weight.copy_(current[name])


@torch.no_grad()
def float_predictions(model: nn.Module, loader, floats: Weights) -> List[torch.Tensor]:
    """The float model's predicted classes over the loader, batch by batch."""
    with float_reference(model, floats):
        return [model(_inputs(batch)).argmax(1) for batch in loader]


@torch.no_grad()
def agreement(model: nn.Module, loader, reference: List[torch.Tensor]) -> float:
    """Share of the loader's inputs on which ``model`` predicts the ``reference`` class."""
    same = total = 0
    for batch, expected in zip(loader, reference):
        same += int((model(_inputs(batch)).argmax(1) == expected).sum())
        total += len(expected)
    return same / max(total, 1)


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def layer_inputs(model: nn.Module, layer: QuantLayer, inputs: List[torch.Tensor], floats: Weights):
    """(the layer's input in the float model, its input now with the layer's own quantizer applied)."""
    capture = _Capture(layer)
    x_float = capture.run(model, inputs, floats)
    x_quant = capture.run(model, inputs)
    with torch.no_grad():
        x_in = layer.act_quant(x_quant) if layer.act_quant is not None else x_quant
    return x_float, x_in


def nearest(layer: QuantLayer) -> torch.Tensor:
    """The layer's weight rounded to its nearest grid point (what its quantizer computes)."""
    step, qmin, qmax = weight_grid(layer)
    return step * torch.clamp(torch.round(layer.layer.weight.detach() / step), qmin, qmax)


@torch.no_grad()
def layer_report(layer: QuantLayer, x_in, target, rounded: torch.Tensor, near: torch.Tensor) -> LayerReport:
    def error(w):
        return float((layer._compute(x_in, w) - target).pow(2).mean())
    return {"flipped": float((rounded != near).float().mean()), "error": error(rounded), "error_nearest": error(near)}


Rounding = Callable[[QuantLayer, torch.Tensor, torch.Tensor, int], torch.Tensor]


def round_model(model: nn.Module, batches: Iterable, round_fn: Rounding, seed: int = 0,
                floats: Optional[Weights] = None) -> Dict[str, LayerReport]:
    """Round every QuantLayer of ``model`` (prepared and activation-calibrated), earliest first, with
    ``round_fn(layer, x_float, x_in, seed) -> weight on the grid``; the weight is written back."""
    inputs = [_inputs(b) for b in batches]
    if not inputs:
        raise ConfigError("a learned rounding needs calibration batches", key="rounding_batches", value=0,
                          fix="give at least one batch")
    floats = floats if floats is not None else float_weights(model)
    was_training = model.training
    model.eval()
    report = {}
    try:
        for name, layer in qat_layers(model).items():
            x_float, x_in = layer_inputs(model, layer, inputs, floats)
            with torch.no_grad():
                target = layer._compute(x_float, layer.layer.weight)
            near = nearest(layer)
            rounded = round_fn(layer, x_float, x_in, seed).detach()
            with torch.no_grad():
                layer.layer.weight.copy_(rounded)
            report[name] = layer_report(layer, x_in, target, rounded, near)
    finally:
        model.train(was_training)
    return report


def rounded_if_better(model: nn.Module, batches: Iterable, check_loader, round_fn: Rounding, name: str,
                      seed: int = 0) -> Dict[str, float]:
    """``round_model``, kept only where the model then agrees with the float model on ``check_loader``
    at least as often as with nearest rounding; otherwise the float weights come back (nearest)."""
    was_training = model.training
    model.eval()
    floats = float_weights(model)
    reference = float_predictions(model, check_loader, floats)
    before = agreement(model, check_loader, reference)
    report = round_model(model, batches, round_fn, seed, floats)
    after = agreement(model, check_loader, reference)
    kept = after >= before
    if not kept:
        with torch.no_grad():
            for layer_name, layer in qat_layers(model).items():
                layer.layer.weight.copy_(floats[layer_name])
    model.train(was_training)
    errors = [sum(r[k] for r in report.values()) for k in ("error", "error_nearest")]
    return {"rounding": name, "rounding_kept": float(kept), "rounding_layers": len(report),
            "rounding_flipped": sum(r["flipped"] for r in report.values()) / max(len(report), 1),
            # summed mean squared output error of the rounded layers, over nearest rounding's
            "rounding_error_ratio": errors[0] / max(errors[1], 1e-30),
            "rounding_agreement": after, "nearest_agreement": before}


__all__ = ["LayerReport", "Weights", "agreement", "float_predictions", "float_reference", "float_weights",
           "layer_inputs", "nearest", "round_model", "rounded_if_better", "weight_grid"]
