"""The regularizers as compression methods (usable from search spaces and recipe stages): ``l1``,
``group_lasso``, ``group_variance`` and ``bn_scale_l1`` (network slimming). Each adds its penalty to
the training loss from the stage's start epoch until ``end_epoch`` (0 = the end of training)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from automl.compress.base import KEEPS_PRECISION, KEEPS_SHAPE, Method, register_method
from automl.compress.regularization.penalties import GROUPS, Regularizer, RegularizerConfig
from automl.configs import option


@dataclass(frozen=True)
class L1RegConfig:
    strength: float = option(1e-4, low=0.0, high=10.0, doc="lambda multiplying the penalty")
    end_epoch: int = option(0, low=0, high=10_000, doc="first epoch without the penalty (0 = never stop)")
    layers: Tuple[str, ...] = option(("re:.*",), doc="layer names or 're:' patterns")


@dataclass(frozen=True)
class GroupRegConfig(L1RegConfig):
    groups: str = option("filter", choices=GROUPS, doc="filter / channel / row / column groups")


class RegularizerMethod(Method):
    profile_precision = KEEPS_PRECISION
    deployed_shape = KEEPS_SHAPE

    kind = "l1"

    def _prepare(self, model, ctx):
        groups = getattr(self.config, "groups", "filter")
        self.regularizer = Regularizer(RegularizerConfig(kind=self.kind, groups=groups, strength=self.config.strength,
                                                         layers=self.config.layers))
        self.regularizer.select(model)  # a pattern matching nothing fails now, with the nearest names
        self.epoch = 0

    def _on_epoch_start(self, model, epoch, ctx):
        self.epoch = epoch

    def active(self) -> bool:
        start, end = self.start_epoch or 0, self.config.end_epoch or float("inf")
        return start <= self.epoch < end

    def _adjust_loss(self, model, x, y, output, loss):
        return loss + self.regularizer.penalty(model) if self.active() else loss

    def _finalize(self, model, ctx):
        report = self.regularizer.report(model)
        groups = sum(r["groups"] for r in report.values())
        below = sum(r["groups"] * r["below_threshold"] for r in report.values())
        self.stats = {"regularized_layers": len(report), "regularized_below_threshold": below / max(groups, 1.0)}


def _register(name: str, config_cls: type):
    handler = type(f"{name.title().replace('_', '')}Regularizer", (RegularizerMethod,), {"kind": name})
    register_method(name, "regularization", config_cls)(handler)


for _name, _cls in (("l1", L1RegConfig), ("group_lasso", GroupRegConfig), ("group_variance", GroupRegConfig),
                    ("bn_scale_l1", L1RegConfig)):
    _register(_name, _cls)
