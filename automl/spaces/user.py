"""The space of a search over a user's own model: a space file (or the embedded default compression
space) with the model, the data and the accuracy budget filled in from the command line or the API."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

from automl.errors import ConfigError
from automl.io import load_yaml, parse_yaml
from automl.spaces.schema import SearchSpace, parse_space

USER_SPACE = "embedded:user_model.yaml"


def user_space_path() -> Path:
    return Path(__file__).parent / "builtin" / "user_model.yaml"


def user_space(*, space=None, builder: Optional[str] = None, checkpoint: Optional[str] = None,
               object_class: Optional[str] = None, data=None, task: Optional[str] = None,
               max_drop: Optional[float] = None, epochs: Optional[int] = None) -> SearchSpace:
    """``space`` (a file; default: the embedded compression space) with these settings replacing its own.

    ``builder`` / ``object_class`` and ``checkpoint`` set ``model:``; ``data`` (a folder or .npz) or
    ``task`` (a task name) set the task; ``max_drop`` adds the constraint accuracy_drop <= max_drop;
    ``epochs`` sets the fine-tune epochs of every trial."""
    source = str(space) if space is not None else USER_SPACE
    raw: Dict[str, Any] = copy.deepcopy(load_yaml(space) if space is not None
                                        else parse_yaml(user_space_path().read_text(), USER_SPACE))
    if not isinstance(raw, dict):
        return parse_space(raw, source)  # reports the malformed file
    if builder or object_class or checkpoint:
        model = dict(raw.get("model") or {})
        model.pop("sha256", None)  # the weights are given anew
        if builder or object_class:
            model.pop("builder", None)
            model.pop("object", None)
        model.update({"builder": builder} if builder else {}, **({"object": object_class} if object_class else {}))
        if checkpoint:
            model["checkpoint"] = str(checkpoint)
        raw["model"] = model
    if data is not None:  # a path (the space's other data settings stay) or a whole data: mapping
        given = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        raw["data"] = dict(data) if isinstance(data, dict) else {**given, "path": str(data)}
        raw.pop("task", None)
    elif task is not None:
        raw["task"] = task
        raw.pop("data", None)
    if space is None and "data" not in raw and "task" not in raw:
        raise ConfigError("the default compression space needs your data", key="--data",
                          fix="pass --data DIR (class folders, or train/ val/ [test/] folders of them) or --data "
                              "arrays.npz, or --task NAME, or --space with a 'data:' section")
    if max_drop is not None:
        if not 0.0 <= max_drop < 1.0:
            raise ConfigError("--max-drop is an accuracy share in [0, 1)", key="--max-drop", value=max_drop,
                              fix="use e.g. 0.01 for one percentage point")
        constraints = raw.get("constraints") if isinstance(raw.get("constraints"), dict) else {}
        raw["constraints"] = {**constraints, "accuracy_drop": {"max": float(max_drop)}}
    if epochs is not None:
        if epochs < 0:
            raise ConfigError("must be at least 0", key="--epochs", value=epochs)
        train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
        raw["train"] = {**train, "epochs": int(epochs)}
    return parse_space(raw, source)


def with_supernet(space: SearchSpace, path, *, epochs: Optional[int] = None) -> SearchSpace:
    """``space`` whose trials start from the supernet at ``path``, training ``epochs`` each (default 0:
    scored as inherited)."""
    raw = copy.deepcopy(space.raw)
    raw["supernet"] = {"path": str(path)}
    raw["train"] = {**(raw.get("train") if isinstance(raw.get("train"), dict) else {}),
                    "epochs": 0 if epochs is None else int(epochs)}
    return parse_space(raw, space.source)


USER_FLAGS = ("model", "checkpoint", "data", "task", "max_drop", "epochs")


def space_from_flags(space, *, model=None, checkpoint=None, data=None, task=None, max_drop=None, epochs=None):
    """``automl search`` with --model / --checkpoint / --data / --task / --max-drop / --epochs."""
    if space is None and model is None:
        raise ConfigError("the embedded default searches built-in architectures on digits; --checkpoint, --data, "
                          "--task, --max-drop and --epochs apply to a model of yours or to a --space",
                          key="--model", fix="add --model package.module:function (a function returning your "
                                             "model), or --space SPACE.yaml")
    return user_space(space=space, builder=model, checkpoint=checkpoint, data=data, task=task, max_drop=max_drop,
                      epochs=epochs)


def fit_to_model(space: SearchSpace, model, log=print) -> SearchSpace:
    """``space`` without the pruning criteria ``model`` cannot use: bn_scale (BatchNorm gamma) on a model
    with no BatchNorm/GroupNorm. The embedded space drops them from its choices (with a note); a space of
    the user's is refused, naming the key, instead of failing those trials one by one."""
    from automl.compress.pruning.criteria import CRITERIA
    from automl.compress.pruning.thinning import NORMS

    if any(isinstance(m, NORMS) and getattr(m, "weight", None) is not None for m in model.modules()):
        return space
    raw = copy.deepcopy(space.raw)
    for group, params in (raw.get("compression") or {}).items():
        value = params.get("criterion") if isinstance(params, dict) else None
        values = value.get("choice", [value.get("fixed")]) if isinstance(value, dict) else [value]
        unusable = [v for v in values if isinstance(v, str) and v in CRITERIA.names()
                    and CRITERIA.get(v).needs == "bn_weight"]
        if not unusable:
            continue
        usable = [v for v in values if v not in unusable]
        if space.source != USER_SPACE or not usable or "choice" not in value:
            raise ConfigError(f"the model has no BatchNorm layer, and criterion {unusable[0]} ranks channels by "
                              f"their BatchNorm scale", file=space.source, key=f"compression.{group}.criterion",
                              value=unusable[0], fix="use another criterion (l1, l2, taylor, fpgm ...) for this model")
        value["choice"] = usable
        log(f"automl search: the model has no BatchNorm layer; pruning criterion {', '.join(unusable)} is left out "
            f"of the search")
    return _keep_object(parse_space(raw, space.source), space)


def with_budget(space: SearchSpace, **changes) -> SearchSpace:
    """``space`` with these budget settings (trials, concurrency, strategy ...; None = keep) written into
    its raw form and parsed again: the space's checks see them, and so do the run's space.yaml (what
    ``automl resume`` reads) and any later re-parse (``fit_to_model``)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return space
    return _keep_object(parse_space({**space.raw, "budget": {**(space.raw.get("budget") or {}), **changes}},
                                    space.source), space)


def _keep_object(parsed: SearchSpace, space: SearchSpace) -> SearchSpace:
    """A model object given to the Python API lives beside the raw form, not in it: carried over."""
    obj = getattr(space.model, "obj", None)
    return parsed if obj is None else dataclasses.replace(parsed, model=parsed.model.with_object(obj))
