"""Error hierarchy. Every error a user can cause says the rule, the value received and the fix.

The CLI maps ``exit_code`` to the process exit status and prints ``str(error)`` without a traceback.
"""
from __future__ import annotations

_UNSET = object()


class AutoMLError(Exception):
    """Base of every error automl raises on purpose."""

    exit_code = 1


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
        parts.append(message)
        if value is not _UNSET:
            parts.append(f" (got {value!r})")
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
