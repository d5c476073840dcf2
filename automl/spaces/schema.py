"""The search-space file: architecture, training and compression parameters, objectives, budget.

Flat parameter names are ``arch.<p>``, ``train.<p>`` and ``<category>.<p>`` (e.g. ``pruning.ratio``);
``when:`` conditions refer to them. Parameters are sampled in file order, ``method`` first in each
compression category, so a condition may only name a parameter defined before it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from automl.arch import ARCHS
from automl.compress import CATEGORIES, get_method, methods_in
from automl.configs import check_field, field_names, parse_config
from automl.io import load_yaml, parse_yaml
from automl.registry import did_you_mean, unknown_name
from automl.settings import METRICS, Budget, DeploySettings, TrainSettings
from automl.spaces.conditions import Condition, parse_when
from automl.spaces.domains import Choice, Domain, Fixed, FloatRange, IntRange, parse_domain
from automl.tasks import TASKS
from automl.validate import Where, expect_choice, expect_keys, expect_mapping, expect_type

TOP_KEYS = ("version", "task", "arch", "train", "compression", "objectives", "constraints", "budget", "deploy")
SUPPORTED_VERSIONS = (1,)


@dataclass(frozen=True)
class Param:
    name: str
    domain: Domain
    conditions: Tuple[Condition, ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    task: str
    family: str
    params: Tuple[Param, ...]
    objectives: Dict[str, str]
    constraints: Dict[str, Dict[str, float]]
    budget: Budget
    deploy: DeploySettings
    source: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def epochs(self) -> int:
        return int(self.param("train.epochs").domain.value)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def names(self):
        return [p.name for p in self.params]


def check_domain(cls, name: str, domain: Domain, where: Where):
    """Every value the domain can produce must be valid for field ``name`` of ``cls``."""
    if isinstance(domain, Choice):
        for i, v in enumerate(domain.values):
            check_field(cls, name, v, where / "choice" / i)
    elif isinstance(domain, (IntRange, FloatRange)):
        kind = "int" if isinstance(domain, IntRange) else "float"
        for v in (domain.low, domain.high):
            check_field(cls, name, v, where / kind)
    else:
        check_field(cls, name, domain.value, where)


def _section_params(section: dict, where: Where, prefix: str, cls, earlier: dict, skip=()) -> list:
    out = []
    for key, raw in section.items():
        if key in skip:
            continue
        at = where / key
        if key not in field_names(cls):
            expect_keys({key: None}, where, field_names(cls))
        domain, when = parse_domain(raw, at)
        check_domain(cls, key, domain, at)
        out.append(Param(f"{prefix}.{key}", domain, parse_when(when, at / "when", earlier)))
        earlier[f"{prefix}.{key}"] = domain
    return out


def _compression_params(section: dict, where: Where, earlier: dict) -> list:
    out = []
    for category, group in section.items():
        at = where / category
        if category not in CATEGORIES:
            raise unknown_name("compression category", category, CATEGORIES, file=where.file, key=at.key)
        group = expect_mapping(group, at)
        expect_keys(group, at, ["method"] + sorted({f for m in methods_in(category).values()
                                                     for f in field_names(m.config_cls)}), required=["method"])
        domain, when = parse_domain(group["method"], at / "method")
        if not isinstance(domain, (Choice, Fixed)):
            raise (at / "method").error("a method is chosen with {choice: [...]} or a fixed name", group["method"],
                                        "write e.g. 'method: {choice: [none, ...]}' or 'method: <name>'")
        names = domain.values if isinstance(domain, Choice) else (domain.value,)
        if not all(isinstance(n, str) for n in names):
            raise (at / "method").error("a method name is a string", group["method"],
                                        "write e.g. 'method: {choice: [none, ...]}' or 'method: <name>'")
        methods = []
        for i, name in enumerate(names):
            if name != "none":
                key = (at / "method" / "choice" / i) if isinstance(domain, Choice) else at / "method"
                methods.append(get_method(name, category=category, file=where.file, key=key.key))
        out.append(Param(f"{category}.method", domain, parse_when(when, at / "method" / "when", earlier)))
        earlier[f"{category}.method"] = domain
        for key, raw in group.items():
            if key == "method":
                continue
            owners = [m for m in methods if key in field_names(m.config_cls)]
            if not owners:
                raise (at / key).error(
                    f"no method chosen in '{category}.method' takes this option", key,
                    f"options of {', '.join(m.name for m in methods) or 'none'}: "
                    f"{', '.join(sorted({f for m in methods for f in field_names(m.config_cls)})) or '(none)'}")
            domain_k, when_k = parse_domain(raw, at / key)
            conditions = parse_when(when_k, at / key / "when", earlier)
            # an option shared by several methods (e.g. criterion) is checked against the methods its
            # `when` leaves possible, so each method's own choices apply
            possible = [m for m in owners if all(c.holds({c.param: m.name}) for c in conditions
                                                 if c.param == f"{category}.method")]
            for m in possible or owners:
                check_domain(m.config_cls, key, domain_k, at / key)
            out.append(Param(f"{category}.{key}", domain_k, conditions))
            earlier[f"{category}.{key}"] = domain_k
    return out


def _objectives(raw, where: Where) -> Dict[str, str]:
    raw = expect_mapping(raw, where)
    if not raw:
        raise where.error("at least one objective is needed", raw, "e.g. {accuracy: max, latency_ms: min}")
    for metric, mode in raw.items():
        if metric not in METRICS:
            raise unknown_name("metric", metric, METRICS, file=where.file, key=(where / metric).key)
        expect_choice(mode, where / metric, ("max", "min"))
    return dict(raw)


def _constraints(raw, where: Where) -> Dict[str, Dict[str, float]]:
    raw = expect_mapping(raw or {}, where)
    out = {}
    for metric, bound in raw.items():
        if metric not in METRICS:
            raise unknown_name("metric", metric, METRICS, file=where.file, key=(where / metric).key)
        bound = expect_mapping(bound, where / metric)
        expect_keys(bound, where / metric, ("min", "max"))
        out[metric] = {k: expect_type(v, where / metric / k, float) for k, v in bound.items()}
    return out


def parse_space(data: Any, source: str | None = None) -> SearchSpace:
    where = Where(source)
    data = expect_mapping(data, where)
    expect_keys(data, where, TOP_KEYS, required=("version", "task", "arch", "objectives"))
    if isinstance(data["version"], bool) or data["version"] not in SUPPORTED_VERSIONS:
        raise (where / "version").error("unsupported space version", data["version"], "use version: 1")
    task = expect_type(data["task"], where / "task", str)
    if ":" not in task and task not in TASKS:
        raise unknown_name("task", task, TASKS.names(), file=source, key="task")
    arch = expect_mapping(data["arch"], where / "arch")
    if "family" not in arch:
        raise (where / "arch" / "family").error("missing required key", no_value=True,
                                                 fix=f"add 'family:' with one of {', '.join(ARCHS.names())}")
    family = ARCHS.get(arch["family"], file=source, key="arch.family")
    earlier: dict = {}  # parameter name -> domain, in sampling order
    params = _section_params(arch, where / "arch", "arch", family.params_cls, earlier, skip=("family",))
    train = expect_mapping(data.get("train") or {}, where / "train")
    train = {"epochs": TrainSettings.epochs, **train} if "epochs" not in train else train
    params += _section_params(train, where / "train", "train", TrainSettings, earlier)
    epochs = next(p for p in params if p.name == "train.epochs")
    if not isinstance(epochs.domain, Fixed) or epochs.conditions:
        raise (where / "train" / "epochs").error(
            "epochs is the ASHA time budget and must be one fixed integer", data["train"]["epochs"],
            "write e.g. 'epochs: 10'; search fine-tuning length with pruning.finetune_epochs")
    params += _compression_params(expect_mapping(data.get("compression") or {}, where / "compression"),
                                  where / "compression", earlier)
    return SearchSpace(
        task=task, family=family.name, params=tuple(params),
        objectives=_objectives(data["objectives"], where / "objectives"),
        constraints=_constraints(data.get("constraints"), where / "constraints"),
        budget=parse_config(Budget, data.get("budget"), where / "budget"),
        deploy=parse_config(DeploySettings, data.get("deploy"), where / "deploy"),
        source=source, raw=data,
    )


def load_space(path) -> SearchSpace:
    return parse_space(load_yaml(path), str(path))


def default_space_path() -> Path:
    return Path(__file__).parent / "builtin" / "digits_cnn.yaml"


def load_default_space() -> SearchSpace:
    source = "embedded:digits_cnn.yaml"
    return parse_space(parse_yaml(default_space_path().read_text(), source), source)


__all__ = ["Param", "SearchSpace", "parse_space", "load_space", "load_default_space", "did_you_mean"]
