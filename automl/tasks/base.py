"""The Task protocol and a base class for in-memory classification tasks."""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from automl.errors import ConfigError

# (inputs, targets, model output, task loss) -> the loss to minimise (penalties, distillation ...)
LossHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

TASK_METHODS = ("build_model", "train_loader", "val_loader", "test_loader", "example_input",
                "train_epoch", "evaluate", "loss")


@runtime_checkable
class Task(Protocol):
    """What the search and ``apply`` need from a task."""

    name: str
    input_shape: Tuple[int, ...]
    num_classes: int

    def build_model(self, family: str, params: Mapping) -> nn.Module: ...

    def train_loader(self, batch_size: int, seed: int) -> DataLoader: ...

    def val_loader(self, batch_size: int = 512) -> DataLoader: ...

    def test_loader(self, batch_size: int = 512) -> DataLoader: ...

    def example_input(self, batch: int = 1) -> torch.Tensor: ...

    def train_epoch(self, model: nn.Module, optimizer, loader: DataLoader, *,
                    after_step: Optional[Callable[[], None]] = None,
                    loss_hook: Optional[LossHook] = None) -> float: ...

    def evaluate(self, predict, loader: DataLoader) -> float: ...

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss (early exit and distillation add their terms to it)."""
        ...


class DatasetTask:
    """Classification over torch Datasets of (input, label) pairs, one per split.

    ``num_classes`` and ``input_shape`` are read off the data when not given."""

    name = "dataset"

    def __init__(self, train, val, test=None, *, num_classes: Optional[int] = None,
                 input_shape: Optional[Tuple[int, ...]] = None, name: Optional[str] = None):
        self.datasets = {"train": train, "val": val, "test": val if test is None else test}
        if name:
            self.name = name
        self.input_shape = tuple(input_shape) if input_shape else tuple(self.example_input(1).shape[1:])
        self.num_classes = num_classes

    def build_model(self, family: str, params: Mapping) -> nn.Module:
        from automl.arch import ARCHS

        if self.num_classes is None:
            raise ConfigError("a built-in architecture needs the number of classes of the task", key="task",
                              value=self.name, fix="give the task num_classes")
        return ARCHS.get(family, key="arch.family").build(params, self.input_shape, self.num_classes)

    def _loader(self, split, batch_size, shuffle, seed=0):
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(self.datasets[split], batch_size=batch_size, shuffle=shuffle, generator=generator)

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        return self._loader("train", batch_size, True, seed)

    def val_loader(self, batch_size: int = 512) -> DataLoader:
        return self._loader("val", batch_size, False)

    def test_loader(self, batch_size: int = 512) -> DataLoader:
        return self._loader("test", batch_size, False)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Up to ``batch`` validation inputs (fewer when the split is smaller)."""
        rows = []
        for x, _ in self.val_loader(batch_size=batch):
            rows.append(torch.as_tensor(x))
            if sum(len(r) for r in rows) >= batch:
                break
        return torch.cat(rows)[:batch].clone()

    def loss(self, logits, target):
        return F.cross_entropy(logits, target)

    def train_epoch(self, model, optimizer, loader, *, after_step=None, loss_hook=None) -> float:
        """One epoch; returns the mean task loss (without what ``loss_hook`` adds)."""
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            output = model(x)
            loss = self.loss(output, y)
            objective = loss if loss_hook is None else loss_hook(x, y, output, loss)
            objective.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        return total / max(count, 1)

    def evaluate(self, predict, loader) -> float:
        """Top-1 accuracy of ``predict`` (an nn.Module or any callable batch -> logits)."""
        if isinstance(predict, nn.Module):
            module = predict.eval()

            def predict(x):
                with torch.no_grad():
                    return module(x)
        correct, count = 0, 0
        for x, y in loader:
            logits = predict(x)
            pred = np.asarray(logits.detach() if isinstance(logits, torch.Tensor) else logits).argmax(axis=1)
            correct += int((pred == np.asarray(y)).sum())
            count += len(y)
        return correct / max(count, 1)


class TensorClassificationTask(DatasetTask):
    """Classification over tensors held in memory: subclasses fill the three splits."""

    name = "tensor"

    def __init__(self, x_train, y_train, x_val, y_val, x_test, y_test):
        self.splits = {
            "train": (torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(y_train, dtype=torch.long)),
            "val": (torch.as_tensor(x_val, dtype=torch.float32), torch.as_tensor(y_val, dtype=torch.long)),
            "test": (torch.as_tensor(x_test, dtype=torch.float32), torch.as_tensor(y_test, dtype=torch.long)),
        }
        classes = int(max(int(y.max()) for _, y in self.splits.values()) + 1)
        super().__init__(*(TensorDataset(*self.splits[s]) for s in ("train", "val", "test")),
                         num_classes=classes, input_shape=tuple(self.splits["train"][0].shape[1:]))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return self.splits["val"][0][:batch].clone()
