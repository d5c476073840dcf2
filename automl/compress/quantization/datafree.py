"""Data-free quantization (Nagel et al. 2019, DFQ): cross-layer equalization and bias correction.

Cross-layer equalization (CLE): for two layers with a positively homogeneous op between them
(ReLU, pooling, flatten: f(x / s) = f(x) / s for s > 0), dividing output channel i of the first
layer by s_i and multiplying input channel i of the second by s_i leaves the function unchanged.
With s_i = sqrt(r1_i * r2_i) / r2_i both channel ranges become sqrt(r1_i * r2_i), so one
per-tensor scale fits every channel. BN is folded first (fusion.fuse_bn).

Bias correction: quantizing W adds the output error eps @ E[x] (eps = W_q - W) on average; it is
subtracted from the bias. E[x] comes from the folded BN's statistics (data-free: the BN output is
taken as N(beta, gamma^2) per channel, clipped by the ReLU) or, for layers whose input has no BN
statistics, from a few batches (empirical). Weights are fake-quantized (simulated, weight-only);
the int8 scale formula matches pt2e's symmetric MinMax observer, so the corrected float model can
be handed to pt2e for a deployable int8 model.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from automl.compress.quantization.fusion import _pairs as _bn_pairs
from automl.compress.quantization.fusion import fuse_bn
from automl.errors import ConfigError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER = _CONV + (nn.Linear,)
_MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
        nn.AdaptiveMaxPool3d)
_MEAN_KEEPING = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_EPS = torch.finfo(torch.float32).eps


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError("weight bits must be an integer in [2, 8]", key="bits", value=bits,
                          fix="use 8 (int8) or a lower bit width such as 6 or 4")


def fake_quantize_weight(w: torch.Tensor, bits: int = 8, *, per_channel: bool = False) -> torch.Tensor:
    """Symmetric signed fake quantization of a weight (scale = max|w| / ((qmax - qmin) / 2))."""
    _check_bits(bits)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    half = (qmax - qmin) / 2
    w = w.detach().float()
    if per_channel:
        scale = (w.abs().flatten(1).amax(1) / half).clamp_min(_EPS)
        zero = torch.zeros(w.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, qmin, qmax)
    scale = max(float(w.abs().max()) / half, _EPS)
    return torch.fake_quantize_per_tensor_affine(w, scale, 0, qmin, qmax)


@dataclass(frozen=True)
class Chain:
    """Two layers joined by positively homogeneous ops only (first -> relu/pool/flatten -> second)."""

    first: str
    second: str
    relu: bool          # a ReLU clips the first layer's output on the way
    mean_known: bool    # no max-pool: E[input of second] follows from the first layer's output stats
    repeat: int = 1     # inputs of ``second`` per output channel of ``first`` (flatten of C x H x W)


def _passthrough(node: fx.Node, prev: fx.Node, modules) -> Optional[str]:
    """'relu', 'max', 'flatten', 'keep' for an op that commutes with positive per-channel scaling; else None."""
    if not node.args or node.args[0] is not prev:
        return None
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, _MAX):
            return "max"
        if isinstance(module, nn.Flatten) and module.start_dim == 1:
            return "flatten"
        if isinstance(module, _MEAN_KEEPING):
            return "keep"
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return "relu"
        if node.target is torch.flatten and node.args[1:2] == (1,) and not node.kwargs:
            return "flatten"
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def find_chains(gm: fx.GraphModule) -> List[Chain]:
    """Every Conv/Linear pair that CLE can rescale (each intermediate output read by one node only)."""
    modules = dict(gm.named_modules())
    chains = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _LAYER):
            continue
        cur, kinds = node, set()
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            if user.op == "call_module" and isinstance(modules.get(user.target), _LAYER) and user.args[0] is cur:
                first, second = modules[node.target], modules[user.target]
                channels = first.weight.shape[0]
                fan = second.in_features if isinstance(second, nn.Linear) else second.in_channels
                # conv -> linear needs a channel-major flatten between; linear -> conv never pairs.
                shapes_ok = isinstance(second, _CONV) == isinstance(first, _CONV) or "flatten" in kinds
                if shapes_ok and isinstance(second, nn.Linear) and fan % channels == 0:
                    chains.append(Chain(node.target, user.target, "relu" in kinds, "max" not in kinds,
                                        fan // channels))
                elif shapes_ok and fan == channels:
                    chains.append(Chain(node.target, user.target, "relu" in kinds, "max" not in kinds))
                break
            kind = _passthrough(user, cur, modules)
            if kind is None:
                break
            kinds.add(kind)
            cur = user
    return chains


def _input_index(layer: nn.Module) -> torch.Tensor:
    """For each weight entry (out, in_per_group), the global input channel it reads."""
    out, per_group = layer.weight.shape[:2]
    groups = getattr(layer, "groups", 1)
    return (torch.arange(out) // (out // groups))[:, None] * per_group + torch.arange(per_group)[None, :]


def _input_ranges(layer: nn.Module, channels: int, repeat: int) -> torch.Tensor:
    w = layer.weight.detach().abs()
    if isinstance(layer, nn.Linear):
        return w.reshape(w.shape[0], channels, repeat).amax(dim=(0, 2))
    per_entry = w.flatten(2).amax(2)
    out = torch.zeros(channels)
    return out.scatter_reduce(0, _input_index(layer).flatten(), per_entry.flatten(), "amax")


def _scale_inputs(layer: nn.Module, s: torch.Tensor, repeat: int) -> None:
    if isinstance(layer, nn.Linear):
        layer.weight.mul_(s.repeat_interleave(repeat)[None, :])
    else:
        layer.weight.mul_(s[_input_index(layer)].reshape(layer.weight.shape[:2] + (1,) * (layer.weight.dim() - 2)))


@torch.no_grad()
def equalize_pair(first: nn.Module, second: nn.Module, repeat: int = 1) -> torch.Tensor:
    """Rescale in place so that both layers' per-channel ranges equal sqrt(r1 * r2); returns s."""
    channels = first.weight.shape[0]
    r1 = first.weight.detach().abs().flatten(1).amax(1)
    r2 = _input_ranges(second, channels, repeat)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, torch.ones_like(r2)), torch.ones_like(r1))
    first.weight.div_(s.reshape((-1,) + (1,) * (first.weight.dim() - 1)))
    if first.bias is not None:
        first.bias.div_(s)
    _scale_inputs(second, s, repeat)
    return s


