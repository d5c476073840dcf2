"""What pruning does to the deployed shapes, without training: the model a hardware profile prices.

Latency does not depend on weight values, so the candidate a profile prices is the architecture with
random weights and its pruning's structural effect: structured pruning that thins removes the same
share of channels in every coupled group (the ``uniform`` allocation), rounded to a multiple of
``round_to`` as the method rounds; layer pruning bypasses the first removable blocks. Other
allocations and criteria pick *which* channels go; the channel counts, and so the latency, are what
uniform gives. Masks-only pruning changes nothing a dense kernel sees.
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

from automl.compress.layers import select_layers
from automl.compress.pruning.allocation import ratio_for_mac_target, rounded_count
from automl.compress.pruning.groups import grid_step
from automl.compress.pruning.thinning import coupled_groups, thin

THINNING_GRANULARITIES = ("filter", "row", "channel", "column")


def thinned_count(channels: int, ratio: float, round_to: int = 1) -> int:
    """Channels a group keeps under uniform structured pruning: ``round(ratio * channels)`` go (at
    least one stays), then the count moves to a multiple of ``round_to`` as the method does
    (``allocation.rounded_count`` on the group's grid, ``groups.grid_step``), so the candidate has the
    shapes the method produces."""
    kept = channels - min(int(round(ratio * channels)), channels - 1)
    return rounded_count(kept, channels, grid_step(channels, round_to))


def thin_uniform(model: nn.Module, example, ratio: float, patterns, round_to: int = 1) -> nn.Module:
    """``model`` with every coupled group touching the selected layers thinned to ``thinned_count``."""
    chosen = set(select_layers(model, patterns))
    keep = {}
    for g in coupled_groups(model, example):
        if chosen.intersection(g.outputs) or chosen.intersection(g.inputs):
            kept = thinned_count(g.channels, ratio, round_to)
            if kept < g.channels:
                keep[g.root] = list(range(kept))
    return thin(model, example, keep) if keep else model


def structured_shape(model: nn.Module, example, cfg, notes: Dict) -> nn.Module:
    """The thinned shapes of a ``structured`` stage (unchanged when it only masks)."""
    if not (cfg.thin and cfg.granularity in THINNING_GRANULARITIES):
        return model
    ratio, round_to = cfg.ratio, cfg.round_to
    if cfg.mac_reduction:
        ratio, _ = ratio_for_mac_target(model, example, cfg.mac_reduction,
                                        lambda level: thin_uniform(model, example, level, cfg.layers, round_to))
    notes["thinned_ratio"] = float(ratio)
    return thin_uniform(model, example, ratio, cfg.layers, round_to)


def layer_shape(model: nn.Module, example, cfg, notes: Dict) -> nn.Module:
    """A ``layer`` stage's model: its first removable blocks bypassed."""
    from automl.compress.pruning import layerwise as lw

    candidates = lw.select_blocks(lw.removable_blocks(model, example, plain=cfg.plain), cfg.layers)
    count = lw.blocks_to_remove(cfg.blocks, len(candidates))
    chosen = lw.choose_blocks({n: float(i) for i, n in enumerate(candidates)}, count, candidates)
    lw.remove_blocks(model, [(n, candidates[n]) for n in chosen])
    notes["removed_blocks"] = list(chosen)
    return model


__all__ = ["layer_shape", "structured_shape", "thin_uniform", "thinned_count"]
