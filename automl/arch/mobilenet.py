"""MobileNetV2-style network: stem, stages of inverted residual blocks, GAP + Linear head.

Block layer names: ``stages.<s>.<b>.expand.conv`` (absent when expansion == 1),
``stages.<s>.<b>.depthwise.conv`` (groups == channels) and ``stages.<s>.<b>.project.conv``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch.nn as nn

from automl.arch import register_arch
from automl.arch.common import StemStagesNet
from automl.configs import option

BASE_CHANNELS = 16  # stage s has BASE_CHANNELS * 2**s * width_mult channels


@dataclass(frozen=True)
class MobileNetV2Params:
    width_mult: float = option(1.0, low=0.05, high=8.0, doc="multiplier on every stage's channels")
    expansion: int = option(6, low=1, high=8, doc="hidden channels = input channels * expansion")
    stages: int = option(3, low=1, high=5, doc="number of stages; channels double at each")
    blocks: int = option(2, low=1, high=8, doc="inverted residual blocks per stage")
    stem_stride: int = option(1, choices=(1, 2), doc="stride of the stem conv (2 for large inputs)")


def conv_bn_act(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                act: bool = True) -> nn.Sequential:
    layers = OrderedDict(
        conv=nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(out_ch))
    if act:
        layers["act"] = nn.ReLU6(inplace=True)
    return nn.Sequential(layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        # MobileNetV2 skips the expansion conv when it would be an identity-sized 1x1.
        self.expand = conv_bn_act(in_ch, hidden, 1) if expansion != 1 else nn.Identity()
        self.depthwise = conv_bn_act(hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn_act(hidden, out_ch, 1, act=False)  # linear bottleneck: no activation
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2(StemStagesNet):
    pass


@register_arch("mobilenetv2", MobileNetV2Params)
def build_mobilenetv2(p: MobileNetV2Params, input_shape, num_classes: int) -> nn.Module:
    in_ch, size = input_shape[0], min(input_shape[1:])
    width = lambda s: max(1, int(round(BASE_CHANNELS * 2 ** s * p.width_mult)))  # noqa: E731
    stride = p.stem_stride if size > 2 else 1
    stem = conv_bn_act(in_ch, width(0), 3, stride)
    size = (size + stride - 1) // stride
    stages, ch = [], width(0)
    for s in range(p.stages):
        # Downsample at the first block of each later stage while the map is larger than 2x2.
        stride = 2 if s > 0 and size > 2 else 1
        size = (size + 1) // 2 if stride == 2 else size
        blocks = []
        for b in range(p.blocks):
            blocks.append(InvertedResidual(ch, width(s), stride if b == 0 else 1, p.expansion))
            ch = width(s)
        stages.append(nn.Sequential(*blocks))
    return MobileNetV2(stem, nn.Sequential(*stages), ch, num_classes)
