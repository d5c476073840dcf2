"""Modelled energy from published per-operation costs (Horowitz, ISSCC 2014, 45 nm).

Used only where a platform has no energy counter; every figure it produces is labelled
``energy_source: modelled``. A layer's energy = MACs x MAC energy + weight traffic from DRAM +
activation traffic through SRAM, each scaled by bit-width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple, Union

from automl.errors import ConfigError

# picojoules per operation (Horowitz 2014, Table at 45 nm, 0.9 V)
OP_PJ = {
    ("int", 8, "mul"): 0.2, ("int", 8, "add"): 0.03,
    ("int", 32, "mul"): 3.1, ("int", 32, "add"): 0.1,
    ("float", 16, "mul"): 1.1, ("float", 16, "add"): 0.4,
    ("float", 32, "mul"): 3.7, ("float", 32, "add"): 0.9,
}
SRAM_PJ_PER_32BIT = 5.0     # 8 KB SRAM read of a 32-bit word
DRAM_PJ_PER_32BIT = 640.0   # DRAM read of a 32-bit word

Precision = Union[str, Tuple[int, int]]


@dataclass(frozen=True)
class LayerCost:
    """What a layer does per sample: multiply-accumulates and the tensors it moves."""

    macs: int
    weights: int
    input_elems: int
    output_elems: int


def bits_of(precision: Precision) -> Tuple[str, int, int]:
    """(kind, weight bits, activation bits) for 'fp32', 'fp16', 'int8' or a (w_bits, a_bits) pair."""
    named = {"fp32": ("float", 32, 32), "fp16": ("float", 16, 16), "int8": ("int", 8, 8)}
    if isinstance(precision, str):
        if precision not in named:
            raise ConfigError("unknown precision", key="precision", value=precision,
                              fix="use fp32, fp16, int8 or a [weight_bits, activation_bits] pair")
        return named[precision]
    w, a = precision
    if not (1 <= w <= 8 and 1 <= a <= 8):
        raise ConfigError("integer bit-widths must be 1..8", key="precision", value=precision,
                          fix="use e.g. [4, 8]; wider integers are not modelled")
    return ("int", int(w), int(a))


def mac_pj(precision: Precision) -> float:
    """Energy of one multiply-accumulate.

    Floats multiply and add at their width. Integers multiply at w x a bits (multiplier energy taken
    proportional to the product of operand widths, anchored at 8x8 = 0.2 pJ) and accumulate in int32.
    """
    kind, w, a = bits_of(precision)
    if kind == "float":
        return OP_PJ[("float", w, "mul")] + OP_PJ[("float", w, "add")]
    return OP_PJ[("int", 8, "mul")] * (w * a) / 64.0 + OP_PJ[("int", 32, "add")]


def layer_energy_pj(cost: LayerCost, precision: Precision) -> Dict[str, float]:
    """Breakdown in pJ: compute, weights (DRAM, read once), activations (SRAM read in + write out)."""
    _, w, a = bits_of(precision)
    compute = cost.macs * mac_pj(precision)
    weights = cost.weights * w / 32.0 * DRAM_PJ_PER_32BIT
    activations = (cost.input_elems + cost.output_elems) * a / 32.0 * SRAM_PJ_PER_32BIT
    return {"compute_pj": compute, "weights_pj": weights, "activations_pj": activations,
            "total_pj": compute + weights + activations}


def model_energy_mj(costs, precision: Precision) -> float:
    """Sum over layers, in millijoules."""
    return sum(layer_energy_pj(c, precision)["total_pj"] for c in costs) * 1e-9
