"""Model families built from architecture parameters (one family per module)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Tuple

import torch.nn as nn

from automl.configs import parse_config
from automl.registry import Registry
from automl.validate import Where


@dataclass(frozen=True)
class ArchFamily:
    """``params_cls`` declares the parameters (with ranges); ``build`` makes the module."""

    name: str
    params_cls: type
    build_fn: Callable[..., nn.Module]

    def build(self, params: Mapping, input_shape: Tuple[int, ...], num_classes: int,
              where: Where = Where(key="arch")) -> nn.Module:
        config = parse_config(self.params_cls, dict(params), where)
        return self.build_fn(config, tuple(input_shape), num_classes)


ARCHS: Registry[ArchFamily] = Registry("architecture family")


def register_arch(name: str, params_cls: type):
    def decorator(fn):
        ARCHS.register(name)(ArchFamily(name, params_cls, fn))
        return fn

    return decorator


from automl.arch import cnn as _cnn  # noqa: E402,F401  (registers)
from automl.arch import mobilenet as _mobilenet, resnet as _resnet  # noqa: E402,F401  (registers)
from automl.arch import mlp as _mlp  # noqa: E402,F401  (registers)
