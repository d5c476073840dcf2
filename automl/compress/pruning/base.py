"""What every pruning method shares: layer selection, per-layer overrides, masks in a mode, and
the schedule of pruning events.

Timing. The first pruning event is at ``start_epoch`` (``train.epochs - finetune_epochs`` for a
search trial). From there the level (a sparsity, a threshold ...) follows ``schedule``:

  one_shot   the final level at the first event.
  iterative  ``iterations`` equal steps spread over ``ramp_epochs`` epochs; for sparsities each step
             removes the same share of what is left (iterative magnitude pruning).
  agp        Zhu & Gupta's cubic ramp over ``ramp_epochs`` epochs, updated every ``agp_every``
             optimizer steps (automated gradual pruning).

``ramp_epochs`` is capped at ``finetune_epochs``. Masks are also recomputed at the start of every
epoch after the first event (in hard mode that changes nothing; in soft and dual mode it is where
pruned weights may come back), and once more at ``finalize`` with the final level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch

from automl.compress.base import KEEPS_PRECISION, KEEPS_SHAPE, Method
from automl.compress.layers import PRUNABLE, select_layers
from automl.compress.pruning.masks import MODES, MaskSet
from automl.compress.pruning.schedules import agp_sparsity, iterative_levels
from automl.configs import option
from automl.errors import ConfigError

SCHEDULES = ("one_shot", "iterative", "agp")


@dataclass(frozen=True)
class PruningConfig:
    """Fields shared by every pruning method (subclasses add their level fields before these)."""

    finetune_epochs: int = option(2, low=0, high=10_000, doc="epochs trained from the first pruning event on")
    schedule: str = option("one_shot", choices=SCHEDULES, doc="how the level reaches its final value")
    ramp_epochs: int = option(1, low=1, high=10_000, doc="epochs over which iterative/agp reach the final level")
    iterations: int = option(3, low=1, high=1_000, doc="pruning steps of the iterative schedule")
    agp_every: int = option(10, low=1, high=1_000_000, doc="optimizer steps between AGP updates")
    mode: str = option("hard", choices=MODES, doc="hard: pruned stay zero; soft/dual: they may grow back")
    layers: Tuple[str, ...] = option(("re:.*",), doc="layer names or 're:' patterns (Conv/Linear)")
    per_layer: Dict[str, float] = option({}, low=0.0, doc="final level per layer (name or 're:'), overriding")


def resolve_per_layer(model, per_layer: Dict[str, float], chosen) -> Dict[str, float]:
    """{layer name: level} from exact names or 're:' patterns; later keys win. Every key must hit a
    layer the method prunes."""
    out: Dict[str, float] = {}
    for pattern, level in per_layer.items():
        hits = select_layers(model, [pattern], kinds=PRUNABLE)
        outside = [n for n in hits if n not in chosen]
        if outside:
            raise ConfigError("per_layer names a layer this method does not prune", key=f"per_layer.{pattern}",
                              value=outside[0], fix=f"add it to `layers` or use one of: {', '.join(chosen)}")
        out.update({n: float(level) for n in hits})
    return out


class PruningMethod(Method):
    """Base handler. Subclasses implement ``_masks(weights, levels, model)`` -> {name: keep mask}."""

    profile_precision = KEEPS_PRECISION
    deployed_shape = KEEPS_SHAPE

    kinds: ClassVar[tuple] = PRUNABLE
    #: "sparsity" levels are shares in [0, 1) (iterative steps are geometric); "scale" levels are
    #: thresholds or multipliers (iterative steps are linear).
    level_kind: ClassVar[str] = "sparsity"
    level_field: ClassVar[str] = "ratio"

    def _prepare(self, model, ctx):
        self.ctx = ctx
        self.layers = select_layers(model, self.config.layers, kinds=self.kinds)
        self.overrides = resolve_per_layer(model, self.config.per_layer, self.layers)
        final = getattr(self.config, self.level_field)
        self.final_levels = {n: self.overrides.get(n, final) for n in self.layers}
        if self.level_kind == "sparsity":
            bad = {n: v for n, v in self.final_levels.items() if not 0.0 <= v < 1.0}
            if bad:
                name = next(iter(bad))
                raise ConfigError("a pruning ratio must be in [0, 1)", key=f"per_layer.{name}", value=bad[name],
                                  fix="use a share such as 0.5 (1.0 would remove the whole layer)")
        self.masks = self._mask_set(model)
        self.epoch, self.step_in_epoch, self.progress_done = -1, 0, None
        self.events, self.regrown = 0, 0
        return model

    # schedule --------------------------------------------------------------------------------------------
    def _start(self) -> int:
        return 0 if self.start_epoch is None else self.start_epoch

    def _ramp_steps(self) -> int:
        epochs = min(self.config.ramp_epochs, max(self.config.finetune_epochs, 1))
        return max(1, epochs * max(getattr(self.ctx, "steps_per_epoch", 0), 1))

    def progress(self) -> Optional[float]:
        """Share in [0, 1] of the way to the final level at the current step; None before the start."""
        if self.epoch < self._start():
            return None
        steps = max(getattr(self.ctx, "steps_per_epoch", 0), 1)
        t, total = (self.epoch - self._start()) * steps + self.step_in_epoch, self._ramp_steps()
        if self.config.schedule == "one_shot" or t >= total:
            return 1.0
        if self.config.schedule == "iterative":
            return min(self.config.iterations, t * self.config.iterations // total + 1) / self.config.iterations
        # agp_sparsity is linear in ``final``: evaluate it at 0.5 and rescale to a share of the way
        return 2.0 * agp_sparsity(t, final=0.5, start=0, end=total, frequency=self.config.agp_every)

    def level(self, final: float, progress: float) -> float:
        if progress >= 1.0:
            return final
        if self.config.schedule == "iterative" and self.level_kind == "sparsity" and final > 0:
            k = round(progress * self.config.iterations)
            return iterative_levels(final, self.config.iterations)[k - 1] if k else 0.0
        return final * progress

    # events ----------------------------------------------------------------------------------------------
    def _event(self, model, progress: float):
        levels = {n: self.level(f, progress) for n, f in self.final_levels.items()}
        before = self.masks.masks()
        new = self._masks(self.masks.dense_weights(), levels, model)
        self.masks.update(new)
        after = self.masks.masks()
        self.regrown += sum(int((after[n] & ~before[n]).sum()) for n in after)
        self.events += 1
        self.progress_done = progress

    def _on_epoch_start(self, model, epoch, ctx):
        self.epoch, self.step_in_epoch = epoch, 0
        progress = self.progress()
        if progress is not None:
            self._event(model, progress)

    def _after_step(self, model):
        self.step_in_epoch += 1
        self.masks.after_step()
        progress = self.progress()
        if progress is not None and progress != self.progress_done and self.config.schedule == "agp":
            self._event(model, progress)

    def _finalize(self, model, ctx):
        self._event(model, 1.0)
        sparsity = self.masks.sparsity()
        self.masks.remove(make_permanent=True)
        self.stats = {"pruned_layers": len(self.layers), "pruned_sparsity": sparsity["overall"],
                      "pruning_events": self.events}
        if self.config.mode != "hard":
            self.stats["regrown_weights"] = self.regrown
        return self._after_masks(model, ctx)

    # subclass hooks -------------------------------------------------------------------------------------
    def _mask_set(self, model) -> MaskSet:
        """The masks the events update (after ``layers``, ``overrides`` and ``final_levels`` are set)."""
        return MaskSet(self.layers, mode=self.config.mode)

    def _masks(self, weights: Dict[str, torch.Tensor], levels: Dict[str, float], model) -> Dict[str, torch.Tensor]:
        """New masks per layer at ``levels``; every registered pruner defines it (abstract)."""
        raise NotImplementedError(f"{type(self).__name__} must define _masks(weights, levels, model)")

    def _after_masks(self, model, ctx):
        """After the masks are made permanent (e.g. thinning); returns the model."""
        return model

