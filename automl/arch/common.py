"""Pieces the model families share."""
from __future__ import annotations

import torch.nn as nn


class StemStagesNet(nn.Module):
    """stem -> stages -> global average pool -> Linear head (ResNet- and MobileNet-style families).

    Tools rely on these attribute names (early exit splits at ``stages``; the head is the classifier)."""

    def __init__(self, stem: nn.Module, stages: nn.Sequential, channels: int, num_classes: int):
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.flatten(self.pool(self.stages(self.stem(x)))))
