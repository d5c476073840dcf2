"""GPTQ-style rounding (Frantar et al., ICLR 2023; Optimal Brain Quantization): round a layer's weight
one input column at a time and spread each column's rounding error over the columns not yet rounded,
weighted by the inverse Hessian of the layer's squared output error, H = X^T X over calibration inputs.

For a Conv2d the columns are (input channel, kernel position) and X holds unfolded input patches (at
most ``max_rows`` of them, sampled); a grouped convolution is solved group by group. Columns go in
decreasing order of H's diagonal ("act order"), H is damped by 1 % of its mean diagonal, and the grid
(the layer's LSQ step per output channel) stays fixed, so the result is exactly on it. Layers other
than Conv2d and Linear keep nearest rounding. Driver and guard: rounding.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.compress.quantization.qat import QuantLayer
from automl.compress.quantization.rounding import nearest, weight_grid


@dataclass(frozen=True)
class GPTQSettings:
    damp: float = 0.01
    max_rows: int = 20_000   # input rows (patches) the Hessian is estimated from
    chunk: int = 16          # samples unfolded at a time


def _conv_columns(conv: nn.Conv2d, x: torch.Tensor, rows_per_sample: int, gen: torch.Generator) -> torch.Tensor:
    """Sampled input patches of ``conv``: (rows, in_channels * kh * kw)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice,
                  mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    n, cols, positions = patches.shape
    take = min(rows_per_sample, positions)
    index = torch.stack([torch.randperm(positions, generator=gen)[:take] for _ in range(n)])
    chosen = torch.gather(patches, 2, index.unsqueeze(1).expand(n, cols, take))
    return chosen.permute(0, 2, 1).reshape(-1, cols)


def _hessians(layer: nn.Module, x: torch.Tensor, groups: int, settings: GPTQSettings, seed: int) -> List[torch.Tensor]:
    """X^T X per group, accumulated over chunks of samples."""
    gen = torch.Generator().manual_seed(seed)
    per_sample = max(1, settings.max_rows // max(len(x), 1))
    hessians = None
    with torch.no_grad():
        for start in range(0, len(x), settings.chunk):
            part = x[start:start + settings.chunk]
            cols = (_conv_columns(layer, part, per_sample, gen) if isinstance(layer, nn.Conv2d)
                    else part.reshape(-1, part.shape[-1])).double()
            width = cols.shape[1] // groups
            blocks = [cols[:, g * width:(g + 1) * width] for g in range(groups)]
            step = [b.T @ b for b in blocks]
            hessians = step if hessians is None else [h + s for h, s in zip(hessians, step)]
    return hessians


def _solve(weight: torch.Tensor, hessian: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int,
           damp: float) -> torch.Tensor:
    """Rows of ``weight`` (out x cols) rounded column by column with error feedback (OBQ / GPTQ)."""
    w, h = weight.double().clone(), hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = step.double().reshape(-1)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = s * torch.clamp(torch.round(w[:, i] / s), qmin, qmax)
        err = (w[:, i] - q[:, i]) / upper[i, i]
        w[:, i:] -= err.unsqueeze(1) * upper[i, i:].unsqueeze(0)
    return q[:, torch.argsort(order)]


def gptq_layer(layer: QuantLayer, x_float: torch.Tensor, x_in: torch.Tensor, seed: int = 0,
               settings: GPTQSettings = GPTQSettings()) -> torch.Tensor:
    """The layer's weight rounded with error feedback (on the grid); the layer is not changed."""
    inner = layer.layer
    if not isinstance(inner, (nn.Conv2d, nn.Linear)):
        return nearest(layer)
    step, qmin, qmax = weight_grid(layer)
    weight = inner.weight.detach()
    groups = inner.groups if isinstance(inner, nn.Conv2d) else 1
    hessians = _hessians(inner, x_in, groups, settings, seed)
    steps = step.reshape(-1).expand(weight.shape[0]) if step.numel() == 1 else step.reshape(-1)
    rows = weight.shape[0] // groups
    out = torch.empty_like(weight)
    for g, hessian in enumerate(hessians):
        part = slice(g * rows, (g + 1) * rows)
        solved = _solve(weight[part].reshape(rows, -1), hessian, steps[part], qmin, qmax, settings.damp)
        out[part] = solved.to(weight.dtype).reshape(weight[part].shape)
    return out


__all__ = ["GPTQSettings", "gptq_layer"]
