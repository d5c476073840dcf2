"""A compressed model's structure as plain data, so its state_dict loads back into the user's class.

Thinning changes layers' shapes (``out_channels``, ``in_features``, ``groups`` ...), low-rank and
layer pruning replace modules. :func:`record_structure` writes, for every module, its class and its
plain attributes; :func:`load_structure` takes a freshly built model of the original class, sets
those attributes, re-creates modules that were replaced (only classes of ``torch.nn`` and of
``automl`` itself: nothing named in a file is imported from anywhere else), removes modules that
were removed, resizes parameters and buffers to the state_dict, and leaves loading to
``load_state_dict``.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping

import torch
import torch.nn as nn

from automl.errors import ConfigError
from automl.io import atomic_write_text

VERSION = 1
SAFE_PREFIXES = ("torch.nn.", "automl.")
_SCALARS = (bool, int, float, str, type(None))


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _SCALARS)


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def structure_of(model: nn.Module) -> Dict[str, Any]:
    """{module name: {type, attrs}} of every module (the root is '')."""
    modules = {}
    for name, module in model.named_modules():
        attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(module).items()
                 if k != "training" and _plain(v)}
        modules[name] = {"type": _qualname(module), "attrs": attrs, "children": list(module._modules)}
    return {"version": VERSION, "modules": modules}


def record_structure(model: nn.Module, path) -> Path:
    return atomic_write_text(path, json.dumps(structure_of(model), indent=1))


def _safe_class(qualname: str, name: str):
    if not qualname.startswith(SAFE_PREFIXES):
        raise ConfigError(f"module '{name}' was replaced by a {qualname}, which automl does not rebuild from a file",
                          key=name, value=qualname,
                          fix="load the exported model (model.pt2 or the ONNX file) instead, or keep the layer "
                              "out of the compression stage that replaced it")
    module_name, _, attr = qualname.rpartition(".")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _blank(cls) -> nn.Module:
    """An instance whose attributes come from the record, not from its constructor."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    return module


def _set_attrs(module: nn.Module, attrs: Mapping[str, Any]):
    for key, value in attrs.items():
        current = getattr(module, key, None)
        value = tuple(value) if isinstance(value, list) and isinstance(current, tuple) else value
        if key not in vars(module) or current != value:
            object.__setattr__(module, key, value)


def _parent(model: nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, child


def apply_structure(model: nn.Module, structure: Mapping, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Give ``model`` (built by the original builder) the recorded structure and the state's shapes."""
    if structure.get("version") != VERSION:
        raise ConfigError("unsupported structure file version", key="version", value=structure.get("version"),
                          fix=f"use a structure written by this automl (version {VERSION})")
    recorded = structure["modules"]
    root = recorded.get("", {}).get("type")
    if root != _qualname(model):
        raise ConfigError(f"the saved compressed model is a {root}; the model to load it into is a "
                          f"{_qualname(model)}", key="structure", value=root,
                          fix=f"pass a fresh instance of {root} (automl.load(dir, model=...)); if a stage wrapped "
                              "the model (early exit), load the deployed files instead (the ONNX model, or the "
                              "early-exit segments with automl.compress.early_exit.export.EarlyExitRunner)")
    current = dict(model.named_modules())
    for name in sorted(recorded, key=lambda n: (n.count(".") + bool(n), n)):
        info = recorded[name]
        module = current.get(name)
        if module is None or _qualname(module) != info["type"]:
            module = _blank(_safe_class(info["type"], name))
            parent, child = _parent(model, name)
            parent._modules[child] = module
        for child in [c for c in module._modules if c not in info["children"]]:
            del module._modules[child]
        _set_attrs(module, info["attrs"])
        current = dict(model.named_modules())
    for name, info in recorded.items():  # children in their recorded order (Sequential runs them so)
        module = current[name]
        order = [c for c in info["children"] if c in module._modules]
        ordered = {c: module._modules[c] for c in order}
        module._modules.clear()
        module._modules.update(ordered)
    _resize(model, state)
    return model


def _resize(model: nn.Module, state: Mapping[str, torch.Tensor]):
    """Parameters and buffers take the state_dict's shapes (values come from load_state_dict)."""
    for key, tensor in state.items():
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            continue  # reported by load_state_dict with the key's name
        if attr in owner._parameters:
            old = owner._parameters[attr]
            if old is None or old.shape != tensor.shape:
                owner._parameters[attr] = nn.Parameter(torch.empty_like(tensor), requires_grad=True)
        elif attr in owner._buffers:
            old = owner._buffers[attr]
            if old is None or old.shape != tensor.shape:
                owner._buffers[attr] = torch.empty_like(tensor)
        elif isinstance(tensor, torch.Tensor) and tensor.dtype.is_floating_point and attr in ("weight", "bias"):
            owner._parameters[attr] = nn.Parameter(torch.empty_like(tensor))
        elif isinstance(tensor, torch.Tensor):
            owner._buffers[attr] = torch.empty_like(tensor)


def load_structure(model: nn.Module, path, state: Mapping[str, torch.Tensor]) -> nn.Module:
    try:
        structure = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the structure file: {exc}", file=path,
                          fix="use the structure.json written by `automl apply`") from None
    return apply_structure(model, structure, state)
