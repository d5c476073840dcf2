"""One small generic registry: register by decorator, look up with close-match hints."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterable, List, TypeVar

from automl.errors import UnknownNameError

T = TypeVar("T")


def closest(word: str, options: Iterable[str]) -> str | None:
    """The closest option to ``word`` (case-insensitive), or None when nothing is close."""
    options = list(options)
    lowered = {o.lower(): o for o in options}
    hits = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hits[0]] if hits else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """A ' Did you mean X?' suffix, or an empty string."""
    hit = closest(word, options)
    return f"did you mean '{hit}'? " if hit else ""


def unknown_name(kind: str, name, options: Iterable[str], *, file=None, key=None) -> UnknownNameError:
    options = sorted(str(o) for o in options)
    return UnknownNameError(
        f"unknown {kind}",
        file=file,
        key=key,
        value=name,
        fix=f"{did_you_mean(str(name), options)}valid names: {', '.join(options)}",
    )


class Registry(Generic[T]):
    """Maps names to objects of one concept (architectures, methods, tasks, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str, *, file=None, key=None) -> T:
        if not isinstance(name, str) or name not in self._items:
            raise unknown_name(self.kind, name, self._items, file=file, key=key)
        return self._items[name]

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name) -> bool:
        return name in self._items

    def items(self):
        return sorted(self._items.items())
