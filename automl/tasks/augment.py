"""Training-time augmentation applied to any task's batches of images (N, C, H, W)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from automl.errors import ConfigError


def random_shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Each image moved by its own random offset in [-pixels, pixels] per axis; vacated pixels are 0."""
    if x.dim() != 4:
        raise ConfigError("shift augmentation needs image batches (N, C, H, W)", key="train.augment",
                          value=tuple(x.shape), fix="use augment: none for this task")
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    offsets = torch.randint(0, 2 * pixels + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            pick = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            if pick.any():
                out[pick] = padded[pick, :, dy:dy + h, dx:dx + w]
    return out


class AugmentedLoader:
    """Wraps a loader of (x, y) batches; the shifts are reproducible from ``seed``."""

    def __init__(self, loader, kind: str, seed: int = 0):
        self.loader, self.kind = loader, kind
        self.generator = torch.Generator().manual_seed(seed + 1)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield (random_shift(x, self.generator) if self.kind == "shift" else x), y


def augmented(loader, kind: str, seed: int = 0):
    return loader if kind == "none" else AugmentedLoader(loader, kind, seed)
