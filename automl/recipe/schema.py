"""Recipe: everything needed to rebuild one compressed model (arch, training, ordered stages, deploy)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from automl.arch import ARCHS
from automl.arch.inherited import SupernetSource
from automl.arch.user import ModelSource
from automl.compress import CATEGORIES, get_method
from automl.compress.base import check_stage_combination
from automl.compress.schedule import PolicySpec, check_schedule_epochs, parse_schedule, schedule_to_dict
from automl.configs import config_to_dict, parse_config
from automl.io import load_yaml, parse_yaml, write_yaml
from automl.settings import DeploySettings, TrainSettings
from automl.sections import model_section, supernet_section, task_section
from automl.tasks.data import DataSpec
from automl.validate import Where, expect_keys, expect_mapping, expect_type

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Stage:
    """One compression method with its config; ``start_epoch`` None means it acts after training."""

    method: str
    config: Any
    start_epoch: Optional[int] = None

    @property
    def category(self) -> str:
        return get_method(self.method).category

    def handler(self):
        return get_method(self.method).handler_cls(self.config, start_epoch=self.start_epoch)

    def to_dict(self) -> dict:
        return {"method": self.method, "start_epoch": self.start_epoch, "config": config_to_dict(self.config)}


@dataclass(frozen=True)
class Recipe:
    task: str
    family: str
    arch: Dict[str, Any]
    train: TrainSettings = field(default_factory=TrainSettings)
    stages: Tuple[Stage, ...] = ()
    schedule: Tuple[PolicySpec, ...] = ()  # regularization / lr policies on epoch windows
    deploy: DeploySettings = field(default_factory=DeploySettings)
    provenance: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    model: Optional[ModelSource] = None  # a user's model (then family is '' and arch empty)
    data: Optional[DataSpec] = None      # the task's data, when it is a data folder or arrays
    supernet: Optional[SupernetSource] = None  # the arch model starts from these shared weights

    def to_dict(self) -> dict:
        source = {"model": self.model.to_dict()} if self.model is not None else \
            {"arch": {"family": self.family, **self.arch}}
        return {
            "version": RECIPE_VERSION,
            "task": self.task,
            **({"data": self.data.to_dict()} if self.data is not None else {}),
            **source,
            **({"supernet": self.supernet.to_dict()} if self.supernet is not None else {}),
            "train": config_to_dict(self.train),
            "stages": [s.to_dict() for s in self.stages],
            "schedule": schedule_to_dict(self.schedule),
            "deploy": config_to_dict(self.deploy),
            "provenance": dict(self.provenance),
            "metrics": dict(self.metrics),
        }

    def save(self, path):
        return write_yaml(path, self.to_dict())

    @classmethod
    def from_dict(cls, data, source: str | None = None) -> "Recipe":
        where = Where(source)
        data = expect_mapping(data, where)
        expect_keys(data, where, ("version", "task", "data", "arch", "model", "supernet", "train", "stages",
                                  "schedule", "deploy", "provenance", "metrics"), required=("version",))
        if isinstance(data["version"], bool) or data["version"] != RECIPE_VERSION:
            raise (where / "version").error("unsupported recipe version", data["version"],
                                            f"use version: {RECIPE_VERSION}")
        family, arch, model = model_section(data, where)
        supernet = supernet_section(data, where, model)
        if model is None:
            parse_config(ARCHS.get(family).params_cls, arch, where / "arch")  # validate now, build later
        task, data_spec = task_section(data, where)
        stages, seen = [], []
        raw_stages = expect_type(data.get("stages") or [], where / "stages", list)
        for i, raw in enumerate(raw_stages):
            at = where / "stages" / i
            raw = expect_mapping(raw, at)
            expect_keys(raw, at, ("method", "start_epoch", "config"), required=("method",))
            expect_type(raw["method"], at / "method", str)
            info = get_method(raw["method"], file=source, key=(at / "method").key)
            if info.category in seen:
                raise (at / "method").error(f"a recipe has at most one {info.category} stage", raw["method"],
                                            "merge the two stages into one")
            seen.append(info.category)
            start = raw.get("start_epoch")
            if start is not None:
                start = expect_type(start, at / "start_epoch", int)
            stages.append(Stage(info.name, parse_config(info.config_cls, raw.get("config"), at / "config"), start))
        check_stage_combination([s.method for s in stages], file=source, key="stages")
        order = [CATEGORIES.index(s.category) for s in stages]
        if order != sorted(order):
            raise (where / "stages").error("stages must follow the category order", [s.method for s in stages],
                                           f"order them as {' -> '.join(CATEGORIES)}")
        train = parse_config(TrainSettings, data.get("train"), where / "train")
        for i, stage in enumerate(stages):
            if stage.start_epoch is not None and not 0 <= stage.start_epoch <= train.epochs:
                raise (where / "stages" / i / "start_epoch").error(
                    f"must be between 0 and train.epochs ({train.epochs})", stage.start_epoch,
                    f"give an epoch in 0..{train.epochs}, or leave it out to act after training")
        schedule = parse_schedule(data.get("schedule"), where / "schedule")
        check_schedule_epochs(schedule, train.epochs, where / "schedule")
        return cls(
            task=task, data=data_spec, model=model, family=family, arch=arch, supernet=supernet,
            train=train, stages=tuple(stages), schedule=tuple(schedule),
            deploy=parse_config(DeploySettings, data.get("deploy"), where / "deploy"),
            provenance=dict(expect_mapping(data.get("provenance") or {}, where / "provenance")),
            metrics=dict(expect_mapping(data.get("metrics") or {}, where / "metrics")),
        )

    @property
    def describe_model(self) -> str:
        if self.model is None:
            return f"{self.family} model"
        return f"model {self.model.builder or self.model.object_class}"

    @classmethod
    def load(cls, path) -> "Recipe":
        return cls.from_dict(load_yaml(path), str(path))

    @classmethod
    def loads(cls, text: str, source: str = "<string>") -> "Recipe":
        return cls.from_dict(parse_yaml(text, source), source)
