"""A trial's flat config (``arch.width``, ``pruning.ratio`` ...) becomes a Recipe."""
from __future__ import annotations

from typing import Any, Dict, Mapping

from automl.compress import CATEGORIES, get_method
from automl.configs import field_names, parse_config
from automl.recipe.schema import Recipe, Stage
from automl.settings import TrainSettings
from automl.spaces.schema import SearchSpace
from automl.validate import Where


def _group(config: Mapping, prefix: str) -> Dict[str, Any]:
    return {k[len(prefix) + 1:]: v for k, v in config.items() if k.startswith(prefix + ".")}


def start_epoch_for(method_config, epochs: int):
    """Methods with ``finetune_epochs`` act that many epochs before the end of training."""
    finetune = getattr(method_config, "finetune_epochs", None)
    return None if finetune is None else max(0, epochs - finetune)


def recipe_from_config(space: SearchSpace, config: Mapping, *, provenance: Mapping | None = None) -> Recipe:
    where = Where(space.source or "<trial config>")
    train = parse_config(TrainSettings, _group(config, "train"), where / "train")
    stages = []
    for category in CATEGORIES:
        group = _group(config, category)
        name = group.pop("method", "none")
        if name == "none":
            continue
        info = get_method(name, category=category)
        # Options the space defines for other methods of this category do not apply here.
        options = {k: v for k, v in group.items() if k in field_names(info.config_cls)}
        method_config = parse_config(info.config_cls, options, where / "compression" / category)
        stages.append(Stage(name, method_config, start_epoch_for(method_config, train.epochs)))
    return Recipe(task=space.task, family=space.family, arch=_group(config, "arch"), train=train,
                  stages=tuple(stages), deploy=space.deploy,
                  provenance={"space_hash": space.hash, **dict(provenance or {})})
