"""Ghost modules (Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020) made from a
trained convolution.

A k x k convolution with C outputs becomes a *primary* convolution with m = ceil(C / ratio) outputs
and a *cheap* depthwise d x d convolution that makes (ratio - 1) more maps from each primary map; the
two are concatenated (and cut to C). The outputs keep their order, so whatever reads the layer (its
BatchNorm, the next layer, a residual add) is untouched: channels 0..m-1 come from the primary
convolution, which keeps the trained filters of those channels, and channel m + c from the cheap
filter on primary map c // (ratio - 1). Each cheap filter (and its bias) is fitted by least squares
to the trained convolution's output on calibration inputs, then the model fine-tunes. MACs drop to
about 1/ratio of the layer's; on a CPU the two small convolutions and the concatenation can cost more
than they save, so the deployed latency is measured like every other method's.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.arch.ghost import GhostConv, ghost_conv
from automl.modelstats import forward_batches

MAX_ROWS = 50_000  # output positions used by the least-squares fit of one layer
RIDGE = 1e-4       # relative ridge on the fit's normal equations


def unsupported(conv: nn.Module, ratio: int) -> Optional[str]:
    """Why ``conv`` cannot become a ghost module, or None."""
    if not isinstance(conv, nn.Conv2d):
        return "not a Conv2d"
    if conv.groups != 1:
        return "grouped or depthwise (already cheap)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return "its padding is not a fixed zero padding"
    if conv.out_channels < ratio:
        return f"fewer than ratio = {ratio} output channels"
    return None


def build_ghost(conv: nn.Conv2d, ratio: int, dw_kernel: int) -> GhostConv:
    """A ghost module of ``conv``'s shape: the primary convolution holds the trained filters of the
    first m channels; the cheap filters start at zero (``fit_cheap`` sets them)."""
    ghost = ghost_conv(conv.in_channels, conv.out_channels, conv.kernel_size, ratio, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                       dw_kernel=dw_kernel).to(conv.weight.device, conv.weight.dtype)
    m = ghost.primary.out_channels
    with torch.no_grad():
        ghost.primary.weight.copy_(conv.weight[:m])
        if conv.bias is not None:
            ghost.primary.bias.copy_(conv.bias[:m])
        ghost.cheap.weight.zero_()
        ghost.cheap.bias.zero_()
    return ghost


@torch.no_grad()
def fit_cheap(ghost: GhostConv, conv: nn.Conv2d, inputs: torch.Tensor, seed: int = 0) -> float:
    """Least-squares cheap filters (with biases) so the ghost channels match ``conv``'s on ``inputs``;
    returns the relative error of the ghost module's output against ``conv``'s."""
    p, target = ghost.primary(inputs), conv(inputs)
    m, d = ghost.primary.out_channels, ghost.cheap.kernel_size[0]
    per = ghost.cheap.out_channels // m
    patches = F.unfold(p, d, padding=d // 2).reshape(p.shape[0], m, d * d, -1)  # (N, m, d*d, L)
    patches = patches.permute(0, 3, 1, 2).reshape(-1, m, d * d)                  # (rows, m, d*d)
    ghosts = target[:, m:].permute(0, 2, 3, 1).reshape(-1, target.shape[1] - m)  # (rows, C - m)
    if patches.shape[0] > MAX_ROWS:
        pick = torch.randperm(patches.shape[0], generator=torch.Generator().manual_seed(seed))[:MAX_ROWS]
        patches, ghosts = patches[pick], ghosts[pick]
    x = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=patches.dtype)], 2).double()
    gram = torch.einsum("rsk,rsl->skl", x, x)                                    # (m, k+1, k+1)
    gram += RIDGE * gram.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(d * d + 1, dtype=gram.dtype)
    for c in range(ghosts.shape[1]):
        src = c // per
        solution = torch.linalg.solve(gram[src], x[:, src].T @ ghosts[:, c].double())
        ghost.cheap.weight[c, 0] = solution[:-1].reshape(d, d).to(ghost.cheap.weight.dtype)
        ghost.cheap.bias[c] = solution[-1].to(ghost.cheap.bias.dtype)
    error = (ghost(inputs) - target).norm() / target.norm().clamp(min=1e-12)
    return float(error)


def layer_inputs(model: nn.Module, names: List[str], batches) -> Dict[str, torch.Tensor]:
    """The input of each named layer over ``batches`` (run in eval mode), each kept only up to about
    MAX_ROWS map positions: the fit needs no more, and a large model's maps would not fit in memory."""
    modules = dict(model.named_modules())
    seen: Dict[str, List[torch.Tensor]] = {n: [] for n in names}

    def keep(name, x):
        held = sum(t.shape[0] for t in seen[name]) * x[0, 0].numel()
        if held < MAX_ROWS:
            seen[name].append(x.detach()[:max(1, -(-(MAX_ROWS - held) // x[0, 0].numel()))])
    forward_batches(model, batches,
                    [modules[n].register_forward_hook(lambda mod, args, out, n=n: keep(n, args[0])) for n in names])
    return {n: torch.cat(v) for n, v in seen.items() if v}


def conv_macs(conv: nn.Module, shape) -> int:
    """Multiply-accumulates of a Conv2d (or of both halves of a ghost module) on an input of ``shape``."""
    if isinstance(conv, GhostConv):
        out = conv.primary(torch.zeros(1, *shape[1:]))
        return conv_macs(conv.primary, shape) + conv_macs(conv.cheap, out.shape)
    h, w = _out_hw(conv, shape)
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return conv.out_channels * h * w * k * conv.in_channels // conv.groups


def _out_hw(conv: nn.Conv2d, shape):
    pad, dil, ks, st = conv.padding, conv.dilation, conv.kernel_size, conv.stride
    return tuple((shape[2 + i] + 2 * pad[i] - dil[i] * (ks[i] - 1) - 1) // st[i] + 1 for i in range(2))
