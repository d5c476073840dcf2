"""Structured pruning: filters/channels thinned for a real speed-up, or kernel/row/column/block masks.

Thinned path (granularity filter/row or channel/column, ``thin: true``). Decisions are made per
structure group (``thinning.coupled_groups``): every layer coupled by a residual add, concat,
depthwise/grouped conv, BN or SE gating loses the same channels. A group is pruned when one of its
producers (filter/row) or consumers (channel/column) is selected; its coupled layers follow. The
granularity picks the side that is scored: filter = the producing filters, channel = the
consuming input columns. While fine-tuning, a pruned channel is zeroed in every producer --
filter, bias, BN gamma and beta -- so it emits exactly 0 and the masked model computes what the
thinned one will. At finalize the channels are cut and the smaller model is returned.

Masks-only path (kernel, block, or ``thin: false``): each selected layer is masked on its own; no
speed-up, and the stats say so. Either way the classifier's outputs are never pruned.

Criteria per channel: l1/l2/fpgm on the concatenated slices of the side's dense weights (for l1 the
sum that thinning.group_channel_scores gives; l2 is the group's L2 norm); taylor = |sum(w * grad)|
over what the side's masks zero (filter: producers' weights, biases and BN; channel: the columns),
gradients summed over ``calib_batches`` in eval mode; obd = sum(0.5 * F * w^2) over the same, F the
diagonal Fisher (fisher.py); apoz/mean_activation on the rectified BN output
of each producer, pooled over the group's producers; bn_scale = sum of |gamma| (groups without BN
are left alone); random, seeded by the run's seed; similarity (data-free, Srinivas & Babu) ranks a
channel by how closely another one duplicates it and folds each removed channel's outgoing weights
into that twin (similarity.py; hard mode, thinned path only). ``allocation``, ``round_to`` and
``mac_reduction``: see allocation.py (the grid per group: groups.grid_step; ``sampled``: sampled.py).
Scoring lives in structured_scores.py.

Third-party graphs (structured_checks.py, at prepare, before any training): a group Torch-Pruning
traces wrongly (channel shuffle, a slice that cuts channels ...; see groups.py) is left whole and
listed in stats structured_skipped / structured_groups_skipped, or refused when one of its layers is
named exactly in ``layers``; the thinned model is checked against the masked one on a synthetic
keep; a ``mac_reduction`` the remaining groups cannot reach is a ConfigError. stats mac_reduction is
always the reduction reached (1.0 for masks only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn as nn

from automl.compress.base import register_method
from automl.compress.pruning.shapes import structured_shape
from automl.compress.pruning.sampled import multiplier_keeper, sample_allocation
from automl.compress.pruning.similarity import foldable, unit_twins
from automl.compress.pruning.allocation import ALLOCATIONS, allocate, layer_macs
from automl.compress.pruning.base import PruningConfig, PruningMethod
from automl.compress.pruning.channels import ChannelMaskSet, MacModel, _norm_after, _param, channel_keep, parity
from automl.compress.pruning.criteria import CRITERIA
from automl.compress.pruning.granularity import _check_block, expand_mask, group_view
from automl.compress.pruning.groups import grid_step
from automl.compress.pruning.masks import MaskSet
from automl.compress.pruning.structured_checks import GroupChecks
from automl.compress.pruning.structured_scores import StructuredScoring
from automl.compress.pruning.thinning import NORMS, PRUNABLE, coupled_groups, thin_from_masks
from automl.configs import option
from automl.errors import ConfigError
from automl.registry import unknown_name
from automl.modelstats import count_macs, count_params

GRANULARITIES = ("filter", "channel", "kernel", "row", "column", "block")
CHANNEL_WISE = ("filter", "row", "channel", "column")
SAME_CUT = {"row": "filter", "column": "channel"}  # one cut, named for Linear or for conv
SPREAD = 0.7  # allocation sampled: each group's multiplier on the shared level lies in [0.3, 1.7]


@dataclass(frozen=True)
class StructuredPruningConfig(PruningConfig):
    ratio: float = option(0.5, low=0.0, high=1.0, high_open=True,
                          doc="share of structures removed (energy: cost-weighted share; see allocation)")
    granularity: str = option("filter", choices=GRANULARITIES, doc="what one structure is")
    criterion: str = option("l1", choices=tuple(CRITERIA.names()), doc="importance score per structure")
    block: str = option("1x4", doc="block shape 'HxW' of the 2-D weight view, for granularity block")
    allocation: str = option("uniform", choices=ALLOCATIONS, doc="how the level is shared among groups/layers")
    mac_reduction: float = option(0.0, low=0.0, high=1000.0,
                                  doc="if > 0: divide MACs by this (e.g. 2.0) instead of using ratio")
    thin: bool = option(True, doc="filter/channel: physically remove the pruned channels at finalize")
    round_to: int = option(16, low=1, high=1024, doc="thinned: kept channels per group are a multiple of this "
                           "(onnxruntime's CPU kernels use blocks of 8/16 channels; 1 = no rounding)")
    layer_sensitivity: Dict[str, float] = option({}, low=0.0, doc="energy allocation: per-layer sensitivity, e.g. "
                                                 "the accuracy drop at a probe level; sensitive layers lose less")
    cost: str = option("macs", choices=("macs", "latency", "energy"), doc="energy allocation: what a group costs -- "
                       "its layers' MACs, or their latency / energy priced by `profile`")
    profile: str = option("auto", doc="cost latency/energy: the hardware profile YAML that prices the layers "
                          "('auto': the search's profile, else the shipped profile measured on this CPU)")
    calib_batches: int = option(4, low=1, high=10_000, doc="training batches of 128 for taylor/apoz/mean_activation "
                                "and the sampled allocation (obd: as many samples in batches of 16)")
    candidates: int = option(24, low=2, high=10_000, doc="allocation sampled: random allocations scored at the "
                             "MAC target (the first is uniform)")


def parse_block(text: str):
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(text))
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ConfigError("block must be written HxW with positive integers", key="block", value=text,
                          fix="write e.g. '1x4' or '4x4'")
    return int(match[1]), int(match[2])


@register_method("structured", "pruning", StructuredPruningConfig)
class StructuredPruning(GroupChecks, StructuredScoring, PruningMethod):
    """Units are structure groups (thinned path) or layers (masks only); see the module docstring."""

    deployed_shape = classmethod(lambda cls, model, example, config, notes: structured_shape(model, example, config,
                                                                                             notes))

    # setup -------------------------------------------------------------------------------------------
    def _prepare(self, model, ctx):
        cfg = self.config
        self.block = parse_block(cfg.block)
        self.grouped = cfg.thin and cfg.granularity in CHANNEL_WISE
        self.cut = SAME_CUT.get(cfg.granularity, cfg.granularity)
        self.side = "in" if self.cut == "channel" else "out"
        if 0 < cfg.mac_reduction <= 1:
            raise ConfigError("mac_reduction is a factor above 1 (or 0 to use ratio)", key="mac_reduction",
                              value=cfg.mac_reduction, fix="use e.g. 2.0 for half the MACs")
        if cfg.mac_reduction and not self.grouped:
            raise ConfigError("mac_reduction needs thinned channels", key="mac_reduction", value=cfg.mac_reduction,
                              fix="use granularity filter/channel with thin: true, or set ratio instead")
        needs = CRITERIA.get(cfg.criterion, key="criterion").needs
        if needs in ("activations", "bn_weight") and not self.grouped and cfg.granularity not in ("filter", "row"):
            raise ConfigError(f"criterion {cfg.criterion} scores output channels", key="granularity",
                              value=cfg.granularity, fix="use granularity filter/row, or channel with thin: true")
        if cfg.criterion == "similarity" and not (self.grouped and cfg.mode == "hard"):
            raise ConfigError("criterion similarity folds each removed channel into its twin once: it needs "
                              "thinned channels in hard mode", key="criterion", value=cfg.criterion,
                              fix="use granularity filter/channel with thin: true and mode: hard, or another criterion")
        if cfg.cost != "macs" and cfg.allocation != "energy":
            raise ConfigError(f"cost {cfg.cost} weighs the groups of the energy allocation only", key="cost",
                              value=cfg.cost, fix="set allocation: energy, or leave cost at macs")
        if cfg.allocation == "sampled" and not (cfg.mac_reduction and self.grouped):
            raise ConfigError("allocation sampled compares allocations at one MAC target", key="allocation",
                              value=cfg.allocation, fix="set mac_reduction (e.g. 2.0) with thinned channels, "
                              "or use allocation uniform / global")
        self.batches, self.skipped, self.last_keep, self.groups_skipped = None, [], {}, 0
        self.merges, self.unfolded, self.sampled = 0, set(), None
        model = super()._prepare(model, ctx)
        if cfg.allocation == "energy" and cfg.cost != "macs":
            self._priced(model)  # a missing profile or an unpriced layer fails now, before any training
        return model

    def _example(self):
        task = getattr(self.ctx, "task", None)
        if task is None:
            raise ConfigError("structured pruning needs the task's example input to trace the model",
                              key="method", value="structured", fix="run it through a task (automl apply/search)")
        return task.example_input(1)

    def _mask_set(self, model):
        names = {m: n for n, m in model.named_modules()}
        example = self._example() if (self.grouped or self.config.granularity in ("filter", "row")
                                      or self.config.allocation == "energy") else None
        groups = coupled_groups(model, example, include_blocked=self.grouped) if example is not None else []
        self._all_layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
        self.example, self.layer_macs = example, layer_macs(model, example) if example is not None else {}
        if self.grouped:
            self.units = self._select_groups(model, groups, names)
            self._check_thinning(model)
            if self.config.mac_reduction:
                self._check_reachable(model)
            masked = {n: m for u in self.units.values() for n, m, *_ in u["producers"]}
            return ChannelMaskSet(masked, mode=self.config.mode)
        groups = [g for g in groups if not g.blocked]
        producers = {n for g in groups for n in g.outputs}
        heads = {n for n in self.layers if n not in producers} if groups else set()
        self.units = {}
        for name, module in self.layers.items():
            why = self._inapplicable(model, name, module, heads)
            if why:
                if name in self.config.layers:  # named exactly, not by a pattern: a mistake
                    raise ConfigError(f"layer cannot be pruned at granularity {self.config.granularity}: {why}",
                                      key="layers", value=name, fix="choose another granularity or layer")
                self.skipped.append(name)
            else:
                self.units[name] = module
        if not self.units:
            raise ConfigError("no selected layer can be pruned at this granularity", key="layers",
                              value=list(self.layers), fix=f"skipped: {', '.join(self.skipped)}")
        return MaskSet(self.units, mode=self.config.mode)

    def _inapplicable(self, model, name, module, heads) -> str:
        g = self.config.granularity
        if g == "kernel" and isinstance(module, nn.Linear):
            return "kernels exist only in convolutions"
        if g in ("filter", "row") and name in heads:
            return "its outputs are the model's outputs"
        if g == "block":
            try:
                _check_block(self.block, tuple(module.weight.shape))
            except ConfigError as exc:
                return exc.message
        if self.config.criterion == "bn_scale" and _norm_after(model, name) is None:
            return "no BatchNorm follows it"
        return ""

    def _select_groups(self, model, groups, names) -> Dict[str, dict]:
        units = {}
        for g in groups:
            layers = [names[m] for m, side, *_ in g.members if isinstance(m, PRUNABLE) and (
                side == self.side or (self.side == "in" and m.groups == m.out_channels > 1))]
            hit = sorted({n for n in layers if n in self.layers})
            producers = [(names[m], m, idxs, root) for m, side, idxs, root in g.members
                         if side == "out" and isinstance(_param(m, "weight"), torch.Tensor)]
            if not hit:
                continue
            if g.blocked:
                self._skip_group(g, g.blocked)
                continue
            if self.config.criterion == "bn_scale" and not any(isinstance(m, NORMS) for _, m, *_ in producers):
                self.skipped.append(g.root)
                continue
            units[g.root] = {"group": g, "layers": hit, "producers": producers}
        # the kept-channel grid of each group: round_to per block (see groups.grid_step); the blocks
        # of a grouped conv must each keep as many channels as the others
        self.grids = {u: (grid_step(len(unit["group"].blocks[0]) if unit["group"].blocks else unit["group"].channels,
                                    self.config.round_to), unit["group"].blocks) for u, unit in units.items()}
        if not units:
            skipped = f"; skipped: {'; '.join(self.skipped[:5])}" if self.skipped else ""
            raise ConfigError("no structure group to prune among the selected layers", key="layers",
                              value=list(self.layers)[:10], fix="select layers whose outputs feed other layers "
                              f"(the classifier's outputs are never pruned; bn_scale needs a BatchNorm){skipped}")
        return units

    # events ------------------------------------------------------------------------------------------
    def _event(self, model, progress: float):
        self._progress = progress
        super()._event(model, progress)
        self.last_keep = self._structure_keep()  # what the masks now hold (hard mode intersects)

    def _structure_keep(self) -> Dict[str, torch.Tensor]:
        masks = self.masks.masks()
        if self.grouped:
            return {u: self._unit_keep(unit, masks) for u, unit in self.units.items()}
        return {n: group_view(masks[n], self.cut, self.block).any(1) for n in self.units}

    def _masks(self, weights, levels, model):
        scores = self._group_scores(model) if self.grouped else self._layer_scores(model, weights)
        hard = self.config.mode == "hard"
        previous = self._structure_keep()
        if hard:  # what is pruned goes first: rankings stay nested across events
            scores = {u: s.float().masked_fill(~previous[u], float("-inf")) for u, s in scores.items()}
        fixed, shared = self._levels(levels)
        if self.config.allocation == "sampled" and self.sampled is None:
            self.sampled = sample_allocation(self, model, scores, fixed, SPREAD)
        keep_at = self._keeper(model, scores, fixed, previous if hard else None)
        if self.config.mac_reduction:
            keep, final, _ = self._keep_for_target(scores, keep_at)
            if self._progress < 1.0:
                keep = keep_at(self.level(final, self._progress))
        else:
            keep = keep_at(shared)
        if self.grouped and self.config.criterion == "similarity":
            keep = self._fold_twins(keep, previous)
        if self.grouped:
            return self._producer_masks(keep)
        return {n: expand_mask(k, weights[n].shape, self.cut, self.block) for n, k in keep.items()}

    def _fold_twins(self, keep, previous):
        """similarity: each foldable unit loses as many channels as ``keep`` says, chosen greedily
        and folded into their twins (similarity.py); other units keep the ranking's choice."""
        out = dict(keep)
        for u, unit in self.units.items():
            g = unit["group"]
            if g.blocks or foldable(g.members):
                self.unfolded.add(u)
                continue
            chosen = unit_twins(g.members, g.channels, previous[u], int(keep[u].sum()))
            out[u] = chosen["keep"]
            self.merges += chosen["merges"]
        return out

    def _keeper(self, model, scores, fixed, previous):
        """keep_at(level) -> {unit: keep mask}: the allocation on each unit's grid, intersected with
        ``previous`` (hard mode: nothing comes back)."""
        cfg = self.config
        costs = self._costs(model) if cfg.allocation == "energy" else None
        sensitivity = self._sensitivity() if cfg.allocation == "energy" else None
        chosen = multiplier_keeper(scores, self.sampled and self.sampled["multipliers"], fixed, self.grids) \
            if cfg.allocation == "sampled" else None

        def keep_at(level):
            keep = chosen(level) if chosen else allocate(
                scores, level, cfg.allocation, costs=costs, sensitivity=sensitivity, fixed=fixed,
                grids=self.grids if self.grouped else None)
            return {u: k & previous[u] for u, k in keep.items()} if previous is not None else keep
        return keep_at

    def _levels(self, levels):
        """({unit: level} for units with a per_layer override, the shared level of the rest)."""
        layers = {u: (unit["layers"] if self.grouped else [u]) for u, unit in self.units.items()}
        fixed = {u: max(levels[n] for n in ls) for u, ls in layers.items() if any(n in self.overrides for n in ls)}
        rest = [n for n in levels if n not in self.overrides]
        return fixed, (levels[rest[0]] if rest else 0.0)

    def _sensitivity(self):
        """{unit: the largest layer_sensitivity among its layers}, for the units that have one."""
        given = self.config.layer_sensitivity
        known = {n for unit in self.units for n in self._unit_layers(unit)}
        unknown = [n for n in given if n not in known]
        if unknown:
            raise unknown_name("layer in layer_sensitivity", unknown[0], sorted(known), key="layer_sensitivity")
        out = {u: max(given[n] for n in self._unit_layers(u) if n in given) for u in self.units
               if any(n in given for n in self._unit_layers(u))}
        return out or None

    def _unit_layers(self, unit):
        return self.units[unit]["layers"] if self.grouped else [unit]

    def _costs(self, model):
        """{unit: cost}: the MACs (or, with ``cost`` latency/energy, the profile's price) of its layers."""
        per_layer = self.layer_macs if self.config.cost == "macs" else self._priced(model)
        if not self.grouped:
            return {n: per_layer.get(n, 0) for n in self.units}
        return {u: sum(per_layer.get(n, 0) for n in {**dict.fromkeys(unit["group"].outputs),
                                                      **dict.fromkeys(unit["group"].inputs)})
                for u, unit in self.units.items()}

    def _priced(self, model) -> Dict[str, float]:
        """The layers' latency or energy from the profile, once (the dense shapes: masks change no shape)."""
        if getattr(self, "_prices", None) is None:
            price = getattr(self.ctx, "price_layers", None)
            if price is None:
                raise ConfigError(f"cost {self.config.cost} is priced by a hardware profile through a recipe",
                                  key="cost", value=self.config.cost,
                                  fix="run the stage through automl apply / search, or use cost: macs")
            self._prices = price(model, self._example(), self.config.profile, self.config.cost)
        return self._prices

    def _unit_keep(self, unit, masks) -> torch.Tensor:
        keep = torch.ones(unit["group"].channels, dtype=torch.bool)
        for n, _, idxs, root in unit["producers"]:
            mask = masks[n]
            keep[list(root)] &= mask.reshape(mask.shape[0], -1).any(1)[list(idxs)]
        return keep

    def _producer_masks(self, keep) -> Dict[str, torch.Tensor]:
        """Weight-shaped masks for every producer (conv/linear filters, BN gamma) from channel keeps."""
        local, shapes = {}, {}
        for u, unit in self.units.items():
            for n, m, idxs, root in unit["producers"]:
                shapes[n] = tuple(_param(m, "weight").shape)
                mask = local.setdefault(n, torch.ones(shapes[n][0], dtype=torch.bool))
                mask[list(idxs)] &= keep[u][list(root)]
        return {n: expand_mask(k, shapes[n], "filter") if len(shapes[n]) > 1 else k for n, k in local.items()}

    def _predicted_macs(self, keep) -> int:
        """MACs after thinning with ``keep`` (channels.MacModel; built once the units are final)."""
        if getattr(self, "_mac_model", None) is None:
            self._mac_model = MacModel({u: unit["group"] for u, unit in self.units.items()}, self.layer_macs,
                                       self._all_layers)
        return self._mac_model(keep)

    # finalize ----------------------------------------------------------------------------------------
    def _after_masks(self, model, ctx):
        cfg = self.config
        self.stats.update({"structured_granularity": cfg.granularity, "structured_criterion": cfg.criterion,
                           "structured_allocation": cfg.allocation, "structured_units": len(self.units)})
        if self.skipped:
            self.stats["structured_skipped"] = ", ".join(self.skipped)
        self.stats["structured_groups_skipped"] = self.groups_skipped
        if cfg.criterion == "similarity":
            self.stats.update({"similarity_merges": self.merges, "similarity_unfolded_groups": len(self.unfolded)})
        if cfg.mac_reduction:
            self.stats["mac_reduction_target"] = cfg.mac_reduction
        if self.sampled:
            self.stats.update({f"sampled_{k}": v for k, v in self.sampled.items() if k != "multipliers"})
        if not self.grouped:
            pruned = sum(int((~k).sum()) for k in self.last_keep.values())
            self.stats.update({"pruned_layers": len(self.units), "structures_pruned": pruned,
                               "structured_speedup": "none (masks only)", "mac_reduction": 1.0})
            return model
        layers = {n for u in self.units.values() for n in u["group"].outputs + u["group"].inputs}
        self.stats["pruned_layers"] = len(layers & set(self._all_layers))
        self.stats["channels_kept"] = {u: f"{int(k.sum())}/{k.numel()}" for u, k in self.last_keep.items()}
        # names as the model has them now: a later stage (early exit) may have re-parented the layers
        now = {id(m): n for n, m in model.named_modules()}
        conv_masks = {now.get(id(self._all_layers[n]), n): k
                      for n, k in channel_keep(self._producer_masks(self.last_keep), self._all_layers).items()}
        dense_params, dense_macs = count_params(model), count_macs(model, self.example)
        thinned = thin_from_masks(model, self.example, conv_masks)
        macs = count_macs(thinned, self.example)
        x = torch.randn((2,) + tuple(self.example.shape[1:]), generator=torch.Generator().manual_seed(1))
        self.stats.update({"dense_params": dense_params, "thinned_params": count_params(thinned),
                           "dense_macs": dense_macs, "thinned_macs": macs, "mac_reduction": dense_macs / max(macs, 1),
                           "structured_speedup": "thinned (channels removed)",
                           "thinned_parity": parity(model, thinned, x)})
        if self.stats["thinned_parity"] > 1e-3:  # prepare checked the same groups: should never happen
            raise RuntimeError(f"structured: the thinned model differs from the masked one by "
                               f"{self.stats['thinned_parity']:.2g} (relative); please report this model")
        return thinned
