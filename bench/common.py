"""What the benchmark scripts share (run them as `python bench/<name>.py`; this directory is on sys.path)."""
from __future__ import annotations

import torch

from automl.tasks.base import TensorClassificationTask


class GeneratedTask(TensorClassificationTask):
    """Random 3x32x32 inputs with random labels: for latency only (accuracy is meaningless)."""

    name = "generated32"

    def __init__(self, n=256):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        super().__init__(x, y, x[:64], y[:64], x[:64], y[:64])
