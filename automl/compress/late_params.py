"""Parameters a compression method creates after the optimizer was built.

The training loop builds its optimizer once, after every stage's ``prepare`` (so that parameters a
stage adds then are trained). Methods that act later, at their start epoch (QAT quantizer steps,
k-means centroids, low-rank factors), cannot add parameters to that optimizer. They reserve empty
Parameters at ``prepare`` instead, hand them over through ``trainable_parameters()``, and fill them
at their start epoch: ``param.data`` may take any shape while the parameter has never had a
gradient, because optimizers create their per-parameter state (momentum, Adam moments) lazily at
the first step that sees a gradient, and skip parameters whose gradient is None until then.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from automl.errors import LifecycleError


class LateParameters:
    """``count`` reserved Parameters, handed out in order by :meth:`adopt`."""

    def __init__(self, count: int, owner: str):
        self.slots: List[nn.Parameter] = [nn.Parameter(torch.empty(0)) for _ in range(count)]
        self.owner = owner
        self.used = 0

    def parameters(self) -> List[nn.Parameter]:
        return list(self.slots)

    def adopt(self, value: torch.Tensor) -> nn.Parameter:
        """A reserved Parameter now holding a copy of ``value`` (the optimizer already knows it)."""
        if self.used >= len(self.slots):
            raise LifecycleError(
                f"{self.owner}: needs more trainable tensors ({self.used + 1}) than it reserved at prepare "
                f"({len(self.slots)}); the model gained layers after its stages were prepared. Fix: select "
                "fewer layers, or start this stage at epoch 0 so it acts before training")
        slot = self.slots[self.used]
        if slot.grad is not None:
            raise LifecycleError(f"{self.owner}: a reserved parameter already has a gradient; adopt before training it")
        self.used += 1
        slot.data = value.detach().clone().to(slot.device)
        slot.requires_grad_(True)
        return slot

    def adopt_module(self, module: nn.Module, keep=()) -> nn.Module:
        """Swap every Parameter of ``module`` (recursively) for a reserved one with the same value,
        except the Parameter objects in ``keep`` (already known to the optimizer)."""
        kept = {id(p) for p in keep}
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and id(param) not in kept:
                    setattr(sub, name, self.adopt(param))
        return module
