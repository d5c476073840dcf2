"""Mixed precision: per-layer sensitivity to weight quantization, and a bit allocator for a target
parameter-weighted average bit-width.

Sensitivity criteria
  quantization  the change in loss (or accuracy) when that layer alone has its weights quantized to
                b bits, measured on a few batches (HAQ/HAWQ-style ablation; one forward pass per
                layer and bit-width).
  hessian       HAWQ-v2: Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2, with the trace of each layer's Hessian
                block estimated by Hutchinson's method, E[v^T H v] over Rademacher vectors v.

Allocation minimises the summed sensitivity subject to sum(n_l * b_l) <= target * sum(n_l): an exact
Pareto dynamic programme when its front stays small, otherwise a greedy that lowers the layer with
the smallest sensitivity increase per saved bit, then spends any leftover budget on raises.
Sensitivities are compared as given: a width that measures better than a wider one is taken.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.compress.layers import select_layers
from automl.compress.quantization import qmath
from automl.errors import ConfigError

Sensitivity = Dict[str, Dict[int, float]]


def _split(batch):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ConfigError("expected (input, target) batches", key="batches", value=type(batch).__name__,
                          fix="pass a DataLoader or a list of (x, y) pairs")
    return batch


def _evaluate(model, batches, loss_fn) -> tuple:
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            loss += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
            count += len(y)
    return loss / max(count, 1), correct / max(count, 1)


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Symmetric min/max fake quantization of a weight (per output channel by default)."""
    return qmath.fake_quantize_minmax(w, bits, symmetric=True, signed=True, axis=0 if per_channel else None)


def parameter_counts(model: nn.Module, layers: Iterable[str] = ("re:.*",)) -> Dict[str, int]:
    """Weight elements of each selected Conv/Linear (biases stay in float and are not counted)."""
    return {n: m.weight.numel() for n, m in select_layers(model, layers).items()}


def quantization_sensitivity(model: nn.Module, batches: Sequence, layers: Iterable[str] = ("re:.*",),
                             candidates: Sequence[int] = (2, 4, 8), *, metric: str = "loss",
                             loss_fn: Callable = F.cross_entropy, per_channel: bool = True) -> Sensitivity:
    """{layer: {bits: damage}}: loss increase (metric 'loss') or accuracy drop ('accuracy') when only
    that layer's weights are quantized. The model is evaluated in eval mode and left unchanged."""
    if metric not in ("loss", "accuracy"):
        raise ConfigError("unknown sensitivity metric", key="metric", value=metric, fix="use 'loss' or 'accuracy'")
    candidates = [qmath.check_bits(b, key="candidates") for b in candidates]
    batches = [_split(b) for b in batches]
    chosen = select_layers(model, layers)
    was_training = model.training
    model.eval()
    base_loss, base_acc = _evaluate(model, batches, loss_fn)
    out: Sensitivity = {}
    try:
        for name, layer in chosen.items():
            original = layer.weight.detach().clone()
            out[name] = {}
            for bits in candidates:
                with torch.no_grad():
                    layer.weight.copy_(quantize_weight(original, bits, per_channel))
                loss, acc = _evaluate(model, batches, loss_fn)
                out[name][bits] = loss - base_loss if metric == "loss" else base_acc - acc
            with torch.no_grad():
                layer.weight.copy_(original)
    finally:
        model.train(was_training)
    return out


def hutchinson_trace(model: nn.Module, batches: Sequence, layers: Iterable[str] = ("re:.*",), *,
                     samples: int = 16, loss_fn: Callable = F.cross_entropy, seed: int = 0) -> Dict[str, float]:
    """Hutchinson estimate of Tr(H) of the loss Hessian block of each layer's weight:
    mean over batches and Rademacher vectors v of v^T (H v), with H v from a double backward."""
    if not isinstance(samples, int) or samples < 1:
        raise ConfigError("samples must be a positive integer", key="samples", value=samples, fix="use e.g. 16")
    chosen = select_layers(model, layers)
    weights = [m.weight for m in chosen.values()]
    gen = torch.Generator().manual_seed(seed)
    totals = torch.zeros(len(weights), dtype=torch.float64)
    draws = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x, y = _split(batch)
            grads = torch.autograd.grad(loss_fn(model(x), y), weights, create_graph=True)
            for _ in range(samples):
                vs = [torch.randint(0, 2, w.shape, generator=gen).to(w.dtype) * 2 - 1 for w in weights]
                hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
                totals += torch.tensor([float((v * hv).sum()) for v, hv in zip(vs, hvs)], dtype=torch.float64)
                draws += 1
    finally:
        model.train(was_training)
    if not draws:
        raise ConfigError("no batches to estimate the Hessian trace", key="batches", value=0,
                          fix="pass at least one (x, y) batch")
    return {name: float(t) / draws for name, t in zip(chosen, totals)}


def hessian_sensitivity(model: nn.Module, traces: Mapping[str, float], candidates: Sequence[int] = (2, 4, 8),
                        *, per_channel: bool = True) -> Sensitivity:
    """HAWQ-v2 sensitivity: Tr(H) / n * ||Q_b(W) - W||^2 for each layer in ``traces``."""
    candidates = [qmath.check_bits(b, key="candidates") for b in candidates]
    chosen = select_layers(model, list(traces))
    out: Sensitivity = {}
    for name, layer in chosen.items():
        w = layer.weight.detach()
        # A PSD block has a non-negative trace; a negative estimate is sampling noise (or a saddle).
        trace = max(float(traces[name]), 0.0)
        out[name] = {b: trace / w.numel() * float(((quantize_weight(w, b, per_channel) - w) ** 2).sum())
                     for b in candidates}
    return out