def cross_layer_equalize(model: nn.Module, *, iterations: int = 20, tol: float = 1e-6,
                         relu6_to_relu: bool = False) -> Tuple[fx.GraphModule, Dict[str, torch.Tensor]]:
    """Fold BN, then equalize every chain (repeated until the scales stop changing).

    Returns the equalized model (same function) and, per first layer, the total scale its
    output channels were divided by. ReLU6 does not commute with scaling, so MobileNet-style
    models have no chains unless ``relu6_to_relu`` swaps it for ReLU first, as DFQ does (this
    changes the function wherever an activation exceeded 6).
    """
    gm, _ = fuse_bn(model)
    if relu6_to_relu:
        for name, module in list(gm.named_modules()):
            if isinstance(module, nn.ReLU6):
                parent, _, attr = name.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, nn.ReLU(inplace=module.inplace))
    modules = dict(gm.named_modules())
    chains = find_chains(gm)
    total = {c.first: torch.ones(modules[c.first].weight.shape[0]) for c in chains}
    for _ in range(iterations):
        change = 0.0
        for c in chains:
            s = equalize_pair(modules[c.first], modules[c.second], c.repeat)
            total[c.first] *= s
            change = max(change, float((s - 1).abs().max()))
        if change < tol:
            break
    return gm, total


