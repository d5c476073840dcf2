"""Fake quantization for training: straight-through estimator (STE), LSQ and PACT.

STE      round() passes the gradient unchanged inside the representable range, 0 outside (clipped).
LSQ      Esser et al. 2020: the step size s is a parameter; x_q = round(clamp(x / s, -Qn, Qp)) * s,
         with the gradient of s scaled by g = 1 / sqrt(n * Qp) (n = elements per step size).
PACT     Choi et al. 2018: a learnable clipping level alpha; y = clamp(x, 0, alpha) quantized on
         [0, alpha]; dy/dalpha = 1 where x >= alpha. ``signed=True`` clips to [-alpha, alpha].

All quantizer modules share: ``bits``, ``signed``, ``qparams() -> (scale, zero_point)`` and
``init_from_observer(observer)``; in eval mode they keep their grid (a dynamic STE weight grid
stays a function of the current weights).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from automl.compress.quantization import qmath
from automl.compress.quantization.observers import Observer
from automl.errors import LifecycleError


class _STEFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        s = qmath.broadcast_along(scale.to(x.dtype), x, axis)
        z = qmath.broadcast_along(zero_point, x, axis).to(x.dtype)
        q = torch.round(x / s) + z
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (torch.clamp(q, qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None


def ste_fake_quantize(x: torch.Tensor, scale, zero_point, bits: int = 8, signed: bool = True,
                      axis: Optional[int] = None) -> torch.Tensor:
    """Fake quantization whose gradient is 1 where x maps inside [qmin, qmax] and 0 where it clips."""
    qmin, qmax = qmath.qrange(bits, signed)
    return _STEFakeQuant.apply(x, torch.as_tensor(scale), torch.as_tensor(zero_point), qmin, qmax, axis)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value of ``x``, gradient of ``x`` multiplied by ``g``."""
    return (x - x * g).detach() + x * g


class STEQuantizer(nn.Module):
    """Affine fake quantization with an observer-chosen grid and STE gradients.

    ``dynamic=True`` (weights): the grid is recomputed from the current tensor on every forward.
    ``dynamic=False`` (activations): the observer accumulates over training batches (e.g.
    moving-average min/max) and eval mode freezes the last grid.
    """

    def __init__(self, bits: int, signed: bool = True, symmetric: bool = True, axis: Optional[int] = None,
                 observer: Optional[Observer] = None, dynamic: bool = False):
        super().__init__()
        self.bits, self.signed, self.symmetric, self.axis = qmath.check_bits(bits), signed, symmetric, axis
        self.observer = observer if observer is not None else Observer(axis)
        self.dynamic = dynamic
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.initialized = False

    def init_from_observer(self, observer: Observer):
        scale, zp = observer.qparams(self.bits, self.symmetric, self.signed)
        self.scale, self.zero_point = scale.clone(), zp.clone()
        self.initialized = True

    def qparams(self):
        return self.scale, self.zero_point

    def forward(self, x):
        if self.dynamic or self.training:  # a dynamic grid is a function of the tensor, also in eval
            if self.dynamic:
                self.observer.reset()
            self.observer.update(x)
            self.init_from_observer(self.observer)
        elif not self.initialized:
            raise LifecycleError("STEQuantizer used in eval mode before it saw any data; calibrate first")
        return ste_fake_quantize(x, self.scale, self.zero_point, self.bits, self.signed, self.axis)


