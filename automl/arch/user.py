"""A user's own model: a builder function (or a model object given through the Python API) plus an
optional trained checkpoint.

In a space or a recipe::

    model:
      builder: mypkg.models:build        # or path/to/models.py:build; returns an nn.Module
      kwargs: {num_classes: 10}          # keyword arguments of the builder (optional)
      checkpoint: weights.pt             # a state_dict, a training checkpoint holding one, or an
                                         # `automl apply --out` directory (optional)
      sha256: ...                        # written into recipes: a changed checkpoint is refused

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never a pickled object. The model the builder returns, with the checkpoint's weights, is where every
trial starts: it is not trained from scratch.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn as nn

from automl.errors import ConfigError
from automl.imports import check_module
from automl.validate import Where, expect_keys, expect_mapping, expect_type

KEYS = ("builder", "kwargs", "checkpoint", "sha256", "object")
# keys under which training scripts commonly nest the state_dict in a checkpoint
NESTED_STATE = ("state_dict", "model_state_dict", "model", "net", "weights", "params")
APPLY_WEIGHTS, APPLY_STRUCTURE = "model.pt", "structure.json"
FILE_MODULE_PREFIX = "automl_user_"  # modules imported from a file path are named this + a hash of it


@dataclass(frozen=True)
class ModelSource:
    """Where a user model comes from. ``obj`` is a model given in memory (Python API), deep-copied
    for every use; ``object_class`` names its class in files, which cannot hold it."""

    builder: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    sha256: Optional[str] = None
    object_class: Optional[str] = None
    obj: Any = field(default=None, compare=False, repr=False)
    source: Optional[str] = field(default=None, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.builder:
            out["builder"] = self.builder
        if self.object_class:
            out["object"] = self.object_class
        if self.kwargs:
            out["kwargs"] = dict(self.kwargs)
        if self.checkpoint:
            out["checkpoint"] = self.checkpoint
            out["sha256"] = self.sha256 or file_sha256(self.checkpoint)
        return out

    @property
    def has_weights(self) -> bool:
        """True when the model comes trained: a checkpoint, or a model object given through the API."""
        return bool(self.checkpoint) or self.obj is not None

    def with_object(self, obj: nn.Module) -> "ModelSource":
        return ModelSource(builder=self.builder, kwargs=dict(self.kwargs), checkpoint=self.checkpoint,
                           sha256=self.sha256, object_class=self.object_class or class_name(obj), obj=obj,
                           source=self.source)


def class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_model_source(data: Any, where: Where) -> ModelSource:
    """A validated ModelSource from a ``model:`` mapping (or a bare builder string)."""
    if isinstance(data, str):
        data = {"builder": data}
    data = expect_mapping(data, where)
    expect_keys(data, where, KEYS)
    builder = data.get("builder")
    if builder is None and "object" not in data:
        raise (where / "builder").error("missing required key", no_value=True,
                                        fix="add 'builder: package.module:function' (a function returning your model)")
    if builder is not None:
        expect_type(builder, where / "builder", str)
        module, attr = _split_spec(builder, where / "builder")
        if module.endswith(".py"):  # a file path: recorded resolved, so a recipe replays from anywhere
            builder = f"{Path(module).expanduser().resolve()}:{attr}"
    kwargs = dict(expect_mapping(data.get("kwargs") or {}, where / "kwargs"))
    checkpoint = data.get("checkpoint")
    if checkpoint is not None:
        path = Path(expect_type(checkpoint, where / "checkpoint", str)).expanduser()
        if not path.exists():
            raise (where / "checkpoint").error("checkpoint not found", checkpoint,
                                               "give the path of a saved state_dict (torch.save(model.state_dict(), "
                                               "path)) or of an `automl apply --out` directory")
        checkpoint = str(path.resolve())
    sha = data.get("sha256")
    if sha is not None:
        expect_type(sha, where / "sha256", str)
        if checkpoint is None:
            raise (where / "sha256").error("sha256 names a checkpoint, but there is none", sha, "drop sha256")
    obj_class = data.get("object")
    if obj_class is not None:
        expect_type(obj_class, where / "object", str)
    return ModelSource(builder=builder, kwargs=kwargs, checkpoint=checkpoint, sha256=sha,
                       object_class=obj_class, source=where.file)


def _split_spec(spec: str, where: Where):
    module, colon, attr = spec.rpartition(":")
    if not colon or not module or not attr.isidentifier():
        raise where.error("a builder is 'package.module:function' or 'path/to/file.py:function'", spec,
                          "write e.g. builder: mypkg.models:build")
    return module, attr


def import_builder(spec: str, where: Where) -> Callable[..., nn.Module]:
    """The builder function ``spec`` names. The current directory is importable, as for ``python -m``; for
    a file path, the file's folder is, as for ``python file.py``."""
    module_name, attr = _split_spec(spec, where)
    if not module_name.endswith(".py"):
        check_module(module_name, file=where.file, key=where.key, value=spec, what="model builder")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            name = f"{FILE_MODULE_PREFIX}{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            module = sys.modules.get(name)
            if module is None:
                if str(path.parent) not in sys.path:  # its sibling modules import, as under `python file.py`
                    sys.path.insert(0, str(path.parent))
                spec_obj = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec_obj)
                sys.modules[name] = module
                try:
                    spec_obj.loader.exec_module(module)
                except BaseException:  # a half-run module must not be found cached next time
                    sys.modules.pop(name, None)
                    raise
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, but also any error raised while the module runs
        raise where.error(f"cannot import the builder's module: {type(exc).__name__}: {exc}", spec,
                          "make the module importable (installed, in the current directory or on PYTHONPATH), "
                          "or give a file path such as models.py:build") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise where.error(f"module '{module_name}' has no callable '{attr}'", spec,
                          "name a function (or class) that returns an nn.Module")
    return builder


