"""The search-space file: architecture, training and compression parameters, objectives, budget.

Flat parameter names are ``arch.<p>``, ``train.<p>``, ``<category>.<p>`` (e.g. ``pruning.ratio``) and
``schedule.<i>.<p>`` (see automl.spaces.schedule);
``when:`` conditions refer to them. Parameters are sampled in file order, ``method`` first in each
compression category, so a condition may only name a parameter defined before it.

A mapping option of a compression method (e.g. ``quantization.layer_bits``, layer -> bits) is either
one fixed mapping (``{fixed: {...}}``) or written entry by entry, each value a domain or a plain
value: ``layer_bits: {features.0: {int: [2, 8]}, head: 8}`` gives one parameter per entry,
``quantization.layer_bits.features.0`` and ``quantization.layer_bits.head``. A ``when:`` key in such a
mapping applies to every entry (and adds to an entry's own ``when``). ``recipe_from_config`` puts the
entries back into one mapping.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from automl.arch import ARCHS
from automl.arch.inherited import SupernetSource
from automl.arch.user import ModelSource
from automl.compress import CATEGORIES, get_method, methods_in
from automl.compress.base import incompatibility
from automl.configs import check_field, field_names, parse_config
from automl.io import load_yaml, parse_yaml
from automl.registry import did_you_mean, unknown_name
from automl.settings import BASELINE_METRICS, METRICS, Budget, DeploySettings, TrainSettings
from automl.spaces.conditions import Condition, parse_when
from automl.spaces.schedule import schedule_params
from automl.spaces.domains import DOMAIN_KEYS, Choice, Domain, Fixed, FloatRange, IntRange, parse_domain
from automl.tasks import LOADERS_TASK, TASKS
from automl.tasks.data import DataSpec
from automl.validate import Where, expect_choice, expect_keys, expect_mapping, expect_range, expect_type

TOP_KEYS = ("version", "task", "data", "arch", "model", "supernet", "train", "compression", "schedule", "objectives",
            "constraints", "budget", "deploy")
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
    model: Optional[ModelSource] = None  # a user's model: the search compresses it (no architecture params)
    data: Optional[DataSpec] = None      # the task's data, when it is a data folder or arrays
    supernet: Optional[SupernetSource] = None  # trials start from this supernet's weights

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

    def build_task(self):
        """The task trials train and evaluate on (the ``data:`` section's, or the named task)."""
        from automl.tasks import build_task

        return build_task(self.task, self.data, file=self.source)


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


def _possible(owners: list, conditions, category: str) -> list:
    """The owners of an option its `when` leaves possible (all of them when none is)."""
    possible = [m for m in owners if all(c.holds({c.param: m.name}) for c in conditions
                                         if c.param == f"{category}.method")]
    return possible or owners


def is_mapping_option(cls, name: str) -> bool:
    """Whether field ``name`` of config class ``cls`` is a Dict (e.g. layer -> bits)."""
    hints = typing.get_type_hints(cls)
    return name in hints and typing.get_origin(hints[name]) is dict


def is_entry_mapping(owners: list, key: str, raw) -> bool:
    """A mapping option written entry by entry: a mapping that is not itself a domain."""
    return (isinstance(raw, dict) and any(is_mapping_option(m.config_cls, key) for m in owners)
            and not any(k in raw for k in DOMAIN_KEYS if k != "when"))


def check_entry(cls, name: str, domain: Domain, where: Where):
    """Every value ``domain`` can produce must be a valid value of one entry of mapping option ``name``."""
    if not is_mapping_option(cls, name):
        raise where.error(f"option '{name}' of this method is not a mapping", name, "write one value or domain")
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    if isinstance(domain, Choice):
        values = [(where / "choice" / i, v) for i, v in enumerate(domain.values)]
    elif isinstance(domain, (IntRange, FloatRange)):
        kind = "int" if isinstance(domain, IntRange) else "float"
        values = [(where / kind, domain.low), (where / kind, domain.high)]
    else:
        values = [(where, domain.value)]
    for at, v in values:
        v = expect_type(v, at, float)
        if meta.get("low") is not None or meta.get("high") is not None:
            expect_range(v, at, meta["low"], meta["high"], low_open=meta["low_open"], high_open=meta["high_open"])


def _entry_key(pattern, where: Where) -> str:
    expect_type(pattern, where, str, "write the layer name or 're:' pattern as a string")
    if not pattern or "/" in pattern:  # Ray Tune splits parameter names at '/'
        raise where.error("a searched layer name or pattern must be non-empty and free of '/'", pattern,
                          "write '/' in a regex as \\x2f")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise where.error(f"invalid regular expression: {exc}", pattern, "fix the regex after 're:'") from None
    return pattern


def _entry_params(category: str, key: str, raw: dict, where: Where, owners: list, earlier: dict) -> list:
    """One parameter ``<category>.<key>.<entry>`` per entry of a mapping option (see the module doc)."""
    shared = raw.get("when")
    entries = {k: v for k, v in raw.items() if k != "when"}
    if not entries:
        raise where.error("the mapping has no entries", raw, "name at least one layer, or drop the option")
    shared_conditions = parse_when(shared, where / "when", earlier)
    out = []
    for pattern, value in entries.items():
        at = where / _entry_key(pattern, where / str(pattern))
        domain, when = parse_domain(value, at)
        conditions = shared_conditions + parse_when(when, at / "when", earlier)
        for m in _possible(owners, conditions, category):
            check_entry(m.config_cls, key, domain, at)
        name = f"{category}.{key}.{pattern}"
        out.append(Param(name, domain, conditions))
        earlier[name] = domain
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
            if is_entry_mapping(owners, key, raw):
                out += _entry_params(category, key, raw, at / key, owners, earlier)
                continue
            domain_k, when_k = parse_domain(raw, at / key)
            conditions = parse_when(when_k, at / key / "when", earlier)
            # an option shared by several methods (e.g. criterion) is checked against the methods its
            # `when` leaves possible, so each method's own choices apply
            for m in _possible(owners, conditions, category):
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


def _method_values(param: Param) -> list:
    return list(param.domain.values) if isinstance(param.domain, Choice) else [param.domain.value]


def _check_combinations(params, where: Where):
    """Refuse a space in which two stages that cannot be combined (``incompatibility``) can both be chosen.

    Only the two method parameters' own ``when`` conditions on each other are considered: a space
    makes such a pair exclusive with e.g. ``when: {early_exit.method: none}`` on one of them."""
    methods = [p for p in params if p.name.endswith(".method")]
    for i, pa in enumerate(methods):
        for pb in methods[i + 1:]:
            for va, vb in itertools.product(_method_values(pa), _method_values(pb)):
                why = None if "none" in (va, vb) else incompatibility(va, vb)
                values = {pa.name: va, pb.name: vb}
                own = [c for c in pa.conditions + pb.conditions if c.param in values]
                if why and all(c.holds(values) for c in own):
                    a, b = pa.name.partition(".")[0], pb.name.partition(".")[0]
                    raise (where / b / "method").error(
                        f"{a} and {b} stages cannot be combined ({why}), but this space can choose both", values,
                        f"make them exclusive, e.g. add 'when: {{{a}.method: none}}' to {b}.method, or drop one")


def parse_space(data: Any, source: str | None = None) -> SearchSpace:
    from automl.sections import model_section, supernet_section, task_section

    where = Where(source)
    data = expect_mapping(data, where)
    expect_keys(data, where, TOP_KEYS, required=("version", "objectives"))
    if isinstance(data["version"], bool) or data["version"] not in SUPPORTED_VERSIONS:
        raise (where / "version").error("unsupported space version", data["version"], "use version: 1")
    task, data_spec = task_section(data, where)
    if data_spec is None and ":" not in task and task not in TASKS and task != LOADERS_TASK:
        raise unknown_name("task", task, TASKS.names(), file=source, key="task")
    family, _, model = model_section(data, where)
    supernet = supernet_section(data, where, model)
    earlier: dict = {}  # parameter name -> domain, in sampling order
    params = []
    if model is None:
        arch = expect_mapping(data["arch"], where / "arch")
        params = _section_params(arch, where / "arch", "arch", ARCHS.get(family).params_cls, earlier,
                                 skip=("family",))
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
    _check_combinations(params, where / "compression")
    params += [Param(*p) for p in schedule_params(data.get("schedule"), where / "schedule", earlier,
                                                  epochs.domain.value)]
    objectives = _objectives(data["objectives"], where / "objectives")
    constraints = _constraints(data.get("constraints"), where / "constraints")
    _check_baseline_metrics(model, objectives, constraints, where)
    budget = parse_config(Budget, data.get("budget"), where / "budget")
    _check_strategy(budget, data.get("budget") or {}, model, where / "budget")
    # files the space names are kept as resolved paths (with the checkpoint's sha256), so the copy a
    # run directory keeps resumes from anywhere and its hash changes with the weights
    raw = {**data, **({"model": model.to_dict()} if model is not None else {}),
           **({"data": data_spec.to_dict()} if data_spec is not None else {}),
           **({"supernet": supernet.to_dict()} if supernet is not None else {})}
    return SearchSpace(
        task=task, family=family, params=tuple(params), objectives=objectives, constraints=constraints,
        budget=budget,
        deploy=parse_config(DeploySettings, data.get("deploy"), where / "deploy"),
        source=source, raw=raw, model=model, data=data_spec, supernet=supernet,
    )


def _check_strategy(budget: Budget, raw: dict, model, where: Where):
    if budget.strategy == "random" and raw.get("sampler", "random") != "random":
        raise (where / "sampler").error("strategy random samples uniformly, so it takes no other sampler",
                                        raw["sampler"], "drop 'sampler', or use strategy: joint with this sampler")
    if budget.strategy == "sequential" and model is not None:
        raise (where / "strategy").error("sequential searches architectures first, and a search over your own "
                                         "model has no architecture parameters", "sequential",
                                         "use strategy: joint (it searches the compression of your model)")
    if budget.strategy == "sequential" and budget.trials < 2:
        raise (where / "trials").error("sequential runs two phases, each with at least one trial", budget.trials,
                                       "set budget.trials to 2 or more")


def _check_baseline_metrics(model, objectives, constraints, where: Where):
    """Metrics relative to the uncompressed model exist only where there is one: a user's model."""
    for section, metrics in (("objectives", objectives), ("constraints", constraints)):
        for metric in metrics:
            if metric in BASELINE_METRICS and model is None:
                raise (where / section / metric).error(
                    f"'{metric}' compares each trial with the uncompressed model, which only a search over your "
                    "own model has", metric, "add 'model: {builder: ..., checkpoint: ...}', or use accuracy "
                    "(e.g. constraints: {accuracy: {min: 0.95}})")


def load_space(path) -> SearchSpace:
    return parse_space(load_yaml(path), str(path))


def default_space_path() -> Path:
    return Path(__file__).parent / "builtin" / "digits_cnn.yaml"


def load_default_space() -> SearchSpace:
    source = "embedded:digits_cnn.yaml"
    return parse_space(parse_yaml(default_space_path().read_text(), source), source)


__all__ = ["Param", "SearchSpace", "parse_space", "load_space", "load_default_space", "did_you_mean"]
