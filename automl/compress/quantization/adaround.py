"""AdaRound (Nagel et al., ICML 2020): learn, per layer, whether each weight rounds up or down.

Rounding every weight to its nearest grid point minimises the error of each weight, not of the
layer's output; at 4 bits and below the two differ enough to cost accuracy. For each fake-quantized
layer in model order, with its weight grid (the LSQ step) fixed, AdaRound learns a soft rounding
h(V) in [0, 1] per weight,

    W~ = s * clamp(floor(W / s) + h(V), -Qn, Qp),   h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),

minimising || W x - W~ x~ ||^2 over a few hundred calibration inputs, where x is the layer's input
in the float model and x~ its input in the model whose earlier layers are already rounded, with the
layer's own input quantizer applied (the paper's asymmetric reconstruction: later layers correct the
error earlier ones left). A regulariser sum(1 - |2 h - 1|^beta), beta annealed from 20 to 2 after a
warm-up, pushes every h to 0 or 1; at the end the weight becomes the hard choice, exactly a grid
point, so the layer's LSQ quantizer reproduces it and the shipped packed weights are these values.
Defaults follow the paper and AIMET (lambda 0.01, beta 20 -> 2, 20 % warm-up, Adam lr 1e-3).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from automl.compress.quantization.fake_quant import LSQQuantizer
from automl.compress.quantization.qat import QuantLayer, qat_layers
from automl.errors import ConfigError

ZETA, GAMMA = 1.1, -0.1
Weights = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdaRoundSettings:
    iterations: int = 1000
    batch_size: int = 32
    reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    lr: float = 1e-3
    seed: int = 0


def _soft(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _grid(layer: QuantLayer):
    """The weight quantizer's step broadcast over the weight, and its integer range."""
    quant = layer.weight_quant
    if not isinstance(quant, LSQQuantizer):
        raise ConfigError("AdaRound needs a fixed weight grid", key="quantizer", value=type(quant).__name__,
                          fix="use quantizer: lsq with rounding: adaround")
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


def _beta(i: int, settings: AdaRoundSettings) -> float:
    start = settings.warmup * settings.iterations
    progress = (i - start) / max(settings.iterations - start, 1)
    return settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (1 + torch.cos(
        torch.tensor(progress * torch.pi)).item())


def round_layer(layer: QuantLayer, x_float: torch.Tensor, x_quant: torch.Tensor,
                settings: AdaRoundSettings) -> Dict[str, float]:
    """Learn the rounding of ``layer``'s weight; writes the rounded weight back. Returns the share of
    weights that round differently from nearest and the output error before and after."""
    step, qmin, qmax = _grid(layer)
    weight = layer.layer.weight.detach()
    scaled = weight / step
    floor = torch.floor(scaled)
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) = rest: starts at the float weight
    with torch.no_grad():
        target = layer._compute(x_float, weight)
        x_in = layer.act_quant(x_quant) if layer.act_quant is not None else x_quant

    def quantized(h):
        return step * torch.clamp(floor + h, qmin, qmax)

    def error(w):
        with torch.no_grad():
            return float((layer._compute(x_in, w) - target).pow(2).mean())

    nearest = quantized(torch.round(scaled) - floor)
    before = error(nearest)
    opt = torch.optim.Adam([v], lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    for i in range(settings.iterations):
        idx = torch.randint(0, len(x_in), (min(settings.batch_size, len(x_in)),), generator=gen)
        h = _soft(v)
        loss = (layer._compute(x_in[idx], quantized(h)) - target[idx]).pow(2).sum(1).mean()
        if i >= settings.warmup * settings.iterations:
            loss = loss + settings.reg * (1 - (2 * h - 1).abs().pow(_beta(i, settings))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = quantized((v >= 0).float())
        layer.layer.weight.copy_(hard)
    return {"flipped": float((hard != nearest).float().mean()), "error_nearest": before, "error": error(hard)}


def adaround(model: nn.Module, batches: Iterable, settings: AdaRoundSettings = AdaRoundSettings(),
             floats: Optional[Weights] = None) -> Dict[str, Dict[str, float]]:
    """Round every QuantLayer of ``model`` (prepared and activation-calibrated), earliest first.
    ``floats``: the float weights, when the model's own are no longer them."""
    inputs = [_inputs(b) for b in batches]
    if not inputs:
        raise ConfigError("AdaRound needs calibration batches", key="rounding_batches", value=0,
                          fix="give at least one batch")
    floats = floats if floats is not None else float_weights(model)
    was_training = model.training
    model.eval()
    report = {}
    try:
        for name, layer in qat_layers(model).items():
            capture = _Capture(layer)
            x_float = capture.run(model, inputs, floats)
            x_quant = capture.run(model, inputs)
            report[name] = round_layer(layer, x_float, x_quant, settings)
    finally:
        model.train(was_training)
    return report


def adaround_if_better(model: nn.Module, batches: Iterable, check_loader,
                       settings: AdaRoundSettings = AdaRoundSettings()) -> Dict[str, float]:
    """AdaRound, kept only where the model then agrees with the float model on ``check_loader`` at least
    as often as with nearest rounding; otherwise the float weights come back (nearest rounding).

    A smaller output error per layer need not mean more agreement with the float model (argmax forgives
    an error that only shrinks the logits, and not one that turns them); the check costs two passes."""
    was_training = model.training
    model.eval()
    floats = float_weights(model)
    reference = float_predictions(model, check_loader, floats)
    before = agreement(model, check_loader, reference)
    report = adaround(model, batches, settings, floats)
    after = agreement(model, check_loader, reference)
    kept = after >= before
    if not kept:
        with torch.no_grad():
            for name, layer in qat_layers(model).items():
                layer.layer.weight.copy_(floats[name])
    model.train(was_training)
    errors = [sum(r[k] for r in report.values()) for k in ("error", "error_nearest")]
    return {"adaround_kept": float(kept), "adaround_layers": len(report),
            "adaround_flipped": sum(r["flipped"] for r in report.values()) / max(len(report), 1),
            # summed mean squared output error of the rounded layers, over nearest rounding's
            "adaround_error_ratio": errors[0] / max(errors[1], 1e-30),
            "adaround_agreement": after, "nearest_agreement": before}


__all__ = ["AdaRoundSettings", "adaround", "adaround_if_better", "agreement", "float_predictions", "float_reference",
           "float_weights", "round_layer"]
