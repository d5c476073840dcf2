"""The inference form of a fake-quantized (QAT, mixed, binary, ternary) model.

``freeze`` turns a model holding ``QuantLayer``s back into plain layers whose weights hold the
quantized values; ``simulated_model`` then puts a frozen activation fake-quantizer
(:class:`ActFakeQuant`) in front of each layer whose input was quantized in training. The result
computes exactly what the trained fake-quantized model computes in eval mode, exports to ONNX as
ordinary float ops (Div/Round/Clip/Mul), and is an accuracy reference only: it runs in float,
slightly slower than fp32.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from automl.compress.layers import PRUNABLE
from automl.compress.quantization import qmath
from automl.compress.quantization.fake_quant import LSQQuantizer, PACTQuantizer
from automl.compress.quantization.qat import qat_layers


class ActFakeQuant(nn.Module):
    """x -> (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale, frozen."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("zero_point", torch.tensor(float(zero_point)))
        self.qmin, self.qmax = int(qmin), int(qmax)

    @classmethod
    def from_quantizer(cls, quantizer: nn.Module) -> "ActFakeQuant":
        """The grid a trained activation quantizer (LSQ, PACT or STE) uses in eval mode."""
        scale, zero_point = quantizer.qparams()
        scale, zero_point = float(torch.as_tensor(scale).max()), int(torch.as_tensor(zero_point).max())
        if isinstance(quantizer, LSQQuantizer):
            qmin, qmax = -quantizer.qn, quantizer.qp
        elif isinstance(quantizer, PACTQuantizer):  # PACT clips to [-alpha, alpha] or [0, alpha]
            qmin, qmax = (-quantizer.steps if quantizer.signed else 0), quantizer.steps
        else:
            qmin, qmax = qmath.qrange(quantizer.bits, quantizer.signed)
        return cls(scale, zero_point, qmin, qmax)

    def forward(self, x):
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}, range=[{self.qmin}, {self.qmax}]"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted ``name`` (a leading ``module.`` tolerated); returns the old module."""
    full = name if name in dict(model.named_modules()) else "module." + name
    parent, _, attr = full.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    old = getattr(holder, attr)
    setattr(holder, attr, new)
    return old


def first_and_last(model: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """Names of the first and last Conv/Linear layers in module order."""
    names = [n.removeprefix("module.") for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    return (names[0], names[-1]) if names else (None, None)


@dataclass
class FrozenLayer:
    """What a fake-quantized layer was trained with: bit-widths and its input grid (None: float input)."""

    w_bits: int
    a_bits: Optional[int]
    act: Optional[ActFakeQuant]


def _input_quant_hook(module, args):
    return (module.input_quant(args[0]),) + tuple(args[1:])


def freeze(model: nn.Module) -> Dict[str, FrozenLayer]:
    """In place: every ``QuantLayer`` gives way to its own layer, whose weight now holds the quantized
    values, at the same name; an input grid stays active as ``layer.input_quant`` (a forward pre-hook).

    The model then has ordinary Conv/Linear layers under their original names, so stages that finish
    later (e.g. a pruning stage that thins layers at finalize) work on it unchanged.
    """
    frozen: Dict[str, FrozenLayer] = {}
    for name, ql in qat_layers(model).items():
        layer, was_training = ql.layer, ql.training
        ql.eval()
        with torch.no_grad():
            layer.weight.copy_(ql.weight_quant(layer.weight))
        act = ActFakeQuant.from_quantizer(ql.act_quant) if ql.act_quant is not None and ql.a_bits else None
        frozen[name] = FrozenLayer(ql.w_bits, ql.a_bits, act)
        layer.train(was_training)
        replace_module(model, name, layer)
        if act is not None:
            layer.input_quant = act
            layer.register_forward_pre_hook(_input_quant_hook)
    return frozen


def unfreeze_inputs(model: nn.Module) -> None:
    """Drop the input pre-hooks that :func:`freeze` added (the grids stay in the FrozenLayer records)."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _input_quant_hook:
                del module._forward_pre_hooks[key]
        module._modules.pop("input_quant", None)


def simulated_model(model: nn.Module, frozen: Dict[str, FrozenLayer]) -> nn.Module:
    """A copy of a frozen model with each quantized input as an ``ActFakeQuant`` in front of its layer
    (``<name>.act``; the weight moves to ``<name>.layer.weight``). Layers that no longer exist (removed
    by a later stage) are skipped."""
    unfreeze_inputs(model)
    simulated = copy.deepcopy(model)
    present = {n.removeprefix("module.") for n, m in simulated.named_modules() if isinstance(m, PRUNABLE)}
    for name, entry in frozen.items():
        if entry.act is None or name not in present:
            continue
        layer = simulated.get_submodule(name if name in dict(simulated.named_modules()) else "module." + name)
        replace_module(simulated, name, nn.Sequential(OrderedDict(act=copy.deepcopy(entry.act), layer=layer)))
    return simulated.eval()


def average_bits(frozen: Dict[str, FrozenLayer], model: nn.Module) -> float:
    """Parameter-weighted average weight bit-width of the quantized layers still in ``model``."""
    sizes = {n.removeprefix("module."): m.weight.numel() for n, m in model.named_modules()
             if isinstance(m, PRUNABLE)}
    names = [n for n in frozen if n in sizes]
    return sum(sizes[n] * frozen[n].w_bits for n in names) / max(sum(sizes[n] for n in names), 1)


def ship_packed(model: nn.Module, path, stats: Dict) -> Path:
    """Write the quantized ``model`` as packed low-bit weights at ``path``, check that it reloads to the
    very same tensors, and add ``packed_kb``, ``packed_ratio`` (float32 bytes / file bytes) and
    ``packed_bits`` (per packed weight) to ``stats``. Returns the path."""
    from automl.compress.coding.deepcomp_format import read_compressed, save_packed
    from automl.errors import LifecycleError

    report = save_packed(model, path)
    _, tensors = read_compressed(path)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(tensors[k], v.detach().cpu())]
    if changed:  # never expected: the file must hold the weights that were measured
        raise LifecycleError(f"the packed file does not reload exactly: {', '.join(changed[:3])}")
    stats.update({"packed_kb": report.file_bytes / 1024.0, "packed_ratio": report.ratio,
                  "packed_bits": ",".join(f"{layer.layer}:{layer.clusters.bit_length() - 1}"
                                          for layer in report.layers)})
    return path
