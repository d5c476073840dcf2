"""Checks of the thinned structured path that run at prepare, before any training: groups that
cannot be thinned are skipped (or refused when named in ``layers``), the thinned model is compared
with the masked one on a synthetic keep, and a MAC target must be reachable."""
from __future__ import annotations

import torch

from automl.compress.pruning.allocation import allocate, keep_for_mac_target
from automl.compress.pruning.channels import channel_keep, parity, zero_channels
from automl.compress.pruning.thinning import thin_from_masks
from automl.errors import ConfigError


class GroupChecks:
    """Mixin of StructuredPruning (uses its units, grids, layer_macs, _producer_masks, _keeper ...)."""

    def _skip_group(self, group, why: str):
        """Leave a group unpruned (stats: structured_skipped), or refuse it when one of its layers was
        named exactly (not by a pattern) in ``layers``."""
        named = [n for n in group.outputs + group.inputs if n in self.config.layers]
        if named:
            raise ConfigError(f"layer '{named[0]}' cannot be thinned: {why}", key="layers", value=named[0],
                              fix=f"exclude it (and its coupled layers {', '.join(group.outputs[:4])}) from `layers`")
        self.skipped.append(f"{group.root} ({why})")
        self.groups_skipped += 1

    def _check_thinning(self, model):
        """Before any training: thin a copy with a synthetic keep (half of every group, on its grid) and
        compare it with the masked copy. Groups the tracer maps wrongly in some way groups.py does not
        know are found by bisection and skipped (or refused when named in ``layers``)."""
        gen = torch.Generator().manual_seed(0)
        scores = {u: torch.rand(unit["group"].channels, generator=gen) for u, unit in self.units.items()}
        keep = allocate(scores, 0.5, "uniform", grids=self.grids)
        x = torch.randn((2,) + tuple(self.example.shape[1:]), generator=gen)

        def ok(units) -> bool:
            sub = {u: (keep[u] if u in units else torch.ones_like(keep[u])) for u in self.units}
            masks = self._producer_masks(sub)
            try:  # the thinned forward itself may fail: a split by sizes the model keeps in attributes
                thinned = thin_from_masks(model, self.example, channel_keep(masks, self._all_layers))
                return parity(zero_channels(model, masks), thinned, x) <= 1e-4
            except (ConfigError, RuntimeError, IndexError, ValueError):
                return False

        def culprits(units):
            if ok(units):
                return []
            if len(units) == 1:
                return units
            half = len(units) // 2
            return culprits(units[:half]) + culprits(units[half:])

        names = [u for u in self.units if not keep[u].all()]
        for u in (culprits(names) if names else []):
            self._skip_group(self.units.pop(u)["group"], "its thinned model differs from the masked one "
                             "(an op on its channels is traced wrongly)")
            self.grids.pop(u)
        if not self.units:
            raise ConfigError("no structure group among the selected layers can be thinned", key="layers",
                              value=list(self.layers), fix=f"skipped: {'; '.join(self.skipped)}")

    def _check_reachable(self, model):
        """Before any training: the MAC target must be reachable at the deepest level (0.9 per group)."""
        scores = (self._group_scores(model) if self.config.allocation == "global"
                  else {u: torch.zeros(unit["group"].channels) for u, unit in self.units.items()})
        keep_at = self._keeper(model, scores, self._levels(self.final_levels)[0], None)
        self._keep_for_target(scores, keep_at, check_only=True)

    def _keep_for_target(self, scores, keep_at, check_only: bool = False):
        """(keep, level, factor) for ``mac_reduction`` (allocation.keep_for_mac_target); out of reach ->
        a ConfigError naming the target, the reachable factor and the fixes."""
        cfg = self.config
        try:
            return keep_for_mac_target(keep_at, self._predicted_macs, sum(self.layer_macs.values()),
                                       cfg.mac_reduction, scores, self.grids, check_only=check_only)
        except ConfigError as exc:
            fixes = [exc.fix.replace("ask for", "set mac_reduction to").replace("select more layers",
                                                                                "select more layers in `layers:`")]
            if cfg.round_to > 1:
                fixes.append(f"lower round_to ({cfg.round_to}): a group keeps a multiple of it")
            note = (f" ({self.groups_skipped} structure groups cannot be thinned and stay whole: see stats "
                    "structured_skipped)") if self.groups_skipped else ""
            raise ConfigError(f"mac_reduction {cfg.mac_reduction:g} is out of reach: "
                              f"{exc.message.split(': ', 1)[-1]}{note}",
                              key=exc.key, value=exc.value, fix="; or ".join(fixes)) from None
