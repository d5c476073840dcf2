"""Helpers that check parsed config values and raise ConfigErrors naming file and key path."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from automl.errors import ConfigError
from automl.registry import did_you_mean

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a mapping"}
_TYPE_FIXES = {bool: "write true or false", int: "write a whole number without quotes, e.g. 3",
               float: "write a number without quotes, e.g. 0.5 or 1e-3",
               str: "write a string (quote it if it looks like a number)", list: "write a list, e.g. [a, b]",
               dict: "write 'key: value' entries"}


@dataclass(frozen=True)
class Where:
    """A position in a config: the file and the dotted key path."""

    file: str | None = None
    key: str = ""

    def __truediv__(self, child) -> "Where":
        child = str(child)
        return Where(self.file, f"{self.key}.{child}" if self.key else child)

    def error(self, message: str, value: Any = None, fix: str | None = None, *, no_value=False):
        kwargs = {} if no_value else {"value": value}
        return ConfigError(message, file=self.file, key=self.key or None, fix=fix, **kwargs)


def expect_mapping(value: Any, where: Where) -> dict:
    if not isinstance(value, dict):
        raise where.error("expected a mapping", value, "write 'key: value' entries under this key")
    return value


def expect_keys(mapping: Mapping, where: Where, allowed: Iterable[str], required: Iterable[str] = ()):
    """Unknown keys get a did-you-mean; missing required keys are named."""
    allowed = list(allowed)
    for key in mapping:
        if key not in allowed:
            raise (where / key).error(
                "unknown key", key, f"{did_you_mean(str(key), allowed)}allowed keys: {', '.join(allowed)}"
            )
    for key in required:
        if key not in mapping:
            raise (where / key).error("missing required key", no_value=True,
                                      fix=f"add '{key}:' under '{where.key or 'the top level'}'")


def expect_type(value: Any, where: Where, kind: type, fix: str | None = None):
    """Type check; an int passes for a float, a bool never passes for a number."""
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise where.error(f"expected {_TYPE_NAMES.get(kind, kind.__name__)}", value, fix or _TYPE_FIXES.get(kind))
    return float(value) if kind is float else value


def expect_range(value, where: Where, low=None, high=None, *, low_open=False, high_open=False):
    """Number within [low, high] (open ends when asked); NaN and inf are always rejected."""
    if isinstance(value, float) and not math.isfinite(value):
        raise where.error("expected a finite number", value, "write a finite number (not nan or inf)")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        span = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise where.error(f"out of range {span}", value, f"use a value in {span}")
    return value


def expect_choice(value, where: Where, options: Iterable):
    options = list(options)
    if value not in options:
        names = ", ".join(map(str, options))
        raise where.error("not one of the allowed values", value,
                          f"{did_you_mean(str(value), map(str, options))}use one of: {names}")
    return value
