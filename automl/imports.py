"""Importing the code a space or recipe names (a task factory, a model builder).

A file someone sent you must not reach arbitrary code already on the machine: names in the standard
library or built into the interpreter (``os:system``, ``tempfile:mkdtemp``, ``this:...``) are refused,
and the module about to be imported is said once per process on stderr, with the file that names it.
"""
from __future__ import annotations

import sys

from automl.errors import ConfigError

_ANNOUNCED = set()
REFUSED_PACKAGES = frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names) | {"builtins"}


EXAMPLES = {"task factory": "mypkg.tasks:make", "model builder": "mypkg.models:build"}


def check_module(module_name: str, *, file=None, key: str, value: str, what: str) -> None:
    """Refuse a standard-library or built-in module for ``what`` (e.g. 'task factory'); announce the import."""
    top = module_name.split(".")[0]
    if top in REFUSED_PACKAGES:
        raise ConfigError(f"the {what} '{value}' is in Python's standard library ('{top}'), which automl does not "
                          "call from a file", file=file, key=key, value=value,
                          fix=f"name a {what} in your own package or file (e.g. {EXAMPLES[what]})")
    if module_name not in _ANNOUNCED:
        _ANNOUNCED.add(module_name)
        origin = f" named in {file}" if file else ""
        print(f"automl: importing {what} module '{module_name}'{origin}", file=sys.stderr, flush=True)
