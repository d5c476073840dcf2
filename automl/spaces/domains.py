"""Search domains: choice, int, float (optionally log), fixed; each parsed strictly."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Tuple

from automl.validate import Where, expect_keys, expect_type

SCALARS = (str, int, float, bool, type(None))
DOMAIN_KEYS = ("choice", "int", "float", "fixed", "log", "step", "when")


@dataclass(frozen=True)
class Choice:
    values: Tuple[Any, ...]

    def suggest(self, trial, name):
        return trial.suggest_categorical(name, list(self.values))

    def sample(self, rng):
        return self.values[int(rng.integers(len(self.values)))]

    def examples(self):
        return list(self.values)


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1
    log: bool = False

    def suggest(self, trial, name):
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def sample(self, rng):
        if self.log:
            return int(round(math.exp(rng.uniform(math.log(self.low), math.log(self.high)))))
        return self.low + self.step * int(rng.integers((self.high - self.low) // self.step + 1))

    def examples(self):
        return [self.low, self.high]


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False
    step: float | None = None

    def suggest(self, trial, name):
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def sample(self, rng):
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if self.step:  # the grid low, low + step, ... <= high, as Optuna uses it
            n = int(math.floor((self.high - self.low) / self.step + 1e-9))
            return min(self.low + self.step * int(rng.integers(n + 1)), self.high)
        return float(rng.uniform(self.low, self.high))

    def examples(self):
        return [self.low, self.high]


@dataclass(frozen=True)
class Fixed:
    value: Any

    def suggest(self, trial, name):
        return self.value

    def sample(self, rng):
        return self.value

    def examples(self):
        return [self.value]


Domain = Choice | IntRange | FloatRange | Fixed


def _pair(raw, where: Where, kind: type, kind_name: str):
    if not isinstance(raw, list) or len(raw) != 2:
        raise where.error(f"a {kind_name} range is a two-item list [low, high]", raw,
                          f"write {{{kind_name}: [low, high]}}")
    low, high = (expect_type(v, where, kind) for v in raw)
    for v in (low, high):
        if isinstance(v, float) and not math.isfinite(v):
            raise where.error(f"{kind_name} bounds must be finite", raw, "use finite numbers as bounds")
    return low, high


def parse_domain(raw, where: Where) -> Tuple[Domain, Any]:
    """Return (domain, raw `when` or None). A bare scalar is a fixed value."""
    if not isinstance(raw, dict):
        if isinstance(raw, list):
            raise where.error("a bare list is ambiguous", raw,
                              "write {choice: [...]} to search over the items or {fixed: [...]} for a constant")
        return Fixed(raw), None
    expect_keys(raw, where, DOMAIN_KEYS)
    kinds = [k for k in ("choice", "int", "float", "fixed") if k in raw]
    if len(kinds) != 1:
        raise where.error("a domain needs exactly one of choice / int / float / fixed", sorted(raw),
                          "e.g. {choice: [8, 16]}, {int: [1, 3]}, {float: [1e-4, 1e-1], log: true}")
    kind = kinds[0]
    when = raw.get("when")
    log = expect_type(raw.get("log", False), where / "log", bool)
    if kind in ("choice", "fixed") and ("log" in raw or "step" in raw):
        raise where.error(f"'log' and 'step' apply to int and float ranges, not to {kind}",
                          {k: raw[k] for k in ("log", "step") if k in raw}, "remove them")
    if kind == "fixed":
        return Fixed(raw["fixed"]), when
    if kind == "choice":
        values = raw["choice"]
        if not isinstance(values, list) or not values:
            raise (where / "choice").error("a choice needs a non-empty list", values, "write choice: [a, b]")
        for v in values:
            if not isinstance(v, SCALARS):
                raise (where / "choice").error(
                    "choices must be scalars (string, number, boolean or null); Optuna cannot search "
                    "over lists or mappings", v, "split the structure into several parameters")
        if len({repr(v) for v in values}) != len(values):
            raise (where / "choice").error("choices repeat a value", values, "list each value once")
        return Choice(tuple(values)), when
    number = int if kind == "int" else float
    low, high = _pair(raw[kind], where / kind, number, kind)
    if low > high or (kind == "float" and low == high):
        raise (where / kind).error(f"{kind} range needs low < high", raw[kind],
                                   f"swap the bounds or use {{fixed: {low}}}")
    if log and low <= 0:
        raise (where / kind).error("a log range needs low > 0", raw[kind], "raise the lower bound above 0")
    step = raw.get("step")
    if step is not None:
        step = expect_type(step, where / "step", number)
        if step <= 0:
            raise (where / "step").error("step must be positive", step, "use a step > 0 or drop it")
        if log:
            raise (where / "step").error("Optuna cannot combine step with log", step, "drop one of them")
    if kind == "int":
        return IntRange(low, high, step or 1, log), when
    return FloatRange(float(low), float(high), log, None if step is None else float(step)), when
