"""Low-rank factorization of Linear and Conv2d layers.

- Linear (out x in) -> Linear(in, r) then Linear(r, out): truncated SVD, sqrt(S) split evenly.
- Conv2d, ``spatial`` (Jaderberg et al. 2014, scheme 2): a k_h x k_w conv becomes a (k_h x 1) conv
  with r filters then a (1 x k_w) conv, from the SVD of the kernel reshaped to (C*k_h) x (N*k_w).
- Conv2d, ``tucker2`` (Kim et al. 2016): 1x1 (C -> r_in), k x k core (r_in -> r_out), 1x1
  (r_out -> N), from a truncated HOSVD along the two channel modes.

Ranks come from a :class:`RankRule`: ``energy:<share>`` keeps the smallest rank whose squared
singular values hold that share; ``macs:<ratio>`` the largest rank whose MACs are at most that
share of the layer's; ``rank:<r>`` a fixed rank. A layer is replaced only when its MACs go down.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from automl.compress.layers import select_layers
from automl.errors import ConfigError
from automl.modelstats import forward_with_hooks

RULES = ("energy", "macs", "rank")
CONV_SCHEMES = ("spatial", "tucker2")


@dataclass(frozen=True)
class RankRule:
    kind: str
    value: float

    @classmethod
    def parse(cls, rule: Union[str, Tuple[str, float], "RankRule"]) -> "RankRule":
        """Accepts ``"energy:0.9"``, ``("macs", 0.5)`` or a RankRule; checks the value's range."""
        if isinstance(rule, RankRule):
            kind, value = rule.kind, rule.value
        elif isinstance(rule, str) and ":" in rule:
            kind, text = rule.split(":", 1)
            try:
                value = float(text)
            except ValueError:
                raise ConfigError("rank rule value is not a number", key="rank_rule", value=rule,
                                  fix="write e.g. energy:0.9, macs:0.5 or rank:8") from None
        elif isinstance(rule, tuple) and len(rule) == 2:
            kind, value = rule
        else:
            raise ConfigError("malformed rank rule", key="rank_rule", value=rule,
                              fix="write e.g. energy:0.9, macs:0.5 or rank:8")
        if kind not in RULES:
            raise ConfigError("unknown rank rule", key="rank_rule", value=rule,
                              fix=f"use one of {', '.join(RULES)}")
        ok = {"energy": 0 < value <= 1, "macs": 0 < value < 1,
              "rank": value >= 1 and float(value).is_integer()}[kind]
        if not ok:
            fix = {"energy": "a share in (0, 1]", "macs": "a ratio in (0, 1)",
                   "rank": "a whole number >= 1"}[kind]
            raise ConfigError(f"rank rule '{kind}' out of range", key="rank_rule", value=rule,
                              fix=f"use {fix}")
        return cls(kind, float(value))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose squared singular values hold ``energy`` of the total."""
    power = singular_values.detach().to(torch.float64) ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    return min(int((cumulative < energy * (1 - 1e-12)).sum()) + 1, len(power))


def _svd(matrix: torch.Tensor):
    return torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)


def svd_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Linear(in, rank) then Linear(rank, out); exact at rank = min(in, out)."""
    u, s, vh = _svd(layer.weight)
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    _load(first, root[:, None] * vh[:rank], None, layer.weight)
    _load(second, u[:, :rank] * root, layer.bias, layer.weight)
    return nn.Sequential(first, second)


def _spatial_matrix(conv: nn.Conv2d) -> torch.Tensor:
    n, c, kh, kw = conv.weight.shape
    return conv.weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)  # rows (c, i), columns (n, j)