def average_bits(bits: Mapping[str, int], params: Mapping[str, int]) -> float:
    """Parameter-weighted average bit-width."""
    total = sum(params[n] for n in bits)
    return sum(params[n] * b for n, b in bits.items()) / max(total, 1)


def _check_allocation(sensitivity, params, target_bits):
    if not sensitivity:
        raise ConfigError("no layers to allocate bits to", key="sensitivity", value={},
                          fix="measure the sensitivity of at least one layer")
    missing = [n for n in sensitivity if n not in params]
    if missing:
        raise ConfigError("layers without a parameter count", key="params", value=missing,
                          fix="give the weight count of every layer in the sensitivity table")
    lowest = average_bits({n: min(c) for n, c in sensitivity.items()}, params)
    if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or target_bits < lowest:
        raise ConfigError(f"target average bit-width below the lowest reachable {lowest:g}", key="target_bits",
                          value=target_bits, fix=f"use a target >= {lowest:g} or add lower candidate bits")


def _greedy(sens, params, budget) -> Dict[str, int]:
    # Start from each layer's least-damage width (ties: the widest), usually its widest candidate.
    bits = {n: min(c, key=lambda b: (c[b], -b)) for n, c in sens.items()}
    used = sum(params[n] * b for n, b in bits.items())
    while used > budget:  # lower: least damage per saved bit (a free or helpful move goes first)
        best = None
        for n, b in bits.items():
            for lower in (c for c in sens[n] if c < b):
                ratio = (sens[n][lower] - sens[n][b]) / (params[n] * (b - lower))
                if best is None or ratio < best[0]:
                    best = (ratio, n, lower)
        _, n, lower = best
        used -= params[n] * (bits[n] - lower)
        bits[n] = lower
    while True:  # raise: most damage removed per added bit, within the budget
        best = None
        for n, b in bits.items():
            for higher in (c for c in sens[n] if c > b and used + params[n] * (c - b) <= budget):
                gain = (sens[n][b] - sens[n][higher]) / (params[n] * (higher - b))
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, n, higher)
        if best is None:
            return bits
        _, n, higher = best
        used += params[n] * (higher - bits[n])
        bits[n] = higher


def _exact(sens, params, budget, max_states: int) -> Optional[Dict[str, int]]:
    """Pareto DP over layers: states (bits used, damage, choice) with dominated states dropped.
    Returns None when the front grows beyond ``max_states``."""
    states = [(0, 0.0, ())]
    for n in sens:
        grown = sorted((used + params[n] * b, cost + sens[n][b], choice + (b,))
                       for used, cost, choice in states for b in sorted(sens[n])
                       if used + params[n] * b <= budget)
        states, best = [], float("inf")
        for state in grown:  # ascending bits used: keep only strictly cheaper states
            if state[1] < best:
                states.append(state)
                best = state[1]
        if len(states) > max_states:
            return None
    used, cost, choice = min(states, key=lambda s: (s[1], -s[0]))  # ties: use more of the budget
    return dict(zip(sens, choice))


def allocate_bits(sensitivity: Mapping[str, Mapping[int, float]], params: Mapping[str, int], target_bits: float,
                  *, method: str = "auto", max_states: int = 20000) -> Dict[str, int]:
    """Bits per layer from each layer's candidates so that the parameter-weighted average is at most
    ``target_bits`` and the summed sensitivity is smallest. ``method``: 'exact' (Pareto DP), 'greedy',
    or 'auto' (exact while its front stays within ``max_states``, else greedy)."""
    if method not in ("auto", "exact", "greedy"):
        raise ConfigError("unknown allocation method", key="method", value=method, fix="use auto, exact or greedy")
    sens = {n: {qmath.check_bits(b, key=f"sensitivity.{n}"): float(v) for b, v in c.items()}
            for n, c in sensitivity.items()}
    _check_allocation(sens, params, target_bits)
    budget = target_bits * sum(params[n] for n in sens) * (1 + 1e-12)  # float slack for exact hits
    if method != "greedy":
        found = _exact(sens, params, budget, max_states if method == "auto" else 1 << 62)
        if found is not None:
            return found
    return _greedy(sens, params, budget)


def mixed_precision_bits(model: nn.Module, batches: Sequence, target_bits: float,
                         candidates: Sequence[int] = (2, 4, 8), layers: Iterable[str] = ("re:.*",), *,
                         criterion: str = "quantization", loss_fn: Callable = F.cross_entropy,
                         samples: int = 16, seed: int = 0) -> Dict[str, int]:
    """Measure sensitivity with ``criterion`` ('quantization' or 'hessian') and allocate bits."""
    batches = list(batches)
    if criterion == "quantization":
        sens = quantization_sensitivity(model, batches, layers, candidates, loss_fn=loss_fn)
    elif criterion == "hessian":
        traces = hutchinson_trace(model, batches, layers, samples=samples, loss_fn=loss_fn, seed=seed)
        sens = hessian_sensitivity(model, traces, candidates)
    else:
        raise ConfigError("unknown sensitivity criterion", key="criterion", value=criterion,
                          fix="use 'quantization' or 'hessian'")
    return allocate_bits(sens, parameter_counts(model, layers), target_bits)
