"""Weight sharing over a family's sub-networks: one tensor per parameter position, sliced per sub-network.

A sub-network is an ordinary model of its family, built from its architecture parameters. Each of its
parameters and buffers has a *canonical key* (its state_dict name, except where a family's names move
with other parameters: the plain CNN's ``features.<i>`` indices shift with pooling layers) and takes
the leading channels of the shared tensor under that key; a smaller kernel takes the shared kernel's
centre. So every sub-network carries inherited weights, and gradients through the slices train them.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, Iterable, List, Mapping, Tuple

import torch
import torch.nn as nn

from automl.errors import ConfigError

MAX_CONFIGS = 4096  # extreme configurations enumerated to size the shared tensors


def _head_keys(model: nn.Module, depth: int) -> Dict[str, str]:
    """One classifier per depth: what the head reads changes with the block it follows."""
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("head")]
    return {name: f"head_after{depth}" for name in head}


def cnn_keys(model: nn.Module) -> Dict[str, str]:
    """The plain CNN's blocks by position: ``features.<j>`` -> ``block<i>.conv`` / ``block<i>.bn``."""
    names, block = {}, -1
    for name, module in model.features.named_children():
        if isinstance(module, nn.Conv2d):
            block += 1
            names[f"features.{name}"] = f"block{block}.conv"
        elif isinstance(module, nn.BatchNorm2d):
            names[f"features.{name}"] = f"block{block}.bn"
    return {**names, **_head_keys(model, block + 1)}


def stages_keys(model: nn.Module) -> Dict[str, str]:
    """stem -> stages -> head families: names are stable (``stages.<s>.<b>``); the head is per stage count."""
    return _head_keys(model, len(model.stages))


def mlp_keys(model: nn.Module) -> Dict[str, str]:
    """fc1..fcN keep their names; the head is per number of hidden layers."""
    return _head_keys(model, sum(1 for name, _ in model.named_children() if name.startswith("fc")))


# family -> module-name map; families not listed keep their state_dict names
MODULE_KEYS: Dict[str, Callable[[nn.Module], Dict[str, str]]] = {
    "cnn": cnn_keys, "resnet": stages_keys, "mobilenetv2": stages_keys, "mlp": mlp_keys}


def canonical_keys(family: str, model: nn.Module) -> Dict[str, str]:
    """state_dict name -> canonical key, for every tensor of ``model``."""
    renamed = MODULE_KEYS.get(family, lambda m: {})(model)
    out = {}
    for name in model.state_dict():
        module, _, leaf = name.rpartition(".")
        out[name] = f"{renamed.get(module, module)}.{leaf}" if module else name
    return out


def kinds(model: nn.Module, keys: Mapping[str, str]) -> Dict[str, str]:
    """canonical key -> 'conv' | 'linear' | 'bn' | 'other', for initialising the shared tensors."""
    out = {}
    for module_name, module in model.named_modules():
        kind = ("conv" if isinstance(module, nn.Conv2d) else "linear" if isinstance(module, nn.Linear)
                else "bn" if isinstance(module, nn.modules.batchnorm._BatchNorm) else "other")
        for leaf, _ in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            name = f"{module_name}.{leaf}" if module_name else leaf
            out[keys[name]] = kind
    return out


def extreme_configs(domains: Mapping[str, List]) -> Iterable[Dict]:
    """Every combination of each parameter's extreme values (all values of a choice, both ends of a range)."""
    names = list(domains)
    count = math.prod(len(v) for v in domains.values())
    if count > MAX_CONFIGS:
        raise ConfigError(f"the architecture space has {count} extreme combinations (at most {MAX_CONFIGS})",
                          key="arch", value=count, fix="give fewer choices to the architecture parameters")
    for values in itertools.product(*(domains[n] for n in names)):
        yield dict(zip(names, values))


def shared_shapes(family: str, build: Callable[[Dict], nn.Module], configs: Iterable[Dict]
                  ) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, str]]:
    """(canonical key -> the largest shape any configuration needs, key -> kind); models built on the
    meta device, so sizing costs no memory."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    kind_of: Dict[str, str] = {}
    for config in configs:
        with torch.device("meta"):
            model = build(config)
        keys = canonical_keys(family, model)
        kind_of.update(kinds(model, keys))
        for name, tensor in model.state_dict().items():
            key, shape = keys[name], tuple(tensor.shape)
            old = shapes.get(key)
            if old is not None and len(old) != len(shape):
                raise ConfigError(f"'{key}' changes rank between sub-networks ({old} vs {shape}), so it cannot be "
                                  "shared", key="arch", value=config, fix="keep that parameter fixed in the space")
            shapes[key] = shape if old is None else tuple(max(a, b) for a, b in zip(old, shape))
    return shapes, kind_of


def init_shared(shapes: Mapping[str, Tuple[int, ...]], kind_of: Mapping[str, str],
                seed: int) -> Dict[str, torch.Tensor]:
    """Fresh shared tensors initialised as PyTorch initialises the layers they serve."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        leaf = key.rpartition(".")[2]
        if leaf == "num_batches_tracked":
            out[key] = torch.zeros(shape, dtype=torch.long)
        elif kind_of.get(key) == "bn":
            out[key] = torch.ones(shape) if leaf in ("weight", "running_var") else torch.zeros(shape)
        elif leaf == "weight" and len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Conv2d / nn.Linear do
            out[key] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            fan_in = shapes.get(key.rpartition(".")[0] + ".weight", (1, 1))
            bound = 1.0 / math.sqrt(max(math.prod(fan_in[1:]), 1))
            out[key] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return out


def take(shared: torch.Tensor, shape: Tuple[int, ...], kind: str) -> torch.Tensor:
    """The part of ``shared`` a sub-network tensor of ``shape`` uses: leading channels; the centre of a
    convolution kernel. A view: gradients flow back into ``shared``."""
    if shared.dim() == 0:
        return shared
    index = []
    for dim, (have, want) in enumerate(zip(shared.shape, shape)):
        start = (have - want) // 2 if kind == "conv" and dim >= 2 else 0
        index.append(slice(start, start + want))
    return shared[tuple(index)]


def check_fits(name: str, key: str, shape, shared_shape, config) -> None:
    if shared_shape is None or len(shape) != len(shared_shape) or any(w > h for w, h in zip(shape, shared_shape)):
        raise ConfigError(f"the sub-network's '{name}' {tuple(shape)} does not fit in the supernet "
                          f"('{key}' {None if shared_shape is None else tuple(shared_shape)})", key="arch",
                          value=config, fix="search only architectures inside the space the supernet was trained "
                                            "on (see its manifest.yaml), or train a supernet for this space")


def sub_tensors(family: str, model: nn.Module, shared: Mapping[str, torch.Tensor], kind_of: Mapping[str, str],
                config=None) -> Dict[str, torch.Tensor]:
    """state_dict name -> the slice of the shared tensor it inherits (views, not copies)."""
    keys = canonical_keys(family, model)
    out = {}
    for name, tensor in model.state_dict().items():
        key = keys[name]
        have = shared.get(key)
        check_fits(name, key, tensor.shape, None if have is None else have.shape, config)
        out[name] = take(have, tuple(tensor.shape), kind_of.get(key, "other"))
    return out


__all__ = ["MODULE_KEYS", "canonical_keys", "extreme_configs", "init_shared", "shared_shapes", "sub_tensors",
           "take"]
