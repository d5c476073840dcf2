"""Static model statistics: parameters, non-zeros and dense multiply-accumulates (MACs)."""
from __future__ import annotations

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Dense MACs of one forward pass over ``example`` (Conv and Linear layers)."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        per_out = module.in_channels // module.groups
        for k in module.kernel_size:
            per_out *= k
        total += output.numel() * per_out

    def linear_hook(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total // max(example.shape[0], 1)
