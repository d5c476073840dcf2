"""The user's model checked before anything is trained or written: it builds, its checkpoint loads,
it takes one batch of the data, returns what our tasks train on, and torch.export traces it. A search
runs this before it touches its run directory; ``automl apply`` before its output directory."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch

from automl.arch.user import build_user_model
from automl.errors import ConfigError
from automl.runtime.export import FREE_BATCH_FIX, free_batch
from automl.tasks.base import DatasetTask


def check_user_model(space, task):
    """``space``: a search space or a recipe (anything with ``model`` and optionally ``source``).
    Before a search touches its run directory (``--force`` empties it): the user's model builds, its
    checkpoint loads, one forward pass on the task's example input runs (for our classification tasks:
    returning one logits tensor with a score per class) and torch.export traces it. Each failure is a
    ConfigError naming the model's key, the value and the fix. Returns the model (None without one)."""
    if space.model is None:
        return None
    source = getattr(space, "source", None)
    model, x = build_user_model(space.model).eval(), task.example_input(2)
    where = f"model.{'builder' if space.model.builder else 'object'}"
    name = space.model.builder or space.model.object_class
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ConfigError(f"the model's forward failed on one input batch of the data "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", file=source,
                          key=where, value=name, fix="automl calls model(x) with one tensor x of the data's "
                          "input shape: give a model whose forward takes that (wrap a multi-input model)") from None
    if not _classifies(task):  # a task of the user's own defines what the outputs are
        _check_exportable(model, x, source, where, name)
        return model
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model must return one logits tensor (batch, classes); it returned {shape}",
                          file=source, key=where, value=name,
                          fix="wrap the model so forward returns only the logits (e.g. out[0] or out['logits'])")
    classes = getattr(task, "num_classes", None)
    if classes and out.shape[1] != classes:
        raise ConfigError(f"the model scores {out.shape[1]} classes but the data has {classes}", file=source,
                          key=where, value=name, fix="build the model with one output per class of the data "
                          "(array labels are 0..K-1: K is the largest label + 1)")
    _check_exportable(model, x, source, where, name)
    return model


def _classifies(task) -> bool:
    """Our data tasks (folders, arrays, loaders, digits): cross-entropy on logits, accuracy by argmax."""
    return isinstance(task, DatasetTask) and type(task).loss is DatasetTask.loss \
        and type(task).evaluate is DatasetTask.evaluate


def _check_exportable(model, x, source, where: str, name: str) -> None:
    """Every trial deploys through torch.export: a forward it cannot trace (a Python branch on a tensor's
    value, ...) is refused now, in one paragraph, instead of failing the baseline with torch's traceback."""
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch.export")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:  # they (and a print to stderr) dump the graph; the exception says it
            log.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.export.export(model, (x,), dynamic_shapes=({0: free_batch()},), strict=False)  # as deployed
    except Exception as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        if "batch" in reason and ("Constraints violated" in str(exc) or "specializ" in str(exc)):
            raise ConfigError("the model's forward fixes the batch size (torch.export cannot keep the batch "
                              "dimension free)", file=source, key=where, value=name, fix=FREE_BATCH_FIX) from None
        raise ConfigError(f"torch.export cannot trace the model's forward ({type(exc).__name__}: {reason[:300]})",
                          file=source, key=where, value=name,
                          fix="make the forward traceable: no Python if/for on a tensor's values (use torch.where "
                              "or torch.cond), no .item() or .tolist() on activations") from None
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
