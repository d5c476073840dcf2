"""Error hierarchy. Every error a user can cause says the rule, the value received and the fix.

The CLI maps ``exit_code`` to the process exit status and prints ``str(error)`` without a traceback.
"""
from __future__ import annotations

import reprlib

_UNSET = object()


class AutoMLError(Exception):
    """Base of every error automl raises on purpose."""

    exit_code = 1


VALUE_LIMIT, MESSAGE_LIMIT = 300, 2000
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 8, 10, 10, 10
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = VALUE_LIMIT


def shown(value) -> str:
    """``repr(value)`` bounded in work and length: a value built from YAML aliases or a 1 MB string
    must not make a message of millions of characters."""
    text = _REPR.repr(value)
    return text if len(text) <= VALUE_LIMIT else text[:VALUE_LIMIT] + "..."


class ConfigError(AutoMLError):
    """A configuration (space, recipe, profile, CLI option) is malformed.

    Formats one paragraph: ``<file>: <key>: <message> (got <value>). Fix: <fix>``.
    """

    exit_code = 2

    def __init__(self, message: str, *, file=None, key=None, value=_UNSET, fix=None):
        self.file = None if file is None else str(file)
        self.key = key
        self.value = value
        self.fix = fix
        self.message = message
        parts = []
        where = ": ".join(str(p) for p in (self.file, key) if p)
        if where:
            parts.append(f"{where}: ")
        parts.append(message if len(message) <= MESSAGE_LIMIT else message[:MESSAGE_LIMIT] + " ...")
        if value is not _UNSET:
            parts.append(f" (got {shown(value)})")
        parts.append(".")
        if fix:
            parts.append(f" Fix: {fix}")
        super().__init__("".join(parts))

    def __reduce__(self):
        # rebuild from the parts, not the formatted text (which would be formatted again: Ray pickles errors)
        kwargs = {"file": self.file, "key": self.key, "fix": self.fix}
        if self.value is not _UNSET:
            kwargs["value"] = self.value
        return _rebuild, (type(self), self.message, kwargs)


def _rebuild(cls, message, kwargs):
    return cls(message, **kwargs)


def with_file(exc: ConfigError, file) -> ConfigError:
    """``exc`` naming ``file`` when it names none (an error found while a recipe runs, e.g. a layer
    name or a teacher, comes from code that does not know which file it was given)."""
    if exc.file is not None:
        return exc
    kwargs = {"file": file, "key": exc.key, "fix": exc.fix}
    if exc.value is not _UNSET:
        kwargs["value"] = exc.value
    return type(exc)(exc.message, **kwargs)


class UnknownNameError(ConfigError):
    """A name (method, architecture, task, layer, metric ...) is not registered or not present."""


class ProfileError(ConfigError):
    """A hardware profile is malformed or lacks an entry the space needs."""


class LifecycleError(AutoMLError):
    """A compression handler was called out of order (prepare -> train steps -> finalize)."""


class MeasurementError(AutoMLError):
    """A measurement (latency, accuracy) failed or produced a non-finite value."""


class RunDirError(AutoMLError):
    """A run directory exists (and --force was not given) or cannot be resumed."""

    exit_code = 2
