"""Low-rank factorization (``lowrank``) and ghost modules (``ghost``, ghost.py) as compression stages
of category ``factorization``: both replace trained layers by cheaper ones and fine-tune; they share
the replacement below (``_factorize``), each giving its own ``_replacements``.

At the start epoch each selected layer is replaced by its factors (Linear: two Linears from a
truncated SVD; Conv2d: spatial SVD (k x 1 then 1 x k) or Tucker-2 (1x1, core, 1x1)), with ranks
from ``rank_rule`` (energy share, MAC ratio or fixed rank), and the model fine-tunes from there.
A layer whose factors would not reduce MACs is kept. The factors' weights are reserved at
``prepare`` so the optimizer trains them (``automl.compress.late_params``); a bias moves to the last
factor as the same Parameter.

Names change: layer ``fc1`` becomes ``fc1.0`` and ``fc1.1`` (Tucker-2: ``.0 .1 .2``). Factorization
runs before pruning and quantization (category order), and the quantization methods resolve their
layer patterns when they start, so they see the new names. Stages that select layers at prepare
(pruning, early exit) see the factors only when lowrank starts at epoch 0 (``finetune_epochs >=
train.epochs``, or ``start_epoch: 0`` in a recipe): lowrank then factorizes at prepare. A later
start leaves such stages holding the replaced layers; they are told so by a LifecycleError on
first use, instead of silently pruning a layer that no longer computes anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch.nn as nn

from automl.compress.base import KEEPS_PRECISION, Method, register_method
from automl.compress.late_params import LateParameters
from automl.compress.layers import select_layers
from automl.compress.factorization.ghost import build_ghost, conv_macs, fit_cheap, layer_inputs, unsupported
from automl.compress.factorization.lowrank import CONV_SCHEMES, RULES, factorize
from automl.compress.quantization.simulated import replace_module
from automl.configs import option
from automl.errors import ConfigError, LifecycleError


@dataclass(frozen=True)
class LowRankConfig:
    rank_rule: str = option("energy", choices=RULES, doc="energy share kept, MAC ratio, or a fixed rank")
    energy: float = option(0.9, low=0.0, low_open=True, high=1.0, doc="rank_rule energy: share of sum(s^2) kept")
    mac_ratio: float = option(0.5, low=0.0, high=1.0, low_open=True, high_open=True,
                              doc="rank_rule macs: largest rank with at most this share of the layer's MACs")
    rank: int = option(8, low=1, high=1_000_000, doc="rank_rule rank: the rank of every layer")
    conv: str = option("spatial", choices=CONV_SCHEMES, doc="Conv2d scheme: spatial SVD or Tucker-2")
    layers: Tuple[str, ...] = option(("re:.*",), doc="layer names or 're:' patterns (Conv/Linear)")
    finetune_epochs: int = option(3, low=0, high=10_000, doc="epochs trained after factorizing")


def _retire(module, name: str, epoch, replaced_by: str, method: str):
    """Make any later use of a replaced layer's weight fail loudly (see the module docstring)."""
    message = (f"layer '{name}' was replaced by {replaced_by} at epoch {epoch}, but a stage prepared before that "
               f"still uses the old layer. Fix: start {method} at epoch 0 (finetune_epochs >= train.epochs) so later "
               "stages select the new layers, or leave this layer out of one of the stages")

    def weight(self):
        raise LifecycleError(message)

    module._parameters.pop("weight", None)
    module.__class__ = type(f"Replaced{type(module).__name__}", (type(module),), {"weight": property(weight)})


def rank_rule(config: LowRankConfig) -> str:
    """The config's rank rule in factorize()'s form, e.g. ``energy:0.9``."""
    value = {"energy": config.energy, "macs": config.mac_ratio, "rank": config.rank}[config.rank_rule]
    return f"{config.rank_rule}:{value}"