def spatial_svd_conv(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """(k_h x 1) conv with ``rank`` filters, then (1 x k_w) conv; exact at full rank."""
    n, c, kh, kw = conv.weight.shape
    u, s, vh = _svd(_spatial_matrix(conv))
    root = s[:rank].sqrt()
    vertical = nn.Conv2d(c, rank, (kh, 1), stride=(conv.stride[0], 1), padding=(conv.padding[0], 0),
                         dilation=(conv.dilation[0], 1), bias=False)
    horizontal = nn.Conv2d(rank, n, (1, kw), stride=(1, conv.stride[1]), padding=(0, conv.padding[1]),
                           dilation=(1, conv.dilation[1]), bias=conv.bias is not None)
    v = (u[:, :rank] * root).reshape(c, kh, rank).permute(2, 0, 1)[..., None]
    h = (root[:, None] * vh[:rank]).reshape(rank, n, kw).permute(1, 0, 2)[:, :, None, :]
    _load(vertical, v, None, conv.weight)
    _load(horizontal, h, conv.bias, conv.weight)
    return nn.Sequential(vertical, horizontal)


def _tucker_factors(conv: nn.Conv2d):
    n, c = conv.weight.shape[:2]
    u_out, s_out, _ = _svd(conv.weight.reshape(n, -1))
    u_in, s_in, _ = _svd(conv.weight.transpose(0, 1).reshape(c, -1))
    return u_out, s_out, u_in, s_in


def tucker2_conv(conv: nn.Conv2d, ranks: Tuple[int, int]) -> nn.Sequential:
    """1x1 (C -> r_in), core (r_in -> r_out, the conv's geometry), 1x1 (r_out -> N); ranks = (r_in, r_out)."""
    r_in, r_out = ranks
    n, c, kh, kw = conv.weight.shape
    u_out, _, u_in, _ = _tucker_factors(conv)
    u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
    core = torch.einsum("ncij,nr,cs->rsij", conv.weight.detach().to(torch.float64), u_out, u_in)
    first = nn.Conv2d(c, r_in, 1, bias=False)
    middle = nn.Conv2d(r_in, r_out, (kh, kw), stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, bias=False)
    last = nn.Conv2d(r_out, n, 1, bias=conv.bias is not None)
    _load(first, u_in.T[..., None, None], None, conv.weight)
    _load(middle, core, None, conv.weight)
    _load(last, u_out[..., None, None], conv.bias, conv.weight)
    return nn.Sequential(first, middle, last)


def _load(module, weight, bias, like):
    with torch.no_grad():
        module.weight.copy_(weight.to(like.dtype))
        if bias is not None:
            module.bias.copy_(bias)
    module.to(like.device)


@dataclass(frozen=True)
class LayerFactorization:
    """What happened to one selected layer (``factorized`` False: kept, ``reason`` says why)."""

    layer: str
    scheme: str  # svd (Linear), spatial or tucker2 (Conv2d), "-" when unsupported
    factorized: bool
    rank: Union[int, Tuple[int, int], None]  # tucker2: (r_in, r_out)
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    reason: str = ""


def _shapes(model, layers, example):
    """Per-sample input/output shapes of each selected layer, from one forward pass."""
    seen = {}

    def record(name):
        def hook(module, inputs, output):  # returns None: a hook's return value replaces the output
            seen.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))
        return hook

    forward_with_hooks(model, example, {module: record(name) for name, module in layers.items()})
    return seen


