"""Frozen, validated config dataclasses: one declaration gives parsing, range checks and dumping.

A field declares its bounds with ``option(default, low=..., high=..., choices=...)``; the same
checks serve recipes (a value) and search spaces (the bounds of a domain).
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import field
from typing import Any, Mapping

from automl.validate import Where, expect_choice, expect_keys, expect_mapping, expect_range, expect_type


def option(default, *, low=None, high=None, low_open=False, high_open=False, choices=None, doc=""):
    """A config field with its validation rule kept in metadata."""
    meta = dict(low=low, high=high, low_open=low_open, high_open=high_open, choices=choices, doc=doc)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@functools.lru_cache(maxsize=None)  # a config class's fields never change; hints cost 0.2 ms a call
def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def field_names(cls) -> list:
    return [f.name for f in dataclasses.fields(cls)]


def check_field(cls, name: str, value: Any, where: Where) -> Any:
    """Validate one value for field ``name`` of ``cls``; return it normalised."""
    fields = _field_types(cls)
    if name not in fields:
        expect_keys({name: value}, Where(where.file, where.key.rpartition(".")[0]), fields)
    fld, hint = fields[name]
    meta = fld.metadata
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        expect_type(value, where, list, "write a list, e.g. ['re:conv.*']")
        for i, item in enumerate(value):
            expect_type(item, where / i, str)
        return tuple(value)
    if origin is dict:  # {name: number}, e.g. per-layer ratios; values obey the field's range
        value = dict(expect_mapping(value, where))
        for key, item in value.items():
            expect_type(key, where, str)
            if meta.get("choices") is not None:  # the keys a mapping may hold
                expect_keys({key: item}, where, meta["choices"])
            value[key] = item = expect_type(item, where / key, float)
            if meta.get("low") is not None or meta.get("high") is not None:
                expect_range(item, where / key, meta["low"], meta["high"],
                             low_open=meta["low_open"], high_open=meta["high_open"])
        return value
    if hint in (bool, int, float, str):
        value = expect_type(value, where, hint)
    if meta.get("choices") is not None:
        expect_choice(value, where, meta["choices"])
    if hint in (int, float) and (meta.get("low") is not None or meta.get("high") is not None):
        expect_range(value, where, meta["low"], meta["high"],
                     low_open=meta["low_open"], high_open=meta["high_open"])
    return value


def parse_config(cls, data: Mapping | None, where: Where):
    """Build a ``cls`` instance from a mapping, rejecting unknown keys and bad values."""
    data = {} if data is None else expect_mapping(data, where)
    expect_keys(data, where, field_names(cls))
    values = {k: check_field(cls, k, v, where / k) for k, v in data.items()}
    return cls(**values)


def config_to_dict(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value
    return out
