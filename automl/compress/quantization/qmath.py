"""Affine (uniform) quantization math: integer ranges, scale/zero-point, quantize and dequantize.

q = clamp(round(x / scale) + zero_point, qmin, qmax);  x_hat = (q - zero_point) * scale.

Symmetric: zero_point is 0 (signed) or 2**(bits-1) (unsigned) and scale = max|x| / (2**(bits-1) - 1),
so -max|x| and +max|x| are both representable (narrow range, as TensorRT does). Asymmetric: the range
[min, max] (widened to include 0, so that 0 is exact) is spread over every level. Per-channel
quantization passes tensors of mins/maxes and the ``axis`` the channels lie on.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from automl.errors import ConfigError

BITS = (2, 3, 4, 5, 6, 7, 8, 16)
# The smallest scale ever returned: a constant tensor (max == min == 0) still gets a usable grid.
MIN_SCALE = float(torch.finfo(torch.float32).eps)


def check_bits(bits, *, key: str = "bits") -> int:
    """Return ``bits`` when it is a supported bit-width, else raise a ConfigError naming ``key``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ConfigError("unsupported bit-width", key=key, value=bits,
                          fix=f"use one of {', '.join(map(str, BITS))}")
    return bits


def qrange(bits: int, signed: bool = True) -> Tuple[int, int]:
    """Integer range (qmin, qmax): [-2**(b-1), 2**(b-1)-1] signed, [0, 2**b-1] unsigned."""
    check_bits(bits)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _as_tensor(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).detach()


def qparams(min_val, max_val, bits: int = 8, symmetric: bool = True, signed: bool = True
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for the range [min_val, max_val] (floats or per-channel tensors).

    The range is widened to include 0; scale is never below MIN_SCALE; zero_point is an int32 tensor
    inside [qmin, qmax].
    """
    qmin, qmax = qrange(bits, signed)
    lo, hi = _as_tensor(min_val), _as_tensor(max_val)
    if bool((lo > hi).any()):
        raise ValueError("min_val must not exceed max_val")
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if symmetric:
        half = (1 << (bits - 1)) - 1
        scale = torch.clamp(torch.maximum(-lo, hi) / half, min=MIN_SCALE)
        zero_point = torch.full_like(scale, 0 if signed else 1 << (bits - 1), dtype=torch.int32)
        return scale, zero_point
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=MIN_SCALE)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def broadcast_along(value: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """Reshape a per-channel vector so that it broadcasts along ``axis`` of ``x``."""
    value = torch.as_tensor(value, device=x.device)
    if axis is None or value.dim() == 0:
        return value
    axis = axis % x.dim()
    if value.numel() != x.shape[axis]:
        raise ValueError(f"{value.numel()} per-channel parameters for {x.shape[axis]} channels on axis {axis}")
    shape = [1] * x.dim()
    shape[axis] = -1
    return value.reshape(shape)


def quantize(x: torch.Tensor, scale, zero_point, bits: int = 8, signed: bool = True,
             axis: Optional[int] = None) -> torch.Tensor:
    """Integer codes (int32) of ``x``; out-of-range values saturate at qmin/qmax."""
    qmin, qmax = qrange(bits, signed)
    s = broadcast_along(_as_tensor(scale), x, axis)
    z = broadcast_along(torch.as_tensor(zero_point), x, axis).to(x.dtype)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale, zero_point, axis: Optional[int] = None) -> torch.Tensor:
    """Float values (float32) of integer codes ``q``."""
    s = broadcast_along(_as_tensor(scale), q, axis)
    z = broadcast_along(torch.as_tensor(zero_point), q, axis)
    return (q.to(torch.float32) - z.to(torch.float32)) * s


def fake_quantize(x: torch.Tensor, scale, zero_point, bits: int = 8, signed: bool = True,
                  axis: Optional[int] = None) -> torch.Tensor:
    """quantize then dequantize: ``x`` snapped to the grid, in float (no gradient handling)."""
    return dequantize(quantize(x, scale, zero_point, bits, signed, axis), scale, zero_point, axis).to(x.dtype)


def minmax(x: torch.Tensor, axis: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``x``: scalars, or one per index of ``axis``."""
    x = x.detach()
    if axis is None:
        return x.min(), x.max()
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def fake_quantize_minmax(x: torch.Tensor, bits: int = 8, symmetric: bool = True, signed: bool = True,
                         axis: Optional[int] = None) -> torch.Tensor:
    """Fake-quantize ``x`` with the range of ``x`` itself (per tensor, or per channel on ``axis``)."""
    scale, zero_point = qparams(*minmax(x, axis), bits, symmetric, signed)
    return fake_quantize(x.detach(), scale, zero_point, bits, signed, axis)
