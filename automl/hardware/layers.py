"""The distinct layer configurations of a model, as a latency profile keys them.

A *layer* is what one deployed kernel computes: a conv with its folded BatchNorm and fused
activation, a linear layer, a pool, a global average pool, a residual add (with its activation),
an SE gating multiply, another elementwise op, a standalone activation or BatchNorm, and the data
movement of a concatenation, split, channel slice, pad or channel shuffle. Views, flatten, dropout
and identity cost nothing at deployment and are left to the predictor's whole-model correction.

Layers are found by tracing with torch.fx and shape propagation; each node goes to the handler
registered for its module class, function or method (automl.hardware.ops, ops_tensor: adding an op
is adding one handler). The keys themselves (LayerKey, SHAPE_FIELDS, layer_cost) live in
automl.hardware.keys and are re-exported here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

import automl.hardware.ops_tensor  # noqa: F401  (registers the activation / arithmetic / data-movement handlers)
from automl.errors import ConfigError
from automl.hardware.keys import (ACTS, CHANNEL_FIELDS, MAC_OPS, MAX_PAIR_BITS, OPTIONAL_FIELDS,  # noqa: F401
                                  PRECISION_HELP, PRECISIONS, SHAPE_FIELDS, LayerKey, bit_pair, is_precision,
                                  layer_cost, out_hw, pair_precision)
from automl.hardware.ops import HANDLERS, Context, is_handled_class, lookup


# tracing -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TracedLayer:
    name: str       # the module (or graph node) the layer starts at
    key: LayerKey
    input_bits: Optional[int] = None   # bits of a fake-quantizer feeding this layer (free_input_quant tracing)


def _input_quantizers() -> tuple:
    from automl.compress.quantization.simulated import ActFakeQuant

    return (ActFakeQuant,)


def grid_bits(quantizer: nn.Module) -> int:
    """Bits of a frozen input grid [qmin, qmax] (PACT's symmetric 2**b - 1 levels count as b bits)."""
    return max(1, math.ceil(math.log2(quantizer.qmax - quantizer.qmin + 1)))


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping as leaves the given classes and any module class with a handler."""

    def __init__(self, leaves: tuple):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module, name):
        return isinstance(module, self.leaves) or is_handled_class(type(module)) or super().is_leaf_module(module, name)


def _unknown(ctx: Context, node: fx.Node, module: Optional[nn.Module]) -> ConfigError:
    what = type(module).__name__ if module is not None else getattr(node.target, "__name__", node.target)
    kind = {"call_module": "module", "call_function": "function", "call_method": "tensor method"}.get(node.op, node.op)
    return ConfigError(f"layer {ctx.where(node)} ({what}) is not one the profiler knows", key=ctx.name(node),
                       value=what,
                       fix=f"replace this {kind} by one the profiler prices (convs, linear, BatchNorm, pools, "
                           f"activations such as {', '.join(ACTS[1:6])}, elementwise ops, cat, split, pad, "
                           "channel shuffle), or register a handler for it with automl.hardware.ops.handles "
                           "(a layer model for a new op goes in automl.hardware.layer_models)")


def trace_layers(model: nn.Module, example: torch.Tensor, precision: str = "fp32", *,
                 free_input_quant: bool = False) -> List[TracedLayer]:
    """The costed layers of ``model`` on ``example`` (batch = its first dimension), in execution order.

    ``free_input_quant``: the frozen input fake-quantizers of a simulated low-bit model (ActFakeQuant)
    cost nothing -- an integer accelerator quantizes in the previous layer's output path -- and their
    bit-width is kept as the next layer's ``input_bits``. Without it they are traced as the float ops
    they are (which a CPU profile cannot price)."""
    was_training = model.training
    model.eval()
    leaves = _input_quantizers() if free_input_quant else ()
    try:
        gm = fx.GraphModule(model, _Tracer(leaves).trace(model))
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot trace the model with torch.fx: {type(exc).__name__}: {exc}",
                          value=type(model).__name__,
                          fix="make forward() free of data-dependent control flow, or profile its parts") from None
    finally:
        model.train(was_training)
    ctx = Context(dict(gm.named_modules()), precision, int(example.shape[0]))
    out, done, grids = [], set(), {}
    for node in gm.graph.nodes:
        if node in done or node.op in ("placeholder", "output", "get_attr"):
            continue
        if "tensor_meta" not in node.meta:    # Python arithmetic on sizes (x.size(), c // groups): no kernel
            continue
        name, module = ctx.name(node), ctx.module(node)
        if leaves and isinstance(module, leaves):
            grids[node] = grid_bits(module)
            continue
        handler = lookup(HANDLERS, node, module)
        if handler is None:
            raise _unknown(ctx, node, module)
        for key, last, layer_name in handler(ctx, node):
            while last is not node:   # mark the absorbed chain (a fused BatchNorm / activation)
                done.add(last)
                last = last.args[0]
            source = node.args[0] if node.args else None
            out.append(TracedLayer(layer_name or name, key, grids.get(source) if key.op in MAC_OPS else None))
    return out


def distinct_keys(layer_lists) -> List[LayerKey]:
    """The deduplicated, sorted keys of several traced models."""
    return sorted({layer.key for layers in layer_lists for layer in layers})


def key_from_dict(data: Mapping) -> LayerKey:
    shape = data.get("shape") or {}
    if not isinstance(shape, Mapping):
        raise ConfigError("shape must be a mapping of field: value", key="shape", value=shape)
    return LayerKey.make(data.get("op"), data.get("precision", "fp32"), data.get("batch", 1), **dict(shape))


def energy_precision(key: LayerKey):
    """The energy model's precision: dynamic int8 runs only conv/linear in int8; a 'wXaY' key its pair."""
    pair = bit_pair(key.precision)
    if pair is not None:
        return pair
    if key.precision == "int8_static" or (key.precision == "int8_dynamic" and key.op in ("conv", "dwconv", "linear")):
        return "int8"
    return "fp32"


def modelled_energy_mj(key: LayerKey) -> float:
    """Energy of one run of the layer (all ``batch`` samples) from the 45 nm per-op model, in mJ."""
    from automl.hardware.energy import layer_energy_pj

    return layer_energy_pj(layer_cost(key), energy_precision(key))["total_pj"] * key.batch * 1e-9


def weight_bytes(key: LayerKey) -> int:
    """Bytes of the layer's weights as deployed (int8 kernels hold 1-byte weights, 'wXaY' X-bit ones)."""
    pair = bit_pair(key.precision)
    if pair is not None:
        return math.ceil(layer_cost(key).weights * pair[0] / 8)
    return layer_cost(key).weights * (1 if energy_precision(key) == "int8" else 4)
