"""A configurable plain CNN: conv-BN-ReLU blocks, downsampling by pooling or stride, GAP + Linear head."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from automl.arch import register_arch
from automl.arch.ghost import conv_or_ghost
from automl.configs import option


@dataclass(frozen=True)
class CNNParams:
    width: int = option(16, low=1, high=4096, doc="channels of the first block")
    depth: int = option(2, low=1, high=16, doc="number of conv blocks")
    kernel: int = option(3, choices=(1, 3, 5, 7), doc="square kernel size")
    pooling: str = option("max", choices=("max", "avg", "stride", "none"),
                          doc="how every other block halves the resolution")
    growth: float = option(2.0, low=1.0, high=4.0, doc="channel multiplier at each downsampling")
    dropout: float = option(0.0, low=0.0, high=1.0, high_open=True, doc="dropout before the head")
    ghost: int = option(1, low=1, high=8, doc="1: plain convolutions; r > 1: ghost modules (GhostNet) that "
                        "compute 1/r of each conv's maps and make the rest with cheap 3x3 depthwise filters")


class CNN(nn.Module):
    def __init__(self, features: nn.Sequential, head: nn.Module):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = head

    def forward(self, x):
        return self.head(self.flatten(self.pool(self.features(x))))


@register_arch("cnn", CNNParams)
def build_cnn(p: CNNParams, input_shape, num_classes: int) -> nn.Module:
    in_ch, size = input_shape[0], min(input_shape[1:])
    layers, width = [], float(p.width)
    for i in range(p.depth):
        # Downsample after even blocks while the feature map is larger than 2x2.
        down = p.pooling != "none" and i % 2 == 0 and size > 2
        out_ch = max(1, int(round(width)))
        stride = 2 if down and p.pooling == "stride" else 1
        layers += [conv_or_ghost(in_ch, out_ch, p.kernel, p.ghost, stride=stride, padding=p.kernel // 2),
                   nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
        if down and p.pooling in ("max", "avg"):
            layers.append(nn.MaxPool2d(2) if p.pooling == "max" else nn.AvgPool2d(2))
        if down:
            size //= 2
            width *= p.growth
        in_ch = out_ch
    head = nn.Sequential(nn.Dropout(p.dropout), nn.Linear(in_ch, num_classes)) if p.dropout else \
        nn.Linear(in_ch, num_classes)
    return CNN(nn.Sequential(*layers), head)
