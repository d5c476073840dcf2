"""Quantization-aware training: wrap Conv/Linear layers so their weight and input are fake-quantized.

``prepare_qat`` swaps each selected layer for a ``QuantLayer`` (in place) holding the original layer
and two quantizers. Methods:

lsq   weights: per-channel (or per-tensor) LSQ steps; activations: one LSQ step.
pact  weights: STE with the grid recomputed from the current weights every step; activations: PACT.
ste   weights as pact; activations: STE with a moving-average min/max asymmetric grid.

Activation quantizers are initialised from an observer on calibration batches (``calibrate_qat``),
or from the first training batch when none were given. An input that is never negative (after a
ReLU) gets an unsigned grid, otherwise a signed one. ``convert_qat`` returns a plain float model
whose weights hold the quantized values, plus the per-layer bits and activation grids. Simulated:
the converted model computes in float. BatchNorm folding is separate (fusion.py).
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.compress.layers import PRUNABLE, select_layers
from automl.compress.quantization import qmath
from automl.compress.quantization.fake_quant import LSQQuantizer, PACTQuantizer, STEQuantizer
from automl.compress.quantization.observers import (OBSERVERS, MinMaxObserver, MovingAverageMinMaxObserver,
                                                    make_observer)
from automl.errors import ConfigError

QAT_METHODS = ("lsq", "pact", "ste")


class QuantLayer(nn.Module):
    """A Conv or Linear computing with fake-quantized weight and (optionally) fake-quantized input."""

    def __init__(self, layer: nn.Module, weight_quant: nn.Module, act_quant: Optional[nn.Module],
                 w_bits: int, a_bits: Optional[int], act_observer: str = "mse"):
        super().__init__()
        self.layer, self.weight_quant, self.act_quant = layer, weight_quant, act_quant
        self.w_bits, self.a_bits = w_bits, a_bits
        self.act_observer_name = act_observer
        self.observer = make_observer(act_observer) if act_quant is not None else None
        self.calibrating = False
        self.float_compute = False  # float weight and input, nothing observed (AdaRound's reference)

    def init_activation(self):
        """Choose the sign of the input grid from what the observer saw and initialise from it."""
        signed = float(self.observer.range()[0]) < 0
        if hasattr(self.act_quant, "set_signed"):
            self.act_quant.set_signed(signed)
        self.act_quant.init_from_observer(self.observer)

    def _compute(self, x, weight):
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)

    def forward(self, x):
        if self.calibrating:  # observe float inputs, compute in float
            if self.observer is not None:
                self.observer.update(x)
            return self.layer(x)
        if self.float_compute:
            return self.layer(x)
        if self.act_quant is not None:
            if not self.act_quant.initialized and self.training:
                self.observer.update(x)
                self.init_activation()
            x = self.act_quant(x)
        return self._compute(x, self.weight_quant(self.layer.weight))


def qat_layers(model: nn.Module) -> Dict[str, QuantLayer]:
    """The QuantLayers of ``model`` by name (a DataParallel ``module.`` prefix dropped), in model order."""
    return {n.removeprefix("module."): m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def quantizer_parameters(model: nn.Module) -> list:
    """The learnable quantizer parameters (LSQ steps, PACT alphas), e.g. for their own optimizer group."""
    return [p for layer in qat_layers(model).values() for q in (layer.weight_quant, layer.act_quant)
            if q is not None for p in q.parameters()]


def _check_pair(pattern: str, value) -> Tuple[int, Optional[int]]:
    key = f"layer_bits.{pattern}"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError("expected a pair (weight bits, activation bits)", key=key, value=value,
                          fix="write e.g. [4, 8]; use null activation bits to keep the input in float")
    w_bits = qmath.check_bits(value[0], key=key + ".weight")
    a_bits = None if value[1] is None else qmath.check_bits(value[1], key=key + ".activation")
    return w_bits, a_bits


def resolve_layer_bits(model: nn.Module, layer_bits: Mapping[str, object]) -> Dict[str, Tuple[int, Optional[int]]]:
    """{layer name: (w_bits, a_bits)}. An exact name beats any 're:' pattern; among patterns the one
    listed last wins. A name or pattern that matches no Conv/Linear raises UnknownNameError."""
    if not layer_bits:
        raise ConfigError("no layers to quantize", key="layer_bits", value=dict(layer_bits or {}),
                          fix="map layer names or 're:' patterns to (weight bits, activation bits)")
    return resolve_patterns(model, {p: _check_pair(p, v) for p, v in layer_bits.items()})


def resolve_patterns(model: nn.Module, mapping: Mapping[str, object]) -> Dict[str, object]:
    """{layer name: value} for a {name or 're:' pattern: value} mapping, in model order, with the
    precedence of :func:`resolve_layer_bits` (exact name first, then the last listed pattern)."""
    from_patterns: Dict[str, object] = {}
    exact: Dict[str, object] = {}
    for pattern, value in mapping.items():
        for name in select_layers(model, [pattern]):
            (from_patterns if pattern.startswith("re:") else exact)[name] = value
    chosen = {**from_patterns, **exact}
    order = [n.removeprefix("module.") for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    return {n: chosen[n] for n in order if n in chosen}


def _swap(model: nn.Module, old: nn.Module, new: nn.Module):
    """Replace the child module ``old`` (found by identity) with ``new``."""
    for parent in model.modules():
        for attr, child in parent.named_children():
            if child is old:
                setattr(parent, attr, new)
                return
    raise ValueError("module not found in model")


def _quantizers(layer: nn.Module, w_bits: int, a_bits: Optional[int], method: str, per_channel: bool,
                weight_observer: str):
    channels = layer.weight.shape[0] if per_channel else None
    axis = 0 if per_channel else None
    if method == "lsq":
        wq = LSQQuantizer(w_bits, signed=True, channels=channels)
        wq.init_from_observer(_observed(weight_observer, axis, layer.weight))
        aq = LSQQuantizer(a_bits) if a_bits else None
    else:
        wq = STEQuantizer(w_bits, signed=True, symmetric=True, axis=axis, observer=MinMaxObserver(axis),
                          dynamic=True)
        wq.init_from_observer(_observed("minmax", axis, layer.weight))
        if not a_bits:
            aq = None
        elif method == "pact":
            aq = PACTQuantizer(a_bits)
        else:
            aq = STEQuantizer(a_bits, signed=False, symmetric=False, observer=MovingAverageMinMaxObserver())
    return wq, aq


def _observed(name: str, axis, tensor):
    observer = make_observer(name, axis=axis)
    observer.update(tensor.detach())
    return observer


def prepare_qat(model: nn.Module, layer_bits: Mapping[str, object], method: str = "lsq", per_channel: bool = True,
                *, batches: Optional[Iterable] = None, weight_observer: str = "mse",
                act_observer: str = "mse") -> nn.Module:
    """Swap the selected layers for QuantLayers (in place) and return ``model``.

    ``layer_bits`` maps names or 're:' patterns to (w_bits, a_bits); a_bits None keeps the input in
    float. ``batches`` (inputs or (input, target) pairs) calibrate the activation quantizers now.
    """
    if method not in QAT_METHODS:
        from automl.registry import unknown_name

        raise unknown_name("QAT method", method, QAT_METHODS, key="method")
    for key, name in (("weight_observer", weight_observer), ("act_observer", act_observer)):
        OBSERVERS.get(name, key=key)
    if qat_layers(model):
        raise ConfigError("model is already prepared for QAT", key="model", value=list(qat_layers(model))[:3],
                          fix="call prepare_qat once; convert_qat gives back a plain model")
    plan = resolve_layer_bits(model, layer_bits)
    layers = select_layers(model, list(plan))
    for name, (w_bits, a_bits) in plan.items():
        wq, aq = _quantizers(layers[name], w_bits, a_bits, method, per_channel, weight_observer)
        _swap(model, layers[name], QuantLayer(layers[name], wq, aq, w_bits, a_bits, act_observer))
    if batches is not None:
        calibrate_qat(model, batches)
    return model


def calibrate_qat(model: nn.Module, batches: Iterable, max_batches: Optional[int] = None) -> int:
    """Run float forwards (eval mode, no grad) over ``batches`` to initialise every activation
    quantizer from its observer. Returns the number of batches used."""
    layers = qat_layers(model)
    was_training = model.training
    model.eval()
    used = 0
    try:
        for layer in layers.values():
            layer.calibrating = True
            if layer.observer is not None:
                layer.observer = make_observer(layer.act_observer_name)
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                used += 1
    finally:
        for layer in layers.values():
            layer.calibrating = False
        model.train(was_training)
    if not used:
        raise ConfigError("no calibration batches", key="batches", value=0, fix="pass at least one batch")
    for layer in layers.values():
        if layer.act_quant is not None:
            layer.init_activation()
    return used


def convert_qat(model: nn.Module) -> Tuple[nn.Module, Dict[str, dict]]:
    """A float copy of ``model`` with each QuantLayer replaced by its layer holding quantized weights.

    Report per layer: w_bits, a_bits, w_scale (list), and the input grid a_scale / a_zero_point /
    a_signed (None when the input stays float) for an exporter that inserts activation quantization.
    """
    model = copy.deepcopy(model)
    report: Dict[str, dict] = {}
    for name, ql in qat_layers(model).items():
        ql.eval()
        with torch.no_grad():
            layer = ql.layer
            layer.weight.copy_(ql.weight_quant(layer.weight))
        w_scale, _ = ql.weight_quant.qparams()
        entry = {"w_bits": ql.w_bits, "a_bits": ql.a_bits,
                 "w_scale": [float(v) for v in torch.as_tensor(w_scale).flatten()],
                 "a_scale": None, "a_zero_point": None, "a_signed": None}
        if ql.act_quant is not None and getattr(ql.act_quant, "initialized", True):
            scale, zp = ql.act_quant.qparams()
            entry.update(a_scale=float(torch.as_tensor(scale).max()), a_zero_point=int(torch.as_tensor(zp).max()),
                         a_signed=bool(ql.act_quant.signed))
        report[name] = entry
        _swap(model, ql, layer)
    return model, report
