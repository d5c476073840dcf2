"""Diagonal empirical Fisher information: the second-order saliency of Optimal Brain Damage.

LeCun et al. (1990) rank a weight by the loss increase its removal causes, 0.5 * H_ii * w_i^2, with
the Hessian's diagonal H_ii. Near a trained minimum the empirical Fisher, the mean squared gradient of
the loss over single samples, approximates that diagonal (Theis et al. 2018; Kurtic et al. 2022).
Gradients are taken over small batches (``batch_size``): a batch's mean gradient averages the
per-sample ones away, so smaller batches estimate the Fisher better, at more backward passes.
"""
from __future__ import annotations

from itertools import islice
from typing import Dict

import torch
import torch.nn.functional as F

from automl.errors import ConfigError


def diagonal_fisher(model: torch.nn.Module, task, params: Dict[str, torch.Tensor], *, batches: int,
                    batch_size: int = 16, seed: int = 0) -> Dict[str, torch.Tensor]:
    """{name: mean over ``batches`` training batches of grad(loss)^2} for each tensor in ``params``
    (parameters of ``model``), in eval mode so BatchNorm statistics do not move."""
    if task is None:
        raise ConfigError("second-order (obd) pruning needs training data to estimate the Fisher information",
                          key="criterion", value="obd", fix="run it through a task (automl apply/search)")
    loss_fn = getattr(task, "loss", F.cross_entropy)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training, seen = model.training, 0
    model.eval()
    try:
        with torch.enable_grad():
            for x, y in islice(task.train_loader(batch_size=batch_size, seed=seed), batches):
                model.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        acc[n] += p.grad.detach().float() ** 2
                seen += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: a / max(seen, 1) for n, a in acc.items()}


def obd_saliency(weight: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """0.5 * F_ii * w_i^2 per weight: the loss increase OBD predicts for zeroing it. A nonzero weight
    scores at least the smallest normal float, so weights already zero (pruned) still rank below
    those whose Fisher is zero (e.g. feeding a dead unit) and a later pruning event keeps its level."""
    w = weight.detach().float()
    return (0.5 * fisher * w ** 2).clamp_min(torch.finfo(torch.float32).tiny) * (w != 0)
