"""ONNX export (torch.onnx dynamo exporter, dynamic batch), with the exporter's op registry built once
per process."""
from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List

import torch

from automl.errors import ConfigError
from automl.runtime.artifact import Artifact


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path) -> Artifact:
    """Export with the dynamo exporter and a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_export(model.eval(), example, path, ["logits"])
    return Artifact(path=path)


FREE_BATCH_FIX = ("keep the batch dimension free in forward (x.flatten(1) or x.reshape(x.shape[0], -1), not "
                  "x.view(1, -1) or a batch-sized constant)")


def free_batch():
    """The dynamic batch dimension every export declares."""
    return torch.export.Dim("batch", min=1, max=4096)


def onnx_export(module: torch.nn.Module, example: torch.Tensor, path: Path, outputs: List[str]):
    """torch.onnx.export (dynamo) with input ``input``, the named outputs and a dynamic batch."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    batch = free_batch()
    if example.shape[0] == 1:  # torch.export specialises a size-1 dim: a batch of 1 can export a fixed batch
        example = torch.cat([example, example])
    with warnings.catch_warnings(), _shared_onnx_registry():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["input"],
                                    output_names=outputs, dynamic_shapes=({0: batch},), verbose=False,
                                    external_data=False)
    first = _batch_dim(program)
    if isinstance(first, int):
        raise ConfigError(f"the ONNX export fixed the batch size at {first}: the model's forward treats the batch "
                          f"dimension as a constant", key="model", value=type(module).__name__, fix=FREE_BATCH_FIX)


def _batch_dim(program):
    """The exported graph's first input dimension: an int when the export fixed it, else symbolic."""
    try:
        return program.model.graph.inputs[0].shape[0]
    except (AttributeError, IndexError, TypeError):  # another torch.onnx: nothing to check
        return None


_REGISTRIES: Dict[str, object] = {}


def warm_onnx_exporter():
    """Export a tiny model once, so processes forked from this one find the exporter's op registry
    and first-call caches built (about a second off each of their first exports)."""
    tiny = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2, 2))
    with tempfile.TemporaryDirectory(prefix="automl-warm-") as tmp:
        export_onnx(tiny, torch.zeros(1, 1, 1, 1), Path(tmp) / "warm.onnx")


def _registered_ops():
    """How many operators torch's dispatcher knows (about 5 ms); None where torch lacks the call."""
    names = getattr(torch._C, "_dispatch_get_all_op_names", None)
    return len(names()) if names is not None else None


@contextlib.contextmanager
def _shared_onnx_registry():
    """Build torch.onnx's op registry once per process instead of once per export.

    The exporter rebuilds it from onnxscript's op library on every call (0.5-0.8 s, a third of a
    small model's export); a search exports several models per trial. Patched only while our own
    export runs, which passes no custom ops (the one thing that would mutate it). Where torch has
    moved the private class, exports simply run uncached."""
    if _registered_ops() is None:
        yield None
        return
    try:
        from torch.onnx._internal.exporter import _registration
        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, KeyError):
        yield None
        return
    build = original.__func__
    signature = inspect.signature(build)

    def cached(cls, *args, **kwargs):
        bound = signature.bind(cls, *args, **kwargs)
        bound.apply_defaults()  # from_torchlib() and from_torchlib(opset_version=<default>) are one entry
        # The registry holds only the ops that exist when it is built (quantized_decomposed appears when
        # torchao is imported): a registry built before is rebuilt, never reused without them.
        key = repr((list(bound.arguments.items())[1:], _registered_ops()))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(cls, *args, **kwargs)
        return _REGISTRIES[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield _registration.ONNXRegistry
    finally:
        _registration.ONNXRegistry.from_torchlib = original
