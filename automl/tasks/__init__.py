"""Tasks: built-in ones by name, user ones as ``package.module:function``."""
from __future__ import annotations

import importlib

from automl.errors import ConfigError
from automl.imports import check_module
from automl.registry import Registry
from automl.tasks.base import TASK_METHODS, DatasetTask, Task, TensorClassificationTask
from automl.tasks.digits import Digits32Task, DigitsTask

TASKS: Registry = Registry("task")
TASKS.register("digits")(DigitsTask)
TASKS.register("digits32")(Digits32Task)


def get_task(name: str, *, file=None, key="task") -> Task:
    """Build a task: a registered name, or ``package.module:function`` returning a Task."""
    if not isinstance(name, str) or not name:
        raise ConfigError("expected a task name", file=file, key=key, value=name,
                          fix=f"use one of {', '.join(TASKS.names())} or 'package.module:function'")
    if ":" not in name:
        return TASKS.get(name, file=file, key=key)()
    module_name, _, attr = name.partition(":")
    check_module(module_name, file=file, key=key, value=name, what="task factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, but also a SyntaxError or any error raised at import
        raise ConfigError(f"cannot import task module '{module_name}': {exc}", file=file, key=key,
                          value=name, fix="make the module importable (installed or on PYTHONPATH)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"module '{module_name}' has no callable '{attr}'", file=file, key=key,
                          value=name, fix="name a function that returns a Task") from None
    try:
        task = factory()
    except Exception as exc:
        raise ConfigError(f"task factory '{name}' raised {type(exc).__name__}: {exc}", file=file, key=key,
                          value=name, fix="fix the factory so that it returns a Task") from exc
    missing = [m for m in TASK_METHODS if not callable(getattr(task, m, None))]
    missing += [a for a in ("name", "input_shape", "num_classes") if not hasattr(task, a)]
    if missing:
        raise ConfigError(f"'{name}' returned an object that is not a Task; it lacks {', '.join(missing)}",
                          file=file, key=key, value=type(task).__name__,
                          fix="subclass automl.tasks.TensorClassificationTask or implement the Task protocol")
    return task


LOADERS_TASK = "loaders"  # the task of a search run on DataLoaders given to the Python API


def build_task(name: str | None, data=None, *, file=None) -> Task:
    """The task of a space or recipe: its ``data:`` section when it has one, else the named task."""
    if name == LOADERS_TASK and data is None:
        raise ConfigError("this was searched on DataLoaders given to the Python API, which a file cannot rebuild",
                          file=file, key="task", value=name,
                          fix="pass task=automl.tasks.data.LoaderTask(train_loader, val_loader) (automl.apply_recipe "
                              "and run_search take task=), or replace task: with a 'data:' section")
    if data is not None:
        from automl.tasks.data import data_task

        return data_task(data)
    return get_task(name, file=file)


__all__ = ["TASKS", "Task", "DatasetTask", "TensorClassificationTask", "DigitsTask", "Digits32Task", "LOADERS_TASK",
           "build_task", "get_task"]
