"""Static model statistics: parameters, non-zeros and dense multiply-accumulates (MACs)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode (BN statistics frozen) and restore the model's train/eval flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def forward_batches(model: nn.Module, batches, handles=()) -> None:
    """Run ``batches`` through ``model`` in eval mode without gradients (for the forward hooks whose
    ``handles`` are removed afterwards, whatever happens)."""
    try:
        with eval_mode(model), torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def _macs_per_output(module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    per_out = module.in_channels // module.groups
    for k in module.kernel_size:
        per_out *= k
    return per_out


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict:
    """Dense MACs per sample of every named Conv/Linear layer for one forward pass over ``example``
    (a layer called twice counts twice)."""
    macs: dict = {}
    batch = max(example.shape[0], 1)

    def hook(name):
        def record(module, inputs, output):
            # a conv subclass of a zoo may return several maps (octave convs: high and low frequency)
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            elems = sum(t.numel() for t in outputs if isinstance(t, torch.Tensor))
            macs[name] = macs.get(name, 0) + elems * _macs_per_output(module) // batch
        return record

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    forward_with_hooks(model, example, {m: hook(n) for n, m in model.named_modules() if isinstance(m, kinds)})
    return macs


def forward_with_hooks(model: nn.Module, example: torch.Tensor, hooks: dict):
    """One eval-mode, no-grad forward of ``example`` with ``{module: forward hook}`` attached; the hooks
    are removed afterwards whatever happens."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Dense MACs of one forward pass over ``example`` (Conv and Linear layers), per sample."""
    return sum(layer_macs(model, example).values())
