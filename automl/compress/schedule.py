"""Distiller-style compression scheduler: policies (regularizers, LR changes, later pruners) on epoch windows.

A policy runs on epoch ``e`` when ``start <= e < end`` (end exclusive; ``None`` = until training ends)
and ``(e - start) % frequency == 0``. In such an epoch every event fires: on_epoch_begin, then per step
on_minibatch_begin, penalty (added to the loss before backward) and on_minibatch_end, then on_epoch_end.
A policy with ``every_step_after_start`` also gets on_minibatch_end in every step once ``e >= start``
(how a pruner keeps its masks applied after its window closes).

Training loop order (see ``CompressionScheduler``)::

    for epoch: sched.on_epoch_begin(epoch)
        for step: sched.on_minibatch_begin(epoch, step); loss = sched.before_backward(epoch, step, loss)
                  loss.backward(); optimizer.step(); sched.on_minibatch_end(epoch, step)
        sched.on_epoch_end(epoch)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional

import torch

from automl.compress.regularization.penalties import Regularizer, RegularizerConfig
from automl.configs import config_to_dict, field_names, option, parse_config
from automl.registry import Registry
from automl.validate import Where, expect_choice, expect_keys, expect_mapping, expect_range, expect_type

TIMING = ("start_epoch", "end_epoch", "frequency")


class Policy:
    """The protocol the scheduler calls, with no-op defaults. Policies are bound to their model or
    optimizer when built, so the hooks take no model. A pruner exposing ``on_epoch_begin(epoch)`` and
    ``on_minibatch_end()`` fits as is (duck typing; subclassing is optional)."""

    every_step_after_start: ClassVar[bool] = False

    def on_epoch_begin(self, epoch: int) -> None:
        pass

    def on_minibatch_begin(self) -> None:
        pass

    def penalty(self) -> Optional[torch.Tensor]:
        return None

    def on_minibatch_end(self) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass


@dataclass
class Scheduled:
    policy: Any
    start_epoch: int = 0
    end_epoch: Optional[int] = None
    frequency: int = 1

    def active(self, epoch: int) -> bool:
        in_window = self.start_epoch <= epoch and (self.end_epoch is None or epoch < self.end_epoch)
        return in_window and (epoch - self.start_epoch) % self.frequency == 0


def _call(policy, hook: str, *args):
    fn = getattr(policy, hook, None)  # duck-typed policies may implement only some hooks
    return fn(*args) if fn is not None else None


class CompressionScheduler:
    """Calls each policy's hooks in the epochs its window names, in the order policies were added."""

    def __init__(self, entries=()):
        self.entries: List[Scheduled] = list(entries)

    def add(self, policy, *, start_epoch: int = 0, end_epoch: Optional[int] = None, frequency: int = 1):
        if start_epoch < 0 or frequency < 1 or (end_epoch is not None and end_epoch <= start_epoch):
            raise ValueError(f"bad window start={start_epoch} end={end_epoch} frequency={frequency}")
        self.entries.append(Scheduled(policy, start_epoch, end_epoch, frequency))
        return policy

    def active(self, epoch: int) -> list:
        return [e.policy for e in self.entries if e.active(epoch)]

    def on_epoch_begin(self, epoch: int):
        for p in self.active(epoch):
            _call(p, "on_epoch_begin", epoch)

    def on_minibatch_begin(self, epoch: int, step: int):
        for p in self.active(epoch):
            _call(p, "on_minibatch_begin")

    def before_backward(self, epoch: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus the penalties of the policies active in ``epoch``."""
        for p in self.active(epoch):
            extra = _call(p, "penalty")
            if extra is not None:
                loss = loss + extra
        return loss

    def on_minibatch_end(self, epoch: int, step: int):
        for e in self.entries:
            sticky = getattr(e.policy, "every_step_after_start", False) and epoch >= e.start_epoch
            if sticky or e.active(epoch):
                _call(e.policy, "on_minibatch_end")

    def on_epoch_end(self, epoch: int):
        for p in self.active(epoch):
            _call(p, "on_epoch_end", epoch)


# learning rate -------------------------------------------------------------------------------------------
def step_decay(lr0: float, epoch: int, start: int, gamma: float, step: int) -> float:
    """``lr0 * gamma ** floor((epoch - start) / step)``."""
    return lr0 * gamma ** ((epoch - start) // step)


def cosine_decay(lr0: float, epoch: int, start: int, end: int, min_lr: float = 0.0) -> float:
    """Cosine from ``lr0`` at ``start`` towards ``min_lr`` at ``end`` (exclusive), as CosineAnnealingLR."""
    t = (epoch - start) / (end - start)
    return min_lr + (lr0 - min_lr) * (1.0 + math.cos(math.pi * t)) / 2.0


@dataclass(frozen=True)
class LRConfig:
    kind: str = option("step", choices=("step", "cosine"))
    gamma: float = option(0.1, low=0.0, high=1.0, low_open=True, doc="step only: factor per decay")
    step: int = option(1, low=1, high=10_000, doc="step only: epochs between decays")
    min_lr: float = option(0.0, low=0.0, high=10.0, doc="cosine only: learning rate reached at end_epoch")

    UNUSED: ClassVar[dict] = {"step": ("min_lr",), "cosine": ("gamma", "step")}


class LRPolicy(Policy):
    """Sets every param group's lr at epoch begin; ``lr0`` is the group's lr when the policy is built."""

    def __init__(self, optimizer, config: LRConfig, *, start_epoch: int, end_epoch: Optional[int]):
        if config.kind == "cosine" and end_epoch is None:
            raise ValueError("a cosine lr policy needs an end epoch (build_scheduler uses the training epochs)")
        self.optimizer, self.config = optimizer, config
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.base = [g["lr"] for g in optimizer.param_groups]

    def lr_at(self, epoch: int, lr0: float) -> float:
        c = self.config
        if c.kind == "step":
            return step_decay(lr0, epoch, self.start_epoch, c.gamma, c.step)
        return cosine_decay(lr0, epoch, self.start_epoch, self.end_epoch, c.min_lr)

    def on_epoch_begin(self, epoch: int) -> None:
        for group, lr0 in zip(self.optimizer.param_groups, self.base):
            group["lr"] = self.lr_at(epoch, lr0)


class RegularizationPolicy(Policy):
    """Adds the regularizer's penalty in every step of its active epochs; keeps the last report."""

    def __init__(self, regularizer: Regularizer, model):
        self.regularizer, self.model = regularizer, model
        self.last_report: Dict[str, Dict[str, float]] = {}

    def penalty(self) -> torch.Tensor:
        return self.regularizer.penalty(self.model)

    def on_epoch_end(self, epoch: int) -> None:
        self.last_report = self.regularizer.report(self.model)


# YAML form ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyKind:
    config_cls: type
    build: Callable[..., Any]  # (config, *, model, optimizer, start_epoch, end_epoch, where) -> policy


def _build_regularization(config, *, model, optimizer, start_epoch, end_epoch, where):
    reg = Regularizer(config)
    reg.select(model, where / "layers")  # fail now, naming the recipe key, not in the first step
    return RegularizationPolicy(reg, model)


def _build_lr(config, *, model, optimizer, start_epoch, end_epoch, where):
    return LRPolicy(optimizer, config, start_epoch=start_epoch, end_epoch=end_epoch)


# ``policy:`` name -> config class + builder; pruners register here later (register_policy).
POLICIES: Registry[PolicyKind] = Registry("schedule policy")


def register_policy(name: str, config_cls: type, build: Callable[..., Any]):
    POLICIES.register(name)(PolicyKind(config_cls, build))


register_policy("regularization", RegularizerConfig, _build_regularization)
register_policy("lr", LRConfig, _build_lr)


@dataclass(frozen=True)
class PolicySpec:
    policy: str
    config: Any
    start_epoch: int = 0
    end_epoch: Optional[int] = None
    frequency: int = 1


def _unused(config) -> tuple:
    return getattr(type(config), "UNUSED", {}).get(getattr(config, "kind", None), ())


def _epoch(value, where: Where, low: int) -> int:
    return expect_range(expect_type(value, where, int), where, low)


def parse_policy(raw, at: Where) -> PolicySpec:
    """One entry of a ``schedule:`` list (``at`` is its position)."""
    raw = expect_mapping(raw, at)
    names = POLICIES.names()
    if "policy" not in raw:
        raise (at / "policy").error("missing required key", no_value=True,
                                    fix=f"add 'policy:' with one of: {', '.join(names)}")
    name = expect_choice(expect_type(raw["policy"], at / "policy", str), at / "policy", names)
    cls = POLICIES.get(name).config_cls
    expect_keys(raw, at, ("policy",) + TIMING + tuple(field_names(cls)))
    body = {k: v for k, v in raw.items() if k != "policy" and k not in TIMING}
    config = parse_config(cls, body, at)
    for key in _unused(config):
        if key in body:
            raise (at / key).error(f"not used by kind '{config.kind}'", body[key], f"remove '{key}'")
    start = _epoch(raw.get("start_epoch", 0), at / "start_epoch", 0)
    end = raw.get("end_epoch")
    if end is not None:
        end = _epoch(end, at / "end_epoch", 1)
        if start >= end:
            raise (at / "end_epoch").error(
                f"end_epoch must be greater than start_epoch ({start}); the end is exclusive", end,
                f"use end_epoch > {start}, or leave end_epoch out to run until training ends")
    frequency = _epoch(raw.get("frequency", 1), at / "frequency", 1)
    return PolicySpec(name, config, start, end, frequency)


def without_unused(entry: dict) -> dict:
    """A raw schedule entry less the options its ``kind`` does not use (a searched kind samples them all)."""
    kind = entry.get("kind")
    cls = POLICIES.get(entry["policy"]).config_cls if entry.get("policy") in POLICIES.names() else None
    if cls is None or "kind" not in field_names(cls):
        return dict(entry)
    unused = getattr(cls, "UNUSED", {}).get(kind if kind is not None else cls().kind, ())
    return {k: v for k, v in entry.items() if k not in unused}


def _overlaps(a: PolicySpec, b: PolicySpec) -> bool:
    inf = math.inf
    return a.start_epoch < (b.end_epoch or inf) and b.start_epoch < (a.end_epoch or inf)


def parse_schedule(data, where: Where) -> List[PolicySpec]:
    """The ``schedule:`` list of a recipe; ``where`` is the position of that list (file, 'schedule')."""
    if data is None:
        return []
    specs = [parse_policy(raw, where / i) for i, raw in enumerate(expect_type(data, where, list))]
    lrs = [(i, s) for i, s in enumerate(specs) if s.policy == "lr"]
    for n, (i, a) in enumerate(lrs):
        for j, b in lrs[n + 1:]:
            if _overlaps(a, b):  # two policies setting the lr in one epoch: the result would be order-dependent
                raise (where / j / "start_epoch").error(
                    f"lr policy overlaps the lr policy at {(where / i).key} "
                    f"(epochs {a.start_epoch}..{a.end_epoch if a.end_epoch is not None else 'end'})",
                    b.start_epoch, "give lr policies disjoint epoch windows (end_epoch is exclusive)")
    return specs


def schedule_to_dict(specs) -> List[dict]:
    """The YAML form ``parse_schedule`` reads back to equal specs."""
    out = []
    for s in specs:
        body = {k: v for k, v in config_to_dict(s.config).items() if k not in _unused(s.config)}
        out.append({"policy": s.policy, **body, "start_epoch": s.start_epoch, "end_epoch": s.end_epoch,
                    "frequency": s.frequency})
    return out


def check_schedule_epochs(specs, epochs: int, where: Where):
    """Every policy must fire within ``epochs`` training epochs (call with the recipe's train.epochs)."""
    for i, s in enumerate(specs):
        if s.start_epoch >= epochs:
            raise (where / i / "start_epoch").error(f"starts after training ends ({epochs} epochs)", s.start_epoch,
                                                    f"use start_epoch < {epochs} or raise train.epochs")
        if s.end_epoch is not None and s.end_epoch > epochs:
            raise (where / i / "end_epoch").error(f"ends after training ends ({epochs} epochs)", s.end_epoch,
                                                  f"use end_epoch <= {epochs}, or leave it out")


def build_scheduler(specs, model, optimizer, *, epochs: int, where: Where = Where()) -> CompressionScheduler:
    """Bind parsed specs to a model and optimizer. An open end means ``epochs`` where a policy needs one
    (cosine lr); the scheduler window itself stays open."""
    sched = CompressionScheduler()
    for i, s in enumerate(specs):
        policy = POLICIES.get(s.policy).build(s.config, model=model, optimizer=optimizer, start_epoch=s.start_epoch,
                                          end_epoch=s.end_epoch if s.end_epoch is not None else epochs,
                                          where=where / i)
        sched.add(policy, start_epoch=s.start_epoch, end_epoch=s.end_epoch, frequency=s.frequency)
    return sched