class LSQQuantizer(nn.Module):
    """Learned step size quantization (symmetric grid, zero point 0).

    ``channels`` > 0 gives one step per index of ``axis`` (per-channel weights); None gives one step.
    Signed: levels [-2**(b-1), 2**(b-1) - 1]; unsigned (after ReLU): [0, 2**b - 1].
    """

    def __init__(self, bits: int, signed: bool = True, channels: Optional[int] = None, axis: int = 0):
        super().__init__()
        self.bits = qmath.check_bits(bits)
        self.set_signed(signed)
        self.axis = axis if channels else None
        self.step = nn.Parameter(torch.ones(channels) if channels else torch.tensor(1.0))
        self.initialized = False

    def set_signed(self, signed: bool):
        """Signed levels [-Qn, Qp] = [-2**(b-1), 2**(b-1) - 1]; unsigned [0, 2**b - 1]."""
        self.signed = signed
        self.qn, self.qp = (1 << (self.bits - 1), (1 << (self.bits - 1)) - 1) if signed else (0, (1 << self.bits) - 1)

    def _set_step(self, step: torch.Tensor):
        with torch.no_grad():
            self.step.copy_(torch.clamp(torch.as_tensor(step, dtype=torch.float32), min=qmath.MIN_SCALE)
                            .expand_as(self.step))
        self.initialized = True

    def init_from_tensor(self, x: torch.Tensor):
        """The paper's initialisation: s = 2 * mean|x| / sqrt(Qp) (per channel when per-channel)."""
        x = x.detach().abs()
        mean = x.mean() if self.axis is None else x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1).mean(1)
        self._set_step(2.0 * mean / math.sqrt(self.qp))

    def init_from_observer(self, observer: Observer):
        """Step = the observer's scale for this grid (symmetric signed, or [0, max] unsigned)."""
        scale, _ = observer.qparams(self.bits, symmetric=self.signed, signed=self.signed)
        self._set_step(scale)

    def qparams(self):
        step = self.step.detach().abs().clamp(min=qmath.MIN_SCALE)
        return step, torch.zeros_like(step, dtype=torch.int32)  # the grid is symmetric about 0

    def forward(self, x):
        if not self.initialized:
            if not self.training:
                raise LifecycleError("LSQQuantizer used in eval mode before initialisation; calibrate first")
            self.init_from_tensor(x)
        per_step = x.numel() if self.axis is None else x.numel() // x.shape[self.axis]
        g = 1.0 / math.sqrt(per_step * self.qp)
        s = qmath.broadcast_along(grad_scale(self.step.abs().clamp(min=qmath.MIN_SCALE), g), x, self.axis)
        return round_ste(torch.clamp(x / s, -self.qn, self.qp)) * s


class PACTQuantizer(nn.Module):
    """PACT activation quantization with a learnable clipping level ``alpha``.

    Unsigned: y = clamp(x, 0, alpha) on 2**b - 1 steps; signed: clamp(x, -alpha, alpha) on
    2**(b-1) - 1 steps either side. The step is alpha / steps with alpha detached, so alpha learns
    only through the clipped elements (dy/dalpha = 1 where x >= alpha, -1 where x <= -alpha).
    """

    def __init__(self, bits: int, signed: bool = False, alpha: float = 6.0):
        super().__init__()
        self.bits = qmath.check_bits(bits)
        self.set_signed(signed)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.initialized = False

    def set_signed(self, signed: bool):
        self.signed = signed
        self.steps = (1 << (self.bits - 1)) - 1 if signed else (1 << self.bits) - 1

    def init_from_observer(self, observer: Observer):
        """alpha = the top of the observer's range for this grid (per tensor)."""
        scale, _ = observer.qparams(self.bits, symmetric=self.signed, signed=self.signed)
        with torch.no_grad():
            self.alpha.fill_(float(torch.as_tensor(scale).max()) * self.steps)
        self.initialized = True

    def qparams(self):
        scale = self.alpha.detach().abs().clamp(min=qmath.MIN_SCALE) / self.steps
        return scale, torch.tensor(0, dtype=torch.int32)

    def forward(self, x):
        alpha = self.alpha.abs().clamp(min=qmath.MIN_SCALE)
        y = torch.minimum(torch.maximum(x, -alpha), alpha) if self.signed else torch.minimum(torch.relu(x), alpha)
        scale = alpha.detach() / self.steps
        return round_ste(y / scale) * scale
