"""Binary and ternary weights.

Binary (BWN / XNOR-Net weights, Rastegari et al. 2016): W ~ alpha * sign(W), alpha = mean|W| per
output channel (the L2-optimal scale for a fixed sign pattern); sign(0) is taken as +1.
Ternary (TWN, Li et al. 2016): delta = 0.7 * mean|W|; W ~ alpha * t with t = sign(W) where
|W| > delta else 0, and alpha = mean of |W| over the kept entries.

The modules apply the same functions in training with a straight-through gradient: the
full-precision weight receives the gradient of its binary/ternary image unchanged.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from automl.errors import ConfigError


def _rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Weights as (groups, elements): one row per output channel, or a single row."""
    return w.reshape(w.shape[0], -1) if per_channel and w.dim() > 1 else w.reshape(1, -1)


def _scale_shape(w: torch.Tensor, per_channel: bool):
    return (-1,) + (1,) * (w.dim() - 1) if per_channel and w.dim() > 1 else ()


def binary_weights(w: torch.Tensor, per_channel: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(signs in {-1, +1}, alpha): alpha per output channel (shape (C,)) or one scalar."""
    w = w.detach()
    signs = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    alpha = _rows(w, per_channel).abs().mean(dim=1)
    return signs, alpha if per_channel and w.dim() > 1 else alpha[0]


def binarize(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """alpha * sign(w) with the shape of ``w``."""
    signs, alpha = binary_weights(w, per_channel)
    return signs * alpha.reshape(_scale_shape(w, per_channel))


def ternary_weights(w: torch.Tensor, threshold: float = 0.7, per_channel: bool = True
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, +1}, alpha): delta = threshold * mean|w|, alpha = mean |w| above delta
    (0 for a group with nothing above it), per output channel or per tensor."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 2.0:
        # delta = 2 * mean|w| already zeroes every weight of a uniform layer
        raise ConfigError("ternary threshold out of range [0, 2)", key="threshold", value=threshold,
                          fix="use the TWN value 0.7 (or a value in [0, 2))")
    w = w.detach()
    rows = _rows(w, per_channel).abs()
    delta = threshold * rows.mean(dim=1, keepdim=True)
    keep = rows > delta
    alpha = (rows * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    codes = (torch.sign(w) * keep.reshape(w.shape)).to(w.dtype)
    return codes, alpha if per_channel and w.dim() > 1 else alpha[0]


def ternarize(w: torch.Tensor, threshold: float = 0.7, per_channel: bool = True) -> torch.Tensor:
    """alpha * t with the shape of ``w``."""
    codes, alpha = ternary_weights(w, threshold, per_channel)
    return codes * alpha.reshape(_scale_shape(w, per_channel))


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized image exactly; backward: the gradient goes to w unchanged."""

    @staticmethod
    def forward(ctx, w, image):
        return image

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _straight_through(w: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(w, image.detach())


class BinaryWeight(nn.Module):
    """Fake-quant weight module: forward gives binarize(w); backward passes the gradient to w."""

    bits = 1
    signed = True
    initialized = True

    def __init__(self, per_channel: bool = True):
        super().__init__()
        self.per_channel = per_channel
        self._alpha = torch.tensor(0.0)

    def qparams(self):
        return self._alpha, torch.zeros_like(self._alpha, dtype=torch.int32)

    def forward(self, w):
        signs, self._alpha = binary_weights(w, self.per_channel)
        return _straight_through(w, signs * self._alpha.reshape(_scale_shape(w, self.per_channel)))


class TernaryWeight(nn.Module):
    """Fake-quant weight module: forward gives ternarize(w); backward passes the gradient to w.
    Stored with 2 bits per weight (three levels)."""

    bits = 2
    signed = True
    initialized = True

    def __init__(self, threshold: float = 0.7, per_channel: bool = True):
        super().__init__()
        ternary_weights(torch.zeros(1), threshold)  # validate now, not at the first forward
        self.threshold, self.per_channel = threshold, per_channel
        self._alpha = torch.tensor(0.0)

    def qparams(self):
        return self._alpha, torch.zeros_like(self._alpha, dtype=torch.int32)

    def forward(self, w):
        codes, self._alpha = ternary_weights(w, self.threshold, self.per_channel)
        return _straight_through(w, codes * self._alpha.reshape(_scale_shape(w, self.per_channel)))
