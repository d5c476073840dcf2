"""A trial's flat config (``arch.width``, ``pruning.ratio`` ...) becomes a Recipe."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

from automl.compress import CATEGORIES, get_method
from automl.configs import field_names, parse_config
from automl.recipe.schema import Recipe, Stage
from automl.settings import TrainSettings
from automl.spaces.schedule import schedule_from_config
from automl.spaces.schema import SearchSpace, is_mapping_option
from automl.validate import Where


def _group(config: Mapping, prefix: str) -> Dict[str, Any]:
    return {k[len(prefix) + 1:]: v for k, v in config.items() if k.startswith(prefix + ".")}


def regroup_entries(cls, group: Mapping, where: Where) -> Dict[str, Any]:
    """The options of ``cls`` in a category's flat values, with ``<option>.<entry>`` values (one per
    entry of a mapping option searched entry by entry) put back into the mapping ``<option>``.

    Field names hold no dots, so the option is the part before the first dot and the entry (a layer
    name or pattern, which may hold dots) is the rest."""
    names = field_names(cls)
    options: Dict[str, Any] = {k: v for k, v in group.items() if k in names}
    for key, value in group.items():
        option, dot, entry = key.partition(".")
        if not dot or option not in names:
            continue
        if not is_mapping_option(cls, option):
            raise (where / key).error(f"option '{option}' is not a mapping; it takes no '.<entry>' values",
                                      value, f"give '{option}' one value")
        if option in group:
            raise (where / key).error(f"'{option}' is given both whole and entry by entry", value,
                                      f"give either '{option}' or '{option}.<entry>' values")
        options.setdefault(option, {})[entry] = value
    return options


def start_epoch_for(method_config, epochs: int):
    """Methods with ``finetune_epochs`` act that many epochs before the end of training."""
    finetune = getattr(method_config, "finetune_epochs", None)
    return None if finetune is None else max(0, epochs - finetune)


def recipe_from_config(space: SearchSpace, config: Mapping, *, provenance: Mapping | None = None) -> Recipe:
    where = Where(space.source or "<trial config>")
    # space order, not the config's: among 're:' entries of one mapping the last listed wins, and a
    # searcher may return fixed values after the sampled ones
    config = {**{n: config[n] for n in space.names() if n in config}, **config}
    train = parse_config(TrainSettings, _group(config, "train"), where / "train")
    if not train.threads:  # a trial trains with the CPUs it holds; its recipe says so, to replay alike
        train = dataclasses.replace(train, threads=space.budget.trial_cpus)
    stages = []
    for category in CATEGORIES:
        group = _group(config, category)
        name = group.pop("method", "none")
        if name == "none":
            continue
        info = get_method(name, category=category)
        # Options the space defines for other methods of this category do not apply here.
        options = regroup_entries(info.config_cls, group, where / "compression" / category)
        method_config = parse_config(info.config_cls, options, where / "compression" / category)
        stages.append(Stage(name, method_config, start_epoch_for(method_config, train.epochs)))
    schedule = schedule_from_config(config, where, train.epochs)
    return Recipe(task=space.task, family=space.family, arch=_group(config, "arch"), train=train,
                  stages=tuple(stages), schedule=tuple(schedule), deploy=space.deploy, model=space.model,
                  data=space.data, supernet=space.supernet,
                  provenance={"space_hash": space.hash, **dict(provenance or {})})
