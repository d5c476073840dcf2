"""Synthetic calibration inputs from a model's BatchNorm statistics: int8 without touching training data.

Random images are optimised until the batch statistics they produce at every BatchNorm layer match
the running mean and variance the layer learned (the data generation of Sony MCT and ZeroQ, Cai et
al. 2020; DeepInversion without its teacher-student terms). Activation ranges calibrated on them
resemble those of real data closely enough for 8-bit quantization.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from automl.compress.layers import BATCHNORMS
from automl.errors import ConfigError


def bn_matching_inputs(model: nn.Module, example: torch.Tensor, *, batches: int, batch_size: int = 32,
                       steps: int = 500, lr: float = 0.1, seed: int = 0) -> List[torch.Tensor]:
    """``batches`` input batches shaped like ``example`` whose statistics match ``model``'s BatchNorm layers."""
    norms = [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.running_mean is not None]
    if not norms:
        raise ConfigError("synthetic calibration needs BatchNorm layers with running statistics to match",
                          key="calibration", value="synthetic",
                          fix="use calibration: data (a few training batches), or a model with BatchNorm")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, *example.shape[1:], generator=gen).requires_grad_(True)
    losses: List[torch.Tensor] = []

    def hook(module, inputs, _output):
        a = inputs[0]
        dims = [0] + list(range(2, a.dim()))
        mean, var = a.mean(dims), a.var(dims, unbiased=False)
        losses.append((mean - module.running_mean).pow(2).mean() + (var - module.running_var).pow(2).mean())

    handles = [m.register_forward_hook(hook) for m in norms]
    was_training = model.training
    model.eval()
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([x], lr=lr)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                losses.clear()
                optimizer.zero_grad()
                model(x)
                torch.stack(losses).sum().backward()
                optimizer.step()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
        model.train(was_training)
    data = x.detach()
    return [data[i * batch_size:(i + 1) * batch_size] for i in range(batches)]
