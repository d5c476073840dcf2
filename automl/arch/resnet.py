"""A ResNet-style residual CNN for small inputs: stem, stages of BasicBlocks, optional SE, GAP + Linear.

Layer names are stable for addressing: ``stem.conv``, ``stages.<s>.<b>.conv1|bn1|conv2|bn2``,
``stages.<s>.<b>.shortcut.conv|bn`` (projection only), ``stages.<s>.<b>.se.fc1|fc2`` and ``head``; with
``ghost`` > 1 a convolution ``X`` is a ghost module, ``X.primary`` and ``X.cheap``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch.nn as nn

from automl.arch import register_arch
from automl.arch.common import StemStagesNet
from automl.arch.ghost import conv_or_ghost
from automl.configs import option


@dataclass(frozen=True)
class ResNetParams:
    width: int = option(16, low=1, high=1024, doc="channels of the stem and the first stage")
    stages: int = option(3, low=1, high=5, doc="number of stages; channels double at each")
    blocks: int = option(2, low=1, high=8, doc="BasicBlocks per stage")
    se: bool = option(False, doc="squeeze-excitation on every block's residual branch")
    se_reduction: int = option(4, low=1, high=64, doc="SE bottleneck = channels // se_reduction")
    ghost: int = option(1, low=1, high=8, doc="1: plain convolutions; r > 1: the stem and block convolutions "
                        "are ghost modules (GhostNet) computing 1/r of their maps, the rest from cheap 3x3 "
                        "depthwise filters")


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, ghost: int = 1) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=conv_or_ghost(in_ch, out_ch, kernel, ghost, stride=stride, padding=kernel // 2),
        bn=nn.BatchNorm2d(out_ch)))


class SqueezeExcite(nn.Module):
    """Channel gating x * sigmoid(fc2(relu(fc1(gap(x))))), with 1x1 convs as the two FCs."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, se: bool, se_reduction: int, ghost: int = 1):
        super().__init__()
        self.conv1 = conv_or_ghost(in_ch, out_ch, 3, ghost, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_or_ghost(out_ch, out_ch, 3, ghost, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, se_reduction) if se else nn.Identity()
        # A projection only where the identity cannot match shape (stride or channel change).
        self.shortcut = conv_bn(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


class ResNet(StemStagesNet):
    pass


@register_arch("resnet", ResNetParams)
def build_resnet(p: ResNetParams, input_shape, num_classes: int) -> nn.Module:
    in_ch, size = input_shape[0], min(input_shape[1:])
    stem = conv_bn(in_ch, p.width, 3, ghost=p.ghost)
    stem.add_module("relu", nn.ReLU(inplace=True))
    stages, ch = [], p.width
    for s in range(p.stages):
        out_ch = p.width * 2 ** s
        # Halve the resolution at each later stage while the map is larger than 2x2 (8x8 -> 4 -> 2).
        stride = 2 if s > 0 and size > 2 else 1
        size = (size + 1) // 2 if stride == 2 else size
        blocks = []
        for b in range(p.blocks):
            blocks.append(BasicBlock(ch, out_ch, stride if b == 0 else 1, p.se, p.se_reduction, p.ghost))
            ch = out_ch
        stages.append(nn.Sequential(*blocks))
    return ResNet(stem, nn.Sequential(*stages), ch, num_classes)