def bn_output_stats(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per layer followed by a foldable BN: (beta, |gamma|), the assumed mean/std of its BN'd output."""
    gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    stats = {}
    for src, bn_node in _bn_pairs(gm):
        bn = modules[bn_node.target]
        n = bn.num_features
        mean = bn.bias.detach().clone() if bn.affine else torch.zeros(n)
        std = bn.weight.detach().abs().clone() if bn.affine else torch.ones(n)
        stats[src.target] = (mean, std)
    return stats


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[relu(z)] for z ~ N(mean, std^2): std * phi(mean / std) + mean * Phi(mean / std)."""
    safe = std.clamp_min(1e-12)
    z = mean / safe
    value = safe * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) + mean * torch.special.ndtr(z)
    return torch.where(std > 0, value, mean.clamp_min(0))


def _expected_shift(layer: nn.Module, eps: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """eps @ E[x] per output channel; a conv sums over its kernel (zero padding at borders ignored)."""
    if isinstance(layer, nn.Linear):
        return eps @ expected
    return (eps.flatten(2).sum(2) * expected[_input_index(layer)]).sum(1)


def _output_shift(layer: nn.Module, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over batch (and positions) of the extra output eps * x, per output channel."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, eps).reshape(-1, eps.shape[0]).mean(0)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[eps.dim() - 2]
    y = conv(x, eps, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return y.transpose(0, 1).reshape(eps.shape[0], -1).mean(1)


@dataclass
class DataFreeReport:
    bits: int
    per_channel: bool
    equalized: List[Tuple[str, str]] = field(default_factory=list)
    corrected: Dict[str, str] = field(default_factory=dict)   # layer -> "data_free" | "empirical"
    simulated: bool = True                                      # weights fake-quantized in float


@torch.no_grad()
def datafree_quantize(model: nn.Module, *, bits: int = 8, per_channel: bool = False, equalize: bool = True,
                      correct_bias: bool = True, batches: Optional[Iterable] = None,
                      relu6_to_relu: bool = False) -> Tuple[fx.GraphModule, DataFreeReport]:
    """Weight-only fake quantization of every Conv/Linear, after CLE and with bias correction.

    Bias correction is data-free where the layer's input follows a folded BN (+ ReLU); the other
    layers are corrected from ``batches`` (tensors or (x, y) pairs) when given, else left as they are.
    """
    _check_bits(bits)
    stats = bn_output_stats(model)
    gm, scales = (cross_layer_equalize(model, relu6_to_relu=relu6_to_relu) if equalize
                  else (fuse_bn(model)[0], {}))
    for name, s in scales.items():
        if name in stats:
            stats[name] = (stats[name][0] / s, stats[name][1] / s)
    modules = dict(gm.named_modules())
    chains = find_chains(gm)
    report = DataFreeReport(bits, per_channel, equalized=[(c.first, c.second) for c in chains] if equalize else [])
    layers = {name: m for name, m in modules.items() if isinstance(m, _LAYER)}
    eps = {name: fake_quantize_weight(m.weight, bits, per_channel=per_channel) - m.weight
           for name, m in layers.items()}
    shifts: Dict[str, torch.Tensor] = {}
    if correct_bias:
        for c in chains:
            if c.first in stats and c.mean_known:
                mean, std = stats[c.first]
                expected = (clipped_normal_mean(mean, std) if c.relu else mean).repeat_interleave(c.repeat)
                shifts[c.second] = _expected_shift(layers[c.second], eps[c.second], expected)
                report.corrected[c.second] = "data_free"
        if batches is not None:
            shifts.update(_empirical_shifts(gm, {n: eps[n] for n in layers if n not in shifts}, batches, report))
    for name, layer in layers.items():
        layer.weight.add_(eps[name])
        if name in shifts:
            bias = layer.bias if layer.bias is not None else torch.zeros(layer.weight.shape[0])
            layer.bias = nn.Parameter(bias.detach() - shifts[name])
    return gm, report


def _empirical_shifts(gm: fx.GraphModule, eps: Dict[str, torch.Tensor], batches: Iterable,
                      report: DataFreeReport) -> Dict[str, torch.Tensor]:
    """Mean output shift of each layer in ``eps``, measured on the float model's real inputs."""
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    modules = dict(gm.named_modules())

    def hook(name):
        def record(module, inputs):
            shift = _output_shift(module, eps[name], inputs[0].detach())
            sums[name] = sums.get(name, 0) + shift * inputs[0].shape[0]
            counts[name] = counts.get(name, 0) + inputs[0].shape[0]
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in eps]
    try:
        for batch in batches:
            gm(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in handles:
            h.remove()
    for name in counts:
        report.corrected[name] = "empirical"
    return {name: sums[name] / counts[name] for name in counts}
