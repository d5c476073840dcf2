"""A multilayer perceptron: flatten, hidden Linear + ReLU layers, Linear head (LeNet-300-100 style).

Hidden widths start at ``width`` and shrink by ``shrink`` per layer: width 300, depth 2, shrink 3
gives Han et al.'s 300-100 layout. Layer names are ``fc1`` ... ``fc<depth>`` and ``head``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch.nn as nn

from automl.arch import register_arch
from automl.configs import option


@dataclass(frozen=True)
class MLPParams:
    width: int = option(300, low=1, high=65_536, doc="units of the first hidden layer")
    depth: int = option(2, low=0, high=16, doc="number of hidden layers (0: a linear classifier)")
    shrink: float = option(3.0, low=1.0, high=16.0, doc="each hidden layer has 1/shrink the units of the one before")
    dropout: float = option(0.0, low=0.0, high=1.0, high_open=True, doc="dropout after each hidden layer")


def hidden_sizes(p: MLPParams) -> list:
    return [max(1, int(round(p.width / p.shrink ** i))) for i in range(p.depth)]


@register_arch("mlp", MLPParams)
def build_mlp(p: MLPParams, input_shape, num_classes: int) -> nn.Module:
    features = 1
    for d in input_shape:
        features *= d
    layers = [("flatten", nn.Flatten())]
    for i, units in enumerate(hidden_sizes(p), start=1):
        layers += [(f"fc{i}", nn.Linear(features, units)), (f"relu{i}", nn.ReLU(inplace=True))]
        if p.dropout:
            layers.append((f"drop{i}", nn.Dropout(p.dropout)))
        features = units
    layers.append(("head", nn.Linear(features, num_classes)))
    return nn.Sequential(OrderedDict(layers))
