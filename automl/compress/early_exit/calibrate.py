"""Exit thresholds calibrated on validation data: the most permissive per-exit thresholds that keep the
accuracy within a budget of the final exit's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from automl.compress.early_exit.model import EarlyExitModel, confidence, exit_indices
from automl.errors import ConfigError


@dataclass(frozen=True)
class Calibration:
    thresholds: Tuple[float, ...]
    exit_fractions: Tuple[float, ...]   # share of validation samples leaving at each exit
    accuracy: float                     # with these thresholds
    final_accuracy: float               # final exit only (every threshold 1.0)


@torch.no_grad()
def exit_outputs(model: EarlyExitModel, loader) -> Tuple[torch.Tensor, torch.Tensor]:
    """All exits' logits (exits x samples x classes) and the targets over a loader."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(torch.stack(model.all_exits(x)))
        targets.append(y)
    model.train(was_training)
    return torch.cat(logits, dim=1), torch.cat(targets)


def calibrate_thresholds(model: EarlyExitModel, val_loader, max_accuracy_drop: float = 0.005, *,
                         criterion: str = "max_softmax", grid: int = 256) -> Calibration:
    """Per-exit thresholds keeping accuracy within ``max_accuracy_drop`` (a fraction) of the final exit.

    Greedy from the earliest exit: each takes the lowest threshold (most exits) for which the
    accuracy, with later exits still closed, stays on target; so the result always meets it.
    """
    if not 0.0 <= max_accuracy_drop <= 1.0:
        raise ConfigError("max_accuracy_drop is a fraction in [0, 1]", key="early_exit.max_accuracy_drop",
                          value=max_accuracy_drop, fix="use e.g. 0.005 for half a point")
    logits, target = exit_outputs(model, val_loader)
    conf = torch.stack([confidence(lg, criterion) for lg in logits])
    correct = logits.argmax(dim=2) == target[None, :]
    n_early = model.num_exits - 1

    def accuracy(ths):
        taken = exit_indices(conf, ths)
        return float(correct[taken, torch.arange(len(target))].float().mean())

    final_acc = float(correct[-1].float().mean())
    target_acc = final_acc - max_accuracy_drop
    chosen = [1.0] * n_early
    for i in range(n_early):
        values = torch.unique(conf[i])
        if len(values) > grid:  # quantiles keep calibration linear in the validation size
            values = torch.quantile(values.double(), torch.linspace(0, 1, grid, dtype=torch.double)).float()
        # A threshold halfway below each candidate admits it (conf > t) with a margin, so a deployed
        # runtime whose confidences differ in the last bits makes the same decision; scanning
        # ascending finds the most permissive threshold that meets the target.
        values = values.sort().values.double()
        below = torch.cat([values.new_zeros(1), values[:-1]])
        for t in ((values + below) / 2).tolist():
            trial = chosen[:i] + [t] + chosen[i + 1:]
            if accuracy(trial) >= target_acc - 1e-12:
                chosen[i] = t
                break
    taken = exit_indices(conf, chosen + [-1.0])
    fractions = torch.bincount(taken, minlength=model.num_exits).float() / len(target)
    return Calibration(tuple(chosen), tuple(float(f) for f in fractions), accuracy(chosen + [-1.0]), final_acc)


__all__ = ["Calibration", "calibrate_thresholds", "exit_outputs"]
