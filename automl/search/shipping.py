"""The user's own code on Ray's workers: shipped to a cluster, and checked before any trial starts.

A task factory or model builder named as ``mypkg.tasks:make`` is imported on every worker. Code that
is installed (site-packages) must be installed on the cluster's nodes too; code that is not -- a
package or module in the directory you run from -- is shipped with the job (Ray ``runtime_env``
``py_modules``). Then every node imports each module once, so a module a worker cannot import fails
the search within seconds, not every trial.
"""
from __future__ import annotations

import importlib
import socket
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List, Sequence

from automl.errors import AutoMLError

CHECK_TIMEOUT_S = 300.0  # a first runtime_env set-up on a node installs the shipped modules


def search_modules(space, task=None) -> List[str]:
    """The modules a search's workers import for the user: the task factory's, the model builder's, and
    the classes of a task or model object given through the Python API (classes defined in a function
    or in __main__ travel by value and need none)."""
    from automl.arch.user import FILE_MODULE_PREFIX

    names = [space.task.rsplit(":", 1)[0]] if ":" in space.task else []
    objects = [task] + ([space.model.obj] if space.model is not None else [])
    if space.model is not None and space.model.builder:
        names.append(space.model.builder.rsplit(":", 1)[0])
    names += [type(o).__module__ for o in objects if o is not None and "<locals>" not in type(o).__qualname__]
    return [n for n in dict.fromkeys(names) if not n.endswith(".py") and n.split(".")[0] not in
            ("automl", "__main__", "builtins") and not n.startswith(FILE_MODULE_PREFIX)]


def _installed(path: Path) -> bool:
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    return any(part in ("site-packages", "dist-packages") for part in path.parts) or any(
        path.is_relative_to(root) for root in roots)


def user_code_paths(module_names: Sequence[str]) -> List[str]:
    """The directories (packages) and files (single modules) to ship: the top-level package of each
    module that is not installed."""
    paths = []
    for name in module_names:
        top = sys.modules.get(name.split(".")[0])
        if top is None:
            continue
        if getattr(top, "__file__", None):
            path = Path(top.__file__).resolve()
            path = path.parent if path.name == "__init__.py" else path
        elif getattr(top, "__path__", None):  # a namespace package
            path = Path(list(top.__path__)[0]).resolve()
        else:
            continue
        if not _installed(path) and path.name != "automl":
            paths.append(str(path))
    return list(dict.fromkeys(paths))


def _try_imports(names: Sequence[str]) -> Dict:
    errors = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or anything the module raises while it runs
            errors[name] = f"{type(exc).__name__}: {exc}"
    return {"host": socket.gethostname(), "errors": errors}


def check_worker_imports(module_names: Sequence[str]) -> None:
    """Import the user's modules once on every alive node; the first that fails is an AutoMLError."""
    if not module_names:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0)(_try_imports)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
        list(module_names)) for node in nodes]
    try:
        answers = ray.get(refs, timeout=CHECK_TIMEOUT_S)
    except Exception as exc:  # runtime_env set-up failed, a node went away, timeout
        raise AutoMLError(f"could not import the task / model modules {', '.join(module_names)} on the Ray "
                          f"workers: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}. Fix: install "
                          "them on every node, or run automl from the directory that holds them") from None
    for answer in answers:
        for name, error in answer["errors"].items():
            raise AutoMLError(f"a Ray worker on {answer['host']} cannot import '{name}' ({error}), so every trial "
                              f"would fail. automl ships modules that are not installed: {name.split('.')[0]} "
                              "(a package directory or a single .py file); anything it imports must be installed "
                              "on every node or be inside that package. Fix: make the code one package, or "
                              "install it on the cluster's nodes")
