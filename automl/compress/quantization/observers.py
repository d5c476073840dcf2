"""Observers: watch tensors (calibration batches, weights) and choose a quantization range.

minmax          the exact range seen (outliers included)
moving_average  exponential moving average of per-batch min/max (the usual QAT activation observer)
percentile      the p-th percentile of the values (clips the rare outliers)
mse             the clipping range that minimises the mean squared quantization error for given bits
entropy         TensorRT-style: the threshold that minimises KL(P || Q) between the histogram of |x|
                and its quantized version (per tensor only)

Every observer: ``update(x)`` (returns x, so it can sit inline), ``range() -> (lo, hi)`` and
``qparams(bits, symmetric, signed) -> (scale, zero_point)``. With ``axis`` set, ranges are per channel.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from automl.compress.quantization import qmath
from automl.errors import ConfigError, LifecycleError
from automl.registry import Registry

OBSERVERS: Registry = Registry("observer")


def make_observer(name: str, **kwargs) -> "Observer":
    """Build a registered observer by name (unknown names raise with a did-you-mean)."""
    return OBSERVERS.get(name, key="observer")(**kwargs)


class Observer:
    """Base: tracks the exact per-tensor or per-channel min/max; subclasses refine ``range``."""

    def __init__(self, axis: Optional[int] = None):
        self.axis = axis
        self.min_val: Optional[torch.Tensor] = None
        self.max_val: Optional[torch.Tensor] = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = qmath.minmax(x.detach().float(), self.axis)
        self._observe(x.detach().float(), lo, hi)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.batches += 1
        return x

    def _observe(self, x, lo, hi):
        pass

    def _require_data(self):
        if self.min_val is None:
            raise LifecycleError(f"{type(self).__name__}: range() called before any update(); "
                                 "feed calibration batches first")

    def range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        self._require_data()
        return self.min_val, self.max_val

    def qparams(self, bits: int = 8, symmetric: bool = True, signed: bool = True):
        return qmath.qparams(*self.range(), bits, symmetric, signed)

    def reset(self):
        self.__init__(**self._init_args())

    def _init_args(self) -> dict:
        return {"axis": self.axis}


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """The exact range of everything seen."""


@OBSERVERS.register("moving_average")
class MovingAverageMinMaxObserver(Observer):
    """min/max as exponential moving averages: m <- m + momentum * (batch - m); the first batch sets m."""

    def __init__(self, axis: Optional[int] = None, momentum: float = 0.01):
        if not 0.0 < momentum <= 1.0:
            raise ConfigError("momentum out of range (0, 1]", key="momentum", value=momentum,
                              fix="use e.g. 0.01 (slow) to 1.0 (last batch only)")
        super().__init__(axis)
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = qmath.minmax(x.detach().float(), self.axis)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.momentum * (lo - self.min_val)
            self.max_val = self.max_val + self.momentum * (hi - self.max_val)
        self.batches += 1
        return x

    def _init_args(self):
        return {"axis": self.axis, "momentum": self.momentum}


class SampleObserver(Observer):
    """Keeps a bounded, proportionally drawn sample of the values (per channel when ``axis`` is set).

    When the sample would exceed ``max_samples`` (per channel), old and new values are subsampled in
    proportion to how many values each stands for, so every batch weighs by its size.
    """

    def __init__(self, axis: Optional[int] = None, max_samples: int = 1 << 16, seed: int = 0):
        super().__init__(axis)
        self.max_samples = int(max_samples)
        self.seed = seed
        self.samples: Optional[torch.Tensor] = None  # (channels, k); channels == 1 per tensor
        self.seen = 0
        self._gen = torch.Generator().manual_seed(seed)

    def _init_args(self):
        return {"axis": self.axis, "max_samples": self.max_samples, "seed": self.seed}

    def _pick(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        if rows.shape[1] <= k:
            return rows
        return rows[:, torch.randperm(rows.shape[1], generator=self._gen)[:k]]

    def _observe(self, x, lo, hi):
        rows = x.reshape(1, -1) if self.axis is None else x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        n = rows.shape[1]
        if self.samples is None:
            self.samples, self.seen = self._pick(rows, self.max_samples), n
            return
        total = self.seen + n
        if self.samples.shape[1] + n > self.max_samples:
            keep_old = round(self.max_samples * self.seen / total)
            self.samples = self._pick(self.samples, keep_old)
            rows = self._pick(rows, self.max_samples - keep_old)
        self.samples = torch.cat([self.samples, rows], dim=1)
        self.seen = total

    def _out(self, lo: torch.Tensor, hi: torch.Tensor):
        return (lo[0], hi[0]) if self.axis is None else (lo, hi)


@OBSERVERS.register("percentile")
class PercentileObserver(SampleObserver):
    """(lo, hi) = the (100 - p)-th and p-th percentiles of the sample."""

    def __init__(self, axis: Optional[int] = None, percentile: float = 99.99, max_samples: int = 1 << 16,
                 seed: int = 0):
        if not 50.0 < percentile <= 100.0:
            raise ConfigError("percentile out of range (50, 100]", key="percentile", value=percentile,
                              fix="use e.g. 99.9 or 99.99")
        super().__init__(axis, max_samples, seed)
        self.percentile = percentile

    def _init_args(self):
        return {**super()._init_args(), "percentile": self.percentile}

    def range(self):
        self._require_data()
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0])
        both = torch.quantile(self.samples, q, dim=1)
        return self._out(both[0], both[1])


@OBSERVERS.register("mse")
class MSEObserver(SampleObserver):
    """Searches a shrink factor c of the seen range, [c*min, c*max], minimising quantization MSE.

    ``range()`` uses the bits/symmetric/signed given here; ``qparams`` searches for the ones it gets.
    """

    def __init__(self, axis: Optional[int] = None, bits: int = 8, symmetric: bool = True, signed: bool = True,
                 grid: int = 100, max_samples: int = 1 << 16, seed: int = 0):
        super().__init__(axis, max_samples, seed)
        self.bits, self.symmetric, self.signed = qmath.check_bits(bits), symmetric, signed
        self.grid = grid

    def _init_args(self):
        return {**super()._init_args(), "bits": self.bits, "symmetric": self.symmetric, "signed": self.signed,
                "grid": self.grid}

    def _search(self, bits, symmetric, signed):
        self._require_data()
        lo0, hi0 = self.samples.min(dim=1).values.clamp(max=0), self.samples.max(dim=1).values.clamp(min=0)
        best = torch.full_like(lo0, float("inf"))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for c in torch.linspace(1.0 / self.grid, 1.0, self.grid):
            lo, hi = lo0 * c, hi0 * c
            scale, zp = qmath.qparams(lo, hi, bits, symmetric, signed)
            err = ((qmath.fake_quantize(self.samples, scale, zp, bits, signed, axis=0) - self.samples) ** 2).mean(1)
            better = err < best
            best = torch.where(better, err, best)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
        return self._out(best_lo, best_hi)

    def range(self):
        return self._search(self.bits, self.symmetric, self.signed)

    def qparams(self, bits: int = 8, symmetric: bool = True, signed: bool = True):
        return qmath.qparams(*self._search(bits, symmetric, signed), bits, symmetric, signed)


def _kl_threshold(hist: torch.Tensor, edges: torch.Tensor, levels: int) -> float:
    """TensorRT calibration: the |x| threshold whose clipped-and-quantized histogram is closest in KL."""
    hist = hist.double()
    n = hist.numel()
    best_kl, best_i = math.inf, n
    for i in range(levels, n + 1):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()  # outliers collapse onto the clipping bin
        nonzero = (hist[:i] > 0).double()
        # Q: merge the i reference bins into `levels` groups, spread each group's mass evenly over
        # its non-empty bins (empty bins stay empty).
        group = torch.arange(i) * levels // i
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, hist[:i])
        counts = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, nonzero)
        q = nonzero * sums[group] / counts[group].clamp(min=1.0)
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum <= 0 or q_sum <= 0:
            continue
        p, q = p / p_sum, q / q_sum
        mask = p > 0
        # Where P > 0 but Q == 0 (only the clipping bin can be), a tiny Q replaces an infinite divergence.
        kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-12))).sum())
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


@OBSERVERS.register("entropy")
class EntropyObserver(SampleObserver):
    """KL-divergence calibration on a histogram of |x| (per tensor only); the range is (-t, t), or
    (0, t) when nothing negative was seen."""

    def __init__(self, axis: Optional[int] = None, bins: int = 2048, bits: int = 8, max_samples: int = 1 << 18,
                 seed: int = 0):
        if axis is not None:
            raise ConfigError("the entropy observer is per tensor only", key="axis", value=axis,
                              fix="use axis=None, or the 'mse'/'percentile' observer for per-channel ranges")
        super().__init__(None, max_samples, seed)
        self.bins, self.bits = bins, qmath.check_bits(bits)

    def _init_args(self):
        return {"axis": None, "bins": self.bins, "bits": self.bits, "max_samples": self.max_samples,
                "seed": self.seed}

    def _threshold(self, bits: int) -> float:
        self._require_data()
        values = self.samples.abs().flatten()
        top = float(values.max())
        if top == 0.0:
            return 0.0
        levels = 1 << (bits - 1)  # magnitudes get the positive half of a signed grid
        bins = max(self.bins, levels)
        hist = torch.histc(values, bins=bins, min=0.0, max=top)
        return _kl_threshold(hist, torch.linspace(0.0, top, bins + 1), levels)

    def range(self):
        t = self._threshold(self.bits)
        lo = 0.0 if float(self.min_val) >= 0 else -t
        return torch.tensor(lo), torch.tensor(t)

    def qparams(self, bits: int = 8, symmetric: bool = True, signed: bool = True):
        t = self._threshold(bits)
        lo = 0.0 if float(self.min_val) >= 0 else -t
        return qmath.qparams(lo, t, bits, symmetric, signed)
