"""AdaRound (Nagel et al., ICML 2020): learn, per layer, whether each weight rounds up or down.

With the layer's weight grid fixed, AdaRound learns a soft rounding h(V) in [0, 1] per weight,

    W~ = s * clamp(floor(W / s) + h(V), -Qn, Qp),   h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),

minimising || W x - W~ x~ ||^2 over the calibration inputs, where x is the layer's input in the float
model and x~ its input in the model whose earlier layers are already rounded, with the layer's own
input quantizer applied (the paper's asymmetric reconstruction: later layers correct the error
earlier ones left). A regulariser sum(1 - |2 h - 1|^beta), beta annealed from 20 to 2 after a
warm-up, pushes every h to 0 or 1; the weight becomes the hard choice. Defaults follow the paper and
AIMET (lambda 0.01, beta 20 -> 2, 20 % warm-up, Adam lr 1e-3). Driver and guard: rounding.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from automl.compress.quantization.qat import QuantLayer
from automl.compress.quantization.rounding import weight_grid

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundSettings:
    iterations: int = 1000
    batch_size: int = 32
    reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    lr: float = 1e-3


def _soft(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _beta(i: int, settings: AdaRoundSettings) -> float:
    start = settings.warmup * settings.iterations
    progress = (i - start) / max(settings.iterations - start, 1)
    return settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (1 + torch.cos(
        torch.tensor(progress * torch.pi)).item())


def adaround_layer(layer: QuantLayer, x_float: torch.Tensor, x_in: torch.Tensor, seed: int = 0,
                   settings: AdaRoundSettings = AdaRoundSettings()) -> torch.Tensor:
    """The layer's weight with its rounding learned (on the grid); the layer is not changed."""
    step, qmin, qmax = weight_grid(layer)
    weight = layer.layer.weight.detach()
    scaled = weight / step
    floor = torch.floor(scaled)
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) = rest: starts at the float weight
    with torch.no_grad():
        target = layer._compute(x_float, weight)

    def quantized(h):
        return step * torch.clamp(floor + h, qmin, qmax)

    opt = torch.optim.Adam([v], lr=settings.lr)
    gen = torch.Generator().manual_seed(seed)
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
        return quantized((v >= 0).float())


__all__ = ["AdaRoundSettings", "adaround_layer"]
