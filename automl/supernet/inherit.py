"""A recipe's built-in model with the weights it inherits from a trained supernet."""
from __future__ import annotations

from typing import Mapping

import torch.nn as nn

from automl.arch.inherited import SupernetSource
from automl.errors import ConfigError
from automl.supernet.elastic import extreme_configs
from automl.supernet.network import recalibrate_bn, sizing_values
from automl.supernet.store import load_supernet


def inherit(source: SupernetSource, family: str, arch: Mapping, task, *, seed: int = 0) -> nn.Module:
    """The ``family`` model of ``arch`` carrying its slice of the supernet's weights, batch norm
    re-estimated on ``source.bn_samples`` training samples."""
    net, manifest = load_supernet(source.path, source.sha256)
    if manifest["family"] != family:
        raise ConfigError(f"the supernet was trained for the {manifest['family']} family", key="arch.family",
                          value=family, fix=f"search the {manifest['family']} family, or train a supernet for {family}")
    if list(manifest["input_shape"]) != list(task.input_shape) or manifest["num_classes"] != task.num_classes:
        raise ConfigError(f"the supernet was trained on inputs {tuple(manifest['input_shape'])} with "
                          f"{manifest['num_classes']} classes ({manifest['task']})", key="task", value=task.name,
                          fix="use the task the supernet was trained on, or train one for this task")
    model = net.extract(dict(arch))
    return recalibrate_bn(model, task.train_loader(batch_size=64, seed=seed), source.bn_samples)


def check_space(space) -> None:
    """Every architecture ``space`` can sample fits in its supernet: checked before any trial runs."""
    net, manifest = load_supernet(space.supernet.path, space.supernet.sha256)
    if manifest["family"] != space.family:
        raise ConfigError(f"the supernet was trained for the {manifest['family']} family", file=space.source,
                          key="arch.family", value=space.family,
                          fix=f"search the {manifest['family']} family, or train a supernet for {space.family}")
    params = [p for p in space.params if p.name.startswith("arch.")]
    domains = {p.name.split(".", 1)[1]: sizing_values(p.domain) for p in params}
    for config in extreme_configs(domains):
        net._skeleton(config)  # raises ConfigError naming the parameter that does not fit


__all__ = ["check_space", "inherit"]