def build_user_model(source: ModelSource, *, load_weights: bool = True) -> nn.Module:
    """The user's model with its checkpoint loaded: a fresh copy on every call."""
    where = Where(source.source, "model")
    if source.obj is not None:
        model = copy.deepcopy(source.obj)
    elif source.builder is None:
        raise where.error(f"this recipe was made from a model object given to the Python API "
                          f"({source.object_class}); a file cannot rebuild it", source.object_class,
                          "pass the model again (automl.apply_recipe(recipe, out, model=your_model)) or add "
                          "'builder: package.module:function' under model:")
    else:
        builder = import_builder(source.builder, where / "builder")
        try:
            model = builder(**source.kwargs)
        except Exception as exc:
            raise (where / "builder").error(f"the builder raised {type(exc).__name__}: {exc}", source.builder,
                                            "fix the builder or its kwargs") from None
    if not isinstance(model, nn.Module):
        raise (where / "builder").error("the builder must return a torch.nn.Module", type(model).__name__,
                                        "return the model object")
    if load_weights and source.checkpoint:
        check_sha(source)
        load_checkpoint(model, source.checkpoint, where / "checkpoint")
    return model


def check_sha(source: ModelSource):
    if source.sha256 and file_sha256(source.checkpoint) != source.sha256:
        raise ConfigError("the checkpoint changed since this recipe was written (sha256 differs)",
                          file=source.source, key="model.checkpoint", value=source.checkpoint,
                          fix=f"restore the file whose sha256 is {source.sha256}, or drop model.sha256 to accept "
                              "the new weights (the recorded metrics then no longer describe them)")


def read_state_dict(path, where: Where) -> Dict[str, torch.Tensor]:
    """A state_dict from a checkpoint file, read without unpickling objects."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours its message for terminals
        if "Unsupported global" in text:
            first = "it holds pickled Python objects, not only tensors (a whole model saved with torch.save(model)?)"
        elif isinstance(exc, (KeyError, EOFError)) or "invalid load key" in text or "Unsupported operand" in text:
            first = "it is not a file written by torch.save"
        else:
            first = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        raise where.error(f"cannot read the checkpoint with torch.load(weights_only=True): {first}", str(path),
                          "save only tensors: torch.save(model.state_dict(), path); automl never unpickles a "
                          "whole model object (it could run code)") from None
    for key in NESTED_STATE:
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise where.error("the checkpoint holds no state_dict (a mapping of names to tensors)", str(path),
                          "save model.state_dict(), or a dict with it under 'state_dict'")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in data.items()}


def load_checkpoint(model: nn.Module, path, where: Where) -> nn.Module:
    """Load ``path`` (a state_dict file, or an ``automl apply`` directory) into ``model``; the first
    parameter that is missing, unexpected or of another shape is named."""
    path = Path(path)
    if path.is_dir():
        from automl.arch.structure import load_structure

        weights = path / APPLY_WEIGHTS
        if not weights.is_file():
            raise where.error(f"the directory holds no {APPLY_WEIGHTS}", str(path),
                              "give a state_dict file or a directory written by `automl apply --out`")
        state = read_state_dict(weights, where)
        if (path / APPLY_STRUCTURE).is_file():
            load_structure(model, path / APPLY_STRUCTURE, state)
    else:
        state = read_state_dict(path, where)
    # BatchNorm's batch counter (torch >= 0.4.1) is missing from older checkpoints, torchvision's
    # published weights among them; it does nothing in eval, so the model's own value stands in
    own = model.state_dict()
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state}, **state}
    check_state_fits(model, state, where, str(path))
    model.load_state_dict(state)
    return model


def check_state_fits(model: nn.Module, state: Mapping[str, torch.Tensor], where: Where, name: str):
    own = model.state_dict()
    for key, tensor in own.items():
        if key not in state:
            raise where.error(f"the checkpoint has no '{key}' (the model's parameter of shape {tuple(tensor.shape)})",
                              name, "save the state_dict of this same architecture (check the builder's kwargs)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise where.error(f"parameter '{key}' has shape {tuple(state[key].shape)} in the checkpoint but "
                              f"{tuple(tensor.shape)} in the model", name,
                              "build the model with the settings it was trained with (builder kwargs), or give the "
                              "`automl apply --out` directory of a thinned model")
    extra = [k for k in state if k not in own]
    if extra:
        raise where.error(f"the checkpoint has '{extra[0]}', which the model lacks ({len(extra)} such entries)",
                          name, "save the state_dict of this same architecture (check the builder's kwargs)")
