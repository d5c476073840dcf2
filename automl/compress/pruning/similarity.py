"""Data-free pruning by weight similarity (Srinivas & Babu, "Data-free parameter pruning for deep
neural networks", BMVC 2015), for the thinned structured path.

Two channels whose incoming weights are equal emit equal activations (after any elementwise
activation), so one of them can go and the next layers read the other twice: its outgoing weights
are added to its twin's and the network computes exactly what it did. For near-twins the error
grows with the saliency s(i, j) = <a_j^2> * ||w_j - w_i||^2 of removing channel j into channel i
(``a_j`` the weights that read j, ``w`` the incoming weights with the following BatchNorm folded in,
bias included). Channels are removed greedily, smallest saliency first, each folded into its twin
before the next choice. No data is touched.

The fold is exact in form only for a plain group: one producing conv/Linear (not grouped), at most
one BatchNorm (taken to follow the producer: conv-BN-activation, the usual order), and consumers
that are ordinary convs/Linears. Residual, concat-shared, depthwise,
grouped and gated groups are ranked by the same saliency but not folded (``foldable`` says why).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from automl.compress.pruning.channels import _param
from automl.compress.pruning.criteria import squared_distances
from automl.compress.pruning.thinning import NORMS, PRUNABLE


def _dense(m) -> bool:
    return isinstance(m, PRUNABLE) and getattr(m, "groups", 1) == 1


def foldable(members: Sequence[tuple]) -> str:
    """'' when the group's channels can be folded (see the module docstring), else why not."""
    producers = [m for m, side, *_ in members if side == "out" and isinstance(m, PRUNABLE)]
    norms = [m for m, side, *_ in members if side == "out" and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    others = [m for m, side, *_ in members if side == "out" and not isinstance(m, PRUNABLE) and m not in norms]
    consumers = [m for m, side, *_ in members if side == "in"]
    if len(producers) != 1 or not _dense(producers[0]) or others:
        return "its channels come from more than one layer, or from a grouped/depthwise one"
    if len(norms) > 1:
        return "its channels pass through more than one BatchNorm"
    if not consumers or not all(_dense(m) for m in consumers):
        return "a layer that reads its channels is grouped, depthwise or not a conv/Linear"
    return ""


def incoming(members: Sequence[tuple], channels: int) -> torch.Tensor:
    """(channels, features): each channel's producer weights and bias with its BatchNorm folded in
    (the affine map whose output the activation receives), concatenated over the producers."""
    scale, shift = _norm_affine(members, channels)
    rows = []
    for m, side, idxs, root in members:
        if side != "out" or not isinstance(m, PRUNABLE):
            continue
        idx, at = torch.tensor(list(idxs), dtype=torch.long), torch.tensor(list(root), dtype=torch.long)
        weight = _param(m, "weight").detach().index_select(0, idx).reshape(len(idx), -1).double()
        bias = _param(m, "bias")
        bias = bias.detach().index_select(0, idx).double() if isinstance(bias, torch.Tensor) else torch.zeros(len(idx))
        block = torch.cat([weight * scale[at, None], (bias * scale[at] + shift[at])[:, None]], 1)
        rows.append(torch.zeros(channels, block.shape[1], dtype=torch.float64).index_copy(0, at, block))
    return torch.cat(rows, 1)


def _norm_affine(members, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per group channel of its BatchNorm in eval mode: y = scale * x + shift with
    scale = gamma / sqrt(var + eps), shift = beta - scale * mean (1 and 0 without a norm)."""
    scale, shift = torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    for m, side, idxs, root in members:
        if side != "out" or not isinstance(m, NORMS) or getattr(m, "running_var", None) is None:
            continue
        idx, at = torch.tensor(list(idxs), dtype=torch.long), torch.tensor(list(root), dtype=torch.long)
        s = 1.0 / torch.sqrt(m.running_var.detach().double()[idx] + m.eps)
        gamma, beta = _param(m, "weight"), _param(m, "bias")
        if isinstance(gamma, torch.Tensor):
            s = s * gamma.detach().double()[idx]
        b = beta.detach().double()[idx] if isinstance(beta, torch.Tensor) else torch.zeros_like(s)
        scale[at], shift[at] = s, b - s * m.running_mean.detach().double()[idx]
    return scale, shift


def _columns(members: Sequence[tuple], channels: int) -> List[Tuple[torch.nn.Module, List[List[int]]]]:
    """Per consumer: the input columns that read each group channel, in order (a Linear after a
    flatten reads a channel through several columns; the k-th of one channel matches the k-th of another)."""
    out = []
    for m, side, idxs, root in members:
        if side != "in" or not isinstance(m, PRUNABLE):
            continue
        cols: List[List[int]] = [[] for _ in range(channels)]
        for i, r in zip(idxs, root):
            cols[r].append(int(i))
        out.append((m, cols))
    return out


def _reads(m, i: int, weight: torch.Tensor) -> torch.Tensor:
    """The weights of consumer ``m`` that read its input channel ``i`` (grouped and depthwise convs:
    the filters of i's group)."""
    groups = getattr(m, "groups", 1)
    if groups == 1:
        return weight[:, i]
    per, out_per = m.in_channels // groups, m.out_channels // groups
    return weight[(i // per) * out_per:(i // per + 1) * out_per, i % per]


def outgoing(members: Sequence[tuple], channels: int) -> torch.Tensor:
    """(channels, features): the consumers' weights that read each channel, concatenated (channels a
    consumer reads through fewer columns are zero-padded)."""
    parts = []
    for m, cols in _columns(members, channels):
        weight = _param(m, "weight").detach().double()
        rows = [[_reads(m, i, weight).flatten() for i in c] for c in cols]
        width = max((sum(r.numel() for r in row) for row in rows), default=0)
        block = torch.zeros(channels, width, dtype=torch.float64)
        for r, row in enumerate(rows):
            if row:
                flat = torch.cat(row)
                block[r, :flat.numel()] = flat
        parts.append(block)
    return torch.cat(parts, 1) if parts else torch.ones(channels, 1, dtype=torch.float64)


def twins(w: torch.Tensor, a: torch.Tensor, alive: torch.Tensor, keep: int) -> List[Tuple[int, int]]:
    """Greedy merges (removed j, twin i), in order, taking the ``alive`` channels down to ``keep``;
    each merge adds j's outgoing weights to i's before the next choice. Among equal saliencies the
    later channel goes. Each channel's nearest alive twin is kept up to date, so this is O(C^2)."""
    a, alive, merges = a.clone(), alive.clone(), []
    power, inf = a.pow(2).mean(1), float("inf")
    dist = squared_distances(w).fill_diagonal_(inf)
    dist[~alive, :] = inf  # a removed channel is nobody's twin
    near_d, near_i = dist.min(0)
    while int(alive.sum()) > max(keep, 1):
        cost = near_d * power
        cost[~alive | near_d.isinf()] = inf
        j = len(cost) - 1 - int(torch.argmin(cost.flip(0)))
        i = int(near_i[j])
        merges.append((j, i))
        a[i] += a[j]
        power[i] = a[i].pow(2).mean()
        alive[j], dist[j, :] = False, inf
        stale = (near_i == j) & alive
        if stale.any():
            near_d[stale], near_i[stale] = dist[:, stale].min(0)
    return merges


@torch.no_grad()
def fold(members: Sequence[tuple], channels: int, merges: Sequence[Tuple[int, int]]) -> None:
    """Add each removed channel's outgoing weights to its twin's, in the consumers' dense weights."""
    for m, cols in _columns(members, channels):
        weight = _param(m, "weight")
        for j, i in merges:
            for cj, ci in zip(cols[j], cols[i]):
                weight[:, ci] += weight[:, cj]


def unit_twins(members: Sequence[tuple], channels: int, alive: torch.Tensor, keep: int) -> Dict[str, object]:
    """Choose and fold the merges of one foldable group: {'keep': bool mask, 'merges': count}."""
    merges = twins(incoming(members, channels), outgoing(members, channels), alive, keep)
    fold(members, channels, merges)
    mask = alive.clone()
    for j, _ in merges:
        mask[j] = False
    return {"keep": mask, "merges": len(merges)}