@register_method("lowrank", "factorization", LowRankConfig)
class LowRank(Method):
    """Replace layers by low-rank factors at the start epoch, then fine-tune."""

    profile_precision = KEEPS_PRECISION
    REPLACED = "low-rank factors ('{name}.0', ...)"

    @classmethod
    def deployed_shape(cls, model, example, config, notes):
        """The factorized model. Ranks under ``rank_rule: energy`` depend on the trained weights' spectrum,
        so on random weights they are an estimate (flat spectra keep high ranks); ``macs`` and ``rank`` are
        exact."""
        factored, report = factorize(model, config.layers, rank_rule(config), conv=config.conv,
                                     example=example)
        notes["lowrank_layers"] = sum(e.factorized for e in report)
        return factored

    def _prepare(self, model, ctx):
        self.done = False
        chosen = select_layers(model, self.config.layers)
        self.slots = LateParameters(3 * len(chosen), "lowrank")  # up to three factors per layer
        if not self.start_epoch:  # start 0 (or none): factorize before training; later stages see the factors
            self._factorize(model, ctx, epoch=0, reserved=False)
        return model

    def trainable_parameters(self):
        return self.slots.parameters()

    def _on_epoch_start(self, model, epoch, ctx):
        if not self.done and epoch >= (self.start_epoch or 0):
            self._factorize(model, ctx, epoch, reserved=True)

    def _rule(self) -> str:
        return rank_rule(self.config)

    def _factorize(self, model, ctx, epoch, reserved: bool):
        """Replace the layers ``_replacements`` gives, once; the new modules' weights train from here."""
        from automl.compress.quantization.qat import qat_layers

        if qat_layers(model) or any(hasattr(m, "weight_shared") for m in model.modules()):
            raise LifecycleError(f"{self.method_name}: a quantization stage started before the factorization (epoch "
                                 f"{epoch}). Fix: give the quantization stage fewer finetune_epochs than "
                                 f"{self.method_name}, so it starts on the replaced layers")
        for layer, new, shares_bias in self._replacements(model, ctx):
            old = select_layers(model, [layer])[layer]
            keep = []
            if shares_bias and old.bias is not None:  # the same Parameter object: its optimizer state carries over
                new[-1].bias = old.bias
                keep.append(old.bias)
            if reserved:
                self.slots.adopt_module(new, keep=keep)
            replace_module(model, layer, new)
            _retire(old, layer, epoch, self.REPLACED.format(name=layer), self.method_name)
        self.done = True

    def _replacements(self, model, ctx):
        """[(layer name, its factors, whether the last factor takes the layer's bias)]; sets the stats."""
        new, report = factorize(model, self.config.layers, self._rule(), conv=self.config.conv,
                                example=ctx.task.example_input(2))
        out = []
        for entry in report:
            if entry.factorized:
                out.append((entry.layer, new.get_submodule(entry.layer if entry.layer in dict(new.named_modules())
                                                           else "module." + entry.layer), True))
        before = sum(e.macs_before for e in report)
        self.stats = {"lowrank_layers": sum(e.factorized for e in report),
                      "lowrank_mac_ratio": sum(e.macs_after for e in report) / max(before, 1),
                      "lowrank_param_ratio": sum(e.params_after for e in report)
                      / max(sum(e.params_before for e in report), 1)}
        self.report = report
        return out

    def _finalize(self, model, ctx):
        if not self.done:  # starts at or after the end of training: factorize without fine-tuning
            self._factorize(model, ctx, ctx.epochs, reserved=False)
        return model


@dataclass(frozen=True)
class GhostConfig:
    ratio: int = option(2, low=2, high=16, doc="each primary map makes ratio - 1 cheap ones: about 1/ratio of the MACs")
    dw_kernel: int = option(3, low=1, high=9, doc="kernel of the cheap depthwise filters (odd)")
    layers: Tuple[str, ...] = option(("re:.*",), doc="Conv2d layer names or 're:' patterns (grouped ones are skipped)")
    calib_batches: int = option(4, low=1, high=1_000,
                                doc="training batches of 64 whose layer inputs fit the cheap filters")
    finetune_epochs: int = option(3, low=0, high=10_000, doc="epochs trained after the replacement")


@register_method("ghost", "factorization", GhostConfig)
class Ghost(LowRank):
    """Replace trained convolutions by ghost modules (ghost.py) at the start epoch, then fine-tune."""

    REPLACED = "a ghost module ('{name}.primary', '{name}.cheap')"

    @classmethod
    def deployed_shape(cls, model, example, config, notes):
        """The model with ghost modules (cheap filters at zero: shapes are what a profile prices)."""
        chosen = _ghost_layers(model, config)
        for name, conv in chosen.items():
            replace_module(model, name, build_ghost(conv, config.ratio, config.dw_kernel))
        notes["ghost_layers"] = len(chosen)
        return model

    def _prepare(self, model, ctx):
        if self.config.dw_kernel % 2 == 0:
            raise ConfigError("the cheap filters keep the map size, so their kernel is odd", key="dw_kernel",
                              value=self.config.dw_kernel, fix="use 1, 3, 5 or 7")
        return super()._prepare(model, ctx)

    def _replacements(self, model, ctx):
        cfg, chosen = self.config, _ghost_layers(model, self.config)
        if not chosen:
            raise ConfigError("no selected layer can become a ghost module", key="layers", value=list(cfg.layers),
                              fix="select plain (not grouped) Conv2d layers with at least `ratio` output channels")
        loader = ctx.task.train_loader(batch_size=64, seed=ctx.seed)
        inputs = layer_inputs(model, list(chosen), [x for _, (x, _) in zip(range(cfg.calib_batches), loader)])
        out, errors, before, after = [], [], 0, 0
        for name, conv in chosen.items():
            ghost = build_ghost(conv, cfg.ratio, cfg.dw_kernel)
            errors.append(fit_cheap(ghost, conv, inputs[name], seed=ctx.seed))
            before += conv_macs(conv, inputs[name].shape)
            after += conv_macs(ghost, inputs[name].shape)
            out.append((name, ghost, False))
        self.stats = {"ghost_layers": len(out), "ghost_mac_ratio": after / max(before, 1),
                      "ghost_fit_error": sum(errors) / len(errors)}
        return out


def _ghost_layers(model, config) -> dict:
    """The selected Conv2d layers a ghost module can replace (reached by no input: still replaced)."""
    chosen = select_layers(model, config.layers, kinds=(nn.Conv2d,))
    return {n: m for n, m in chosen.items() if unsupported(m, config.ratio) is None}