def _plan_linear(layer, rule, shapes):
    out_shape = shapes[1] if shapes else (1, layer.out_features)
    rows = max(1, _numel(out_shape[1:]) // layer.out_features)  # tokens per sample
    m, n = layer.out_features, layer.in_features
    full = min(m, n)
    macs = lambda r: rows * r * (m + n)  # noqa: E731
    if rule.kind == "energy":
        rank = rank_for_energy(torch.linalg.svdvals(layer.weight.detach().double()), rule.value)
    elif rule.kind == "macs":
        rank = int(rule.value * rows * m * n // macs(1))
    else:
        rank = int(rule.value)
    rank = min(rank, full)
    bias = m if layer.bias is not None else 0
    return "svd", rank, rows * m * n, macs(max(rank, 0)), m * n + bias, max(rank, 0) * (m + n) + bias


def _plan_conv(conv, rule, shapes, scheme):
    n, c, kh, kw = conv.weight.shape
    (hi, wi), (ho, wo) = shapes[0][-2:], shapes[1][-2:]
    bias = n if conv.bias is not None else 0
    before = n * c * kh * kw * ho * wo
    params_before = n * c * kh * kw + bias
    if scheme == "spatial":
        per_rank = c * kh * ho * wi + n * kw * ho * wo
        full = min(c * kh, n * kw)
        if rule.kind == "energy":
            rank = rank_for_energy(torch.linalg.svdvals(_spatial_matrix(conv).detach().double()), rule.value)
        elif rule.kind == "macs":
            rank = int(rule.value * before // per_rank)
        else:
            rank = int(rule.value)
        rank = min(rank, full)
        return scheme, rank, before, rank * per_rank, params_before, rank * (c * kh + n * kw) + bias
    macs = lambda ri, ro: ri * c * hi * wi + ro * ri * kh * kw * ho * wo + n * ro * ho * wo  # noqa: E731
    if rule.kind == "energy":
        _, s_out, _, s_in = _tucker_factors(conv)
        ranks = (rank_for_energy(s_in, rule.value), rank_for_energy(s_out, rule.value))
    elif rule.kind == "macs":  # shrink both channel ranks in proportion to the layer's widths
        ranks = (0, 0)
        for r_out in range(n, 0, -1):
            r_in = max(1, min(c, round(r_out * c / n)))
            if macs(r_in, r_out) <= rule.value * before:
                ranks = (r_in, r_out)
                break
    else:
        ranks = (min(int(rule.value), c), min(int(rule.value), n))
    r_in, r_out = ranks
    params = r_in * c + r_out * r_in * kh * kw + n * r_out + bias
    return scheme, ranks, before, macs(r_in, r_out), params_before, params


def _numel(shape) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def _unsupported(module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not factorized (only Linear and Conv2d)"
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups}) is not factorized"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return "only explicit zero padding is supported"
    return None


def factorize(model: nn.Module, layers: Iterable[str] = ("re:.*",), rank_rule="energy:0.9", *,
              conv: str = "spatial", example: Optional[torch.Tensor] = None
              ) -> Tuple[nn.Module, List[LayerFactorization]]:
    """A deep copy of ``model`` with the selected layers factorized, and one report per layer.

    ``example`` (a batch of inputs) gives each layer's spatial size; it is required when a Conv2d
    is selected, because a conv's MACs depend on its feature-map size.
    """
    rule = RankRule.parse(rank_rule)
    if conv not in CONV_SCHEMES:
        raise ConfigError("unknown convolution scheme", key="conv", value=conv,
                          fix=f"use one of {', '.join(CONV_SCHEMES)}")
    new = copy.deepcopy(model)
    chosen = select_layers(new, layers)
    if example is None and any(isinstance(m, nn.Conv2d) for m in chosen.values()):
        raise ConfigError("factorizing a Conv2d needs an example input to count its MACs", key="example",
                          fix="pass example=task.example_input() (any batch of valid inputs)")
    shapes = _shapes(new, chosen, example) if example is not None else {}
    report = []
    for name, module in chosen.items():
        params = sum(p.numel() for p in module.parameters())
        reason = _unsupported(module)
        if reason is None and example is not None and name not in shapes:
            reason = "layer not reached by the example forward pass"
        if reason:
            report.append(LayerFactorization(name, "-", False, None, params, params, 0, 0, reason))
            continue
        if isinstance(module, nn.Linear):
            plan = _plan_linear(module, rule, shapes.get(name))
        else:
            plan = _plan_conv(module, rule, shapes[name], conv)
        scheme, rank, macs_before, macs_after, params_before, params_after = plan
        too_small = min(rank) < 1 if isinstance(rank, tuple) else rank < 1
        if too_small or macs_after >= macs_before:
            why = ("the MAC target is below rank 1" if too_small else
                   f"rank {rank} does not reduce MACs ({macs_after} >= {macs_before})")
            report.append(LayerFactorization(name, scheme, False, rank, params_before, params_before,
                                             macs_before, macs_before, why))
            continue
        if scheme == "svd":
            replacement = svd_linear(module, rank)
        elif scheme == "spatial":
            replacement = spatial_svd_conv(module, rank)
        else:
            replacement = tucker2_conv(module, rank)
        replacement.train(module.training)
        _replace(new, name, replacement)
        report.append(LayerFactorization(name, scheme, True, rank, params_before, params_after,
                                         macs_before, macs_after))
    return new, report


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    full = name if name in dict(model.named_modules()) else "module." + name
    parent_name, _, child = full.rpartition(".")
    setattr(model.get_submodule(parent_name), child, replacement)
