"""Ghost modules (Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020): a
convolution makes m = ceil(C / ratio) of its C maps, and cheap depthwise filters make ratio - 1 more
from each of them. An option of the built-in families (``ghost``) and what the ``ghost`` compression
method turns a trained convolution into (automl.compress.factorization.ghost)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class GhostConv(nn.Module):
    """``cat(primary(x), cheap(primary(x)))[:, :out_channels]``."""

    def __init__(self, primary: nn.Conv2d, cheap: nn.Conv2d, out_channels: int):
        super().__init__()
        self.primary, self.cheap, self.out_channels = primary, cheap, out_channels
        self.cut = primary.out_channels + cheap.out_channels != out_channels  # fixed, so fx can trace it

    def forward(self, x):
        p = self.primary(x)
        out = torch.cat([p, self.cheap(p)], 1)
        return out[:, :self.out_channels] if self.cut else out


def ghost_conv(in_channels: int, out_channels: int, kernel_size, ratio: int, *, stride=1, padding=0,
               dilation=1, bias: bool = False, dw_kernel: int = 3) -> GhostConv:
    """A freshly initialised ghost module standing for ``nn.Conv2d(in_channels, out_channels, ...)``."""
    m = math.ceil(out_channels / ratio)
    primary = nn.Conv2d(in_channels, m, kernel_size, stride, padding, dilation, bias=bias)
    cheap = nn.Conv2d(m, m * (ratio - 1), dw_kernel, 1, dw_kernel // 2, groups=m, bias=True)
    return GhostConv(primary, cheap, out_channels)


def conv_or_ghost(in_channels: int, out_channels: int, kernel: int, ratio: int, *, stride: int = 1,
                  padding: int = 0) -> nn.Module:
    """The families' convolution: a plain bias-free Conv2d, or with ``ratio`` > 1 a ghost module (a conv
    with fewer outputs than ``ratio`` stays plain)."""
    if ratio > 1 and out_channels >= ratio:
        return ghost_conv(in_channels, out_channels, kernel, ratio, stride=stride, padding=padding)
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False)
