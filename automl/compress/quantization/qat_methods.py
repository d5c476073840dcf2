"""Quantization-aware fine-tuning methods: ``qat``, ``mixed``, ``binary``, ``ternary``.

Timing: the layers are wrapped with fake quantizers at the stage's start epoch (``train.epochs -
finetune_epochs`` in a search trial; epoch 0 when a recipe gives no start), after activation ranges
are calibrated on a few training batches, and train from there with straight-through gradients.
The quantizers' own parameters (LSQ step sizes, PACT clipping levels) are reserved at ``prepare``
(see ``automl.compress.late_params``), so the optimizer built after prepare trains them. Layer
patterns are checked at prepare and resolved again at the start epoch, so they see the names left
by an earlier low-rank stage. A start at or after the end of training quantizes at finalize
without fine-tuning. After the last optimizer step the wrappers are removed again (weights keep
their quantized values, input grids stay as pre-hooks), so a pruning stage that thins layers at
its finalize sees plain layers under their original names. Pruning that still changes masks while
this stage trains keeps working (its masks hold the layer objects); zeros are on every symmetric
grid, except that pruned binary weights become a third level, 0.

Deployment: ``qat`` with w_bits = a_bits = 8 deploys real int8 (pt2e on the QAT-trained weights,
activation ranges re-calibrated); every lower width deploys the simulated model (quantized
weights, activation fake-quantizers, float compute) and says so in its precision label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

from automl.compress.base import KEEPS_PRECISION, KEEPS_SHAPE, Method, register_method
from automl.compress.late_params import LateParameters
from automl.compress.layers import PRUNABLE, select_layers
from automl.compress.quantization import qmath
from automl.compress.quantization.binary import BinaryWeight, TernaryWeight
from automl.compress.quantization.int8_methods import calibration_batches, deploy_int8
from automl.compress.quantization.qat import QAT_METHODS, QuantLayer, prepare_qat, qat_layers
from automl.compress.quantization.simulated import (average_bits, first_and_last, freeze, replace_module,
                                                    ship_packed, simulated_model)
from automl.configs import option
from automl.errors import ConfigError
from automl.runtime import QuantInfo

Plan = Dict[str, Tuple[int, Optional[int]]]  # layer -> (weight bits, activation bits or None = float)


def _act_bits(value: int, key: str = "a_bits") -> Optional[int]:
    """0 means float activations; anything else must be a supported width (1 is not)."""
    return None if value == 0 else qmath.check_bits(value, key=key)


class FakeQuantMethod(Method):
    """Shared lifecycle: reserve parameters, wrap at the start epoch, simulate at finalize."""

    profile_precision = KEEPS_PRECISION
    deployed_shape = KEEPS_SHAPE

    #: trainable tensors per quantized layer (LSQ: weight step + input step; PACT: alpha)
    params_per_layer: ClassVar[Dict[str, int]] = {"lsq": 2, "pact": 1, "ste": 0}

    def _prepare(self, model, ctx):
        self.ctx, self.active, self.frozen = ctx, False, None
        self.epoch, self.step, self.rounding_stats = -1, 0, {}
        select_layers(model, self.config.layers)  # a bad pattern fails now, not at the start epoch
        rounding = self.rounding
        if rounding != "nearest" and self.config.quantizer != "lsq":
            raise ConfigError(f"{rounding} fits the rounding to a fixed weight grid; only the lsq quantizer keeps "
                              "one (pact and ste recompute it from the weights)", key="rounding", value=rounding,
                              fix="use quantizer: lsq, or rounding: nearest")
        self._check(model)
        layers = sum(isinstance(m, PRUNABLE) for m in model.modules())
        per_layer = self.params_per_layer.get(getattr(self.config, "quantizer", ""), 0)
        # x3: an earlier low-rank stage may split one layer into up to three before this one starts
        self.slots = LateParameters(per_layer * 3 * layers, self.method_name)
        return model

    def trainable_parameters(self):
        return self.slots.parameters()

    def _check(self, model):
        """Extra config checks at prepare."""

    def _on_epoch_start(self, model, epoch, ctx):
        self.epoch, self.step = epoch, 0
        if not self.active and epoch >= (self.start_epoch or 0):
            self._activate(model, ctx)

    def _after_step(self, model):
        # After the last optimizer step the quantized weights are final: put plain layers back under
        # their names now, so stages that finalize before this one (pruning that thins) see them.
        self.step += 1
        if (self.active and self.frozen is None and self.epoch == self.ctx.epochs - 1
                and self.step >= getattr(self.ctx, "steps_per_epoch", 0) > 0):
            self.frozen = freeze(model)

    def _activate(self, model, ctx):
        if qat_layers(model):
            raise ConfigError("the model already holds fake-quantized layers", key="quantization",
                              value=self.method_name, fix="use one quantization stage per recipe")
        self.plan = self._plan(model, ctx)
        self._wrap(model, self.plan, ctx)
        for layer in qat_layers(model).values():
            for quantizer in (layer.weight_quant, layer.act_quant):
                if quantizer is not None:
                    self.slots.adopt_module(quantizer)
        self.active = True

    def _selected(self, model, skip_first_last: bool):
        names = list(select_layers(model, self.config.layers))
        if skip_first_last:
            ends = set(first_and_last(model))
            names = [n for n in names if n not in ends]
        if not names:
            raise ConfigError("no layer left to quantize", key="layers", value=list(self.config.layers),
                              fix="select more layers, or quantize the first and last layer too")
        return names

    def _wrap(self, model, plan: Plan, ctx):
        batches = calibration_batches(ctx.task, self.config.calibration_batches, seed=ctx.seed)
        prepare_qat(model, plan, self.config.quantizer, self.config.per_channel, batches=batches)
        if self.rounding != "nearest":
            self._learned_rounding(model, ctx)

    @property
    def rounding(self) -> str:
        """The configured weight rounding (binary and ternary have none to choose: nearest)."""
        return self.config.rounding if isinstance(self.config, RoundingOptions) else "nearest"

    def _learned_rounding(self, model, ctx):
        """AdaRound or GPTQ on every wrapped layer's fixed grid, kept where the model then agrees with
        the float model on validation inputs at least as often as with nearest rounding (rounding.py)."""
        from functools import partial

        from automl.compress.quantization.adaround import AdaRoundSettings, adaround_layer
        from automl.compress.quantization.gptq import gptq_layer
        from automl.compress.quantization.rounding import rounded_if_better

        cfg = self.config
        round_fn = {"adaround": partial(adaround_layer, settings=AdaRoundSettings(iterations=cfg.rounding_iterations)),
                    "gptq": gptq_layer}[cfg.rounding]
        batches = calibration_batches(ctx.task, cfg.rounding_batches, seed=ctx.seed + 1)
        self.rounding_stats = rounded_if_better(model, batches, ctx.task.val_loader(), round_fn, cfg.rounding,
                                                seed=ctx.seed)

    def _finalize(self, model, ctx):
        if not self.active:
            self._activate(model, ctx)
        if self.frozen is None:
            self.frozen = freeze(model)
        simulated = simulated_model(model, self.frozen)
        self.plain = model  # quantized weights, float inputs: what a real int8 export starts from
        self.stats = {"quant_layers": len(self.frozen), "quant_avg_w_bits": average_bits(self.frozen, model),
                      # per-layer weight bits: a modelled accelerator profile prices each layer at its own
                      "quant_w_bits": ",".join(f"{n}:{e.w_bits}" for n, e in self.frozen.items()),
                      **self.rounding_stats}
        return simulated

    def quant_info(self) -> QuantInfo:
        """What the simulated model is, for pricing: float compute, each quantized layer's weight bits."""
        return QuantInfo(simulated=True, layer_w_bits={n: e.w_bits for n, e in self.frozen.items()})

    def label(self) -> str:
        """The deployed artifact's precision; subclasses name their bit-widths."""
        return f"{self.method_name} (simulated)"

    def _deploy(self, artifact, ctx):
        artifact.precision, artifact.quant = self.label(), self.quant_info()
        artifact.notes["simulated"] = "quantized values computed in float; no low-bit kernels, no speed-up"
        if ctx.model is not None:  # what ships: the quantized weights bit-packed, reloading exactly
            artifact.shipped = ship_packed(ctx.model, artifact.path.with_name(artifact.path.stem + ".packed"),
                                           self.stats)
            artifact.notes["shipped"] = "packed low-bit weights (deepcomp_format.load_compressed)"
        return artifact


_FIRST_LAST = ("same", "int8", "float")
ROUNDINGS = ("nearest", "adaround", "gptq")


@dataclass(frozen=True)
class RoundingOptions:
    """How a post-training (or pre-fine-tune) quantizer rounds weights onto its grid (rounding.py)."""

    rounding: str = option("nearest", choices=ROUNDINGS,
                           doc="weight rounding: nearest, adaround (learned per weight) or gptq (error feedback "
                               "over the inverse Hessian), both fitted per layer on calibration inputs")
    rounding_batches: int = option(8, low=1, high=10_000, doc="training batches the rounding is fitted on (each "
                                                               "layer's input over them is held twice in memory)")
    rounding_iterations: int = option(1000, low=10, high=100_000, doc="AdaRound optimisation steps per layer")


@dataclass(frozen=True)
class QATConfig(RoundingOptions):
    w_bits: int = option(8, low=2, high=8, doc="weight bit-width")
    a_bits: int = option(8, low=0, high=8, doc="input activation bit-width (0: float activations)")
    quantizer: str = option("lsq", choices=QAT_METHODS, doc="lsq (learned steps), pact (learned clip) or ste")
    per_channel: bool = option(True, doc="one weight scale per output channel")
    first_last: str = option("int8", choices=_FIRST_LAST,
                             doc="first and last layer: same bits, 8 bits (customary) or float")
    layers: Tuple[str, ...] = option(("re:.*",), doc="layer names or 're:' patterns (Conv/Linear)")
    finetune_epochs: int = option(3, low=0, high=10_000, doc="epochs trained with fake quantization")
    calibration_batches: int = option(4, low=1, high=10_000, doc="training batches that set activation ranges")


@register_method("qat", "quantization", QATConfig)
class QAT(FakeQuantMethod):
    """Uniform QAT at w_bits / a_bits; real int8 when both are 8."""

    @classmethod
    def profile_precision(cls, config) -> Optional[str]:
        return "int8_static" if config.w_bits == 8 and config.a_bits == 8 else None

    def _check(self, model):
        _act_bits(self.config.a_bits)

    def _plan(self, model, ctx) -> Plan:
        cfg = self.config
        names = self._selected(model, cfg.first_last == "float")
        plan = {n: (cfg.w_bits, _act_bits(cfg.a_bits)) for n in names}
        if cfg.first_last == "int8":
            plan.update({n: (8, 8) for n in first_and_last(model) if n in plan})
        return plan

    @property
    def real_int8(self) -> bool:
        return self.config.w_bits == 8 and self.config.a_bits == 8

    def label(self) -> str:
        a = self.config.a_bits or 32
        return f"w{self.config.w_bits}a{a} (simulated)"

    def _deploy(self, artifact, ctx):
        if not self.real_int8:
            return super()._deploy(artifact, ctx)
        out, stats = deploy_int8(self.plain, ctx, artifact.path.with_name(artifact.path.stem + ".int8.onnx"),
                                 per_channel=self.config.per_channel, batches=self.config.calibration_batches,
                                 precision="int8_qat", method="qat")
        self.stats.update(stats)
        return out


def monotone(sensitivity: Dict[str, Dict[int, float]]) -> Dict[str, Dict[int, float]]:
    """Damage made non-increasing in the bit-width (running max from the widest width down).

    A measured gain from fewer bits on a few batches is noise; taken as given it makes the allocator
    spend less than the budget (e.g. 3.0 average bits for a target of 4).
    """
    out = {}
    for name, by_bits in sensitivity.items():
        worst, out[name] = float("-inf"), {}
        for bits in sorted(by_bits, reverse=True):
            worst = max(worst, by_bits[bits])
            out[name][bits] = worst
    return out


@dataclass(frozen=True)
class MixedConfig(RoundingOptions):
    target_bits: float = option(4.0, low=2.0, high=8.0, doc="parameter-weighted average weight bits to allocate")
    layer_bits: Dict[str, float] = option({}, low=2, high=8,
                                          doc="explicit weight bits per layer (name or 're:'); replaces the allocator")
    a_bits: int = option(8, low=0, high=8, doc="input activation bits of the quantized layers (0: float)")
    layer_a_bits: Dict[str, float] = option({}, low=0, high=8,
                                            doc="input activation bits per layer (name or 're:'; 0: float), "
                                                "overriding a_bits")
    criterion: str = option("quantization", choices=("quantization", "hessian"),
                            doc="sensitivity: loss change when quantized, or Hutchinson Hessian trace (HAWQ-v2)")
    min_bits: int = option(2, low=2, high=8, doc="smallest weight width the allocator may choose")
    max_bits: int = option(8, low=2, high=8, doc="largest weight width the allocator may choose")
    quantizer: str = option("lsq", choices=QAT_METHODS, doc="fake quantizer used while fine-tuning")
    per_channel: bool = option(True, doc="one weight scale per output channel")
    layers: Tuple[str, ...] = option(("re:.*",), doc="layers the allocator distributes bits over")
    finetune_epochs: int = option(3, low=0, high=10_000, doc="epochs trained with fake quantization")
    calibration_batches: int = option(4, low=1, high=10_000, doc="batches for sensitivity and activation ranges")


@register_method("mixed", "quantization", MixedConfig)
class Mixed(FakeQuantMethod):
    """Per-layer weight bits (sensitivity-driven or explicit), then QAT fine-tuning; simulated."""

    def _check(self, model):
        _act_bits(self.config.a_bits)
        if self.config.min_bits > self.config.max_bits:
            raise ConfigError("min_bits is above max_bits", key="min_bits", value=self.config.min_bits,
                              fix=f"use a min_bits <= {self.config.max_bits}")
        for field in ("layer_bits", "layer_a_bits"):
            for pattern, bits in getattr(self.config, field).items():
                if not float(bits).is_integer():
                    raise ConfigError("layer bits must be whole numbers", key=f"{field}.{pattern}", value=bits,
                                      fix="write e.g. 4")
                select_layers(model, [pattern])
        # the quantized layers: those layer_bits names, else those the allocator spreads bits over
        self._activation_bits(model, list(select_layers(model, list(self.config.layer_bits) or self.config.layers)))

    def _activation_bits(self, model, names) -> Dict[str, Optional[int]]:
        """Input bits (None: float) of each quantized layer: its layer_a_bits entry, else a_bits. Same
        precedence as layer_bits: an exact name beats any pattern, the last listed pattern wins."""
        from automl.compress.quantization.qat import resolve_patterns

        default, chosen = _act_bits(self.config.a_bits), {}
        for pattern, bits in self.config.layer_a_bits.items():
            key = f"layer_a_bits.{pattern}"
            if not set(select_layers(model, [pattern])).intersection(names):
                raise ConfigError("layer_a_bits names no layer this stage quantizes", key=key, value=bits,
                                  fix=f"quantized layers: {', '.join(names)}; name one of them, or quantize "
                                      "the layer too (layer_bits / layers)")
            chosen[pattern] = _act_bits(int(bits), key=key)
        resolved = resolve_patterns(model, chosen) if chosen else {}
        return {n: resolved.get(n, default) for n in names}

    def _plan(self, model, ctx) -> Plan:
        cfg = self.config
        if cfg.layer_bits:
            from automl.compress.quantization.qat import resolve_layer_bits

            weights = resolve_layer_bits(model, {p: (int(b), None) for p, b in cfg.layer_bits.items()})
            a_bits = self._activation_bits(model, list(weights))
            return {n: (w, a_bits[n]) for n, (w, _) in weights.items()}
        from automl.compress.quantization import mixed

        loader = ctx.task.train_loader(batch_size=32, seed=ctx.seed)
        batches = [b for _, b in zip(range(cfg.calibration_batches), loader)]
        names = list(select_layers(model, cfg.layers))
        candidates = list(range(cfg.min_bits, cfg.max_bits + 1))
        if cfg.criterion == "quantization":
            sensitivity = mixed.quantization_sensitivity(model, batches, names, candidates)
        else:
            traces = mixed.hutchinson_trace(model, batches, names, seed=ctx.seed)
            sensitivity = mixed.hessian_sensitivity(model, traces, candidates)
        self.sensitivity = monotone(sensitivity)
        bits = mixed.allocate_bits(self.sensitivity, mixed.parameter_counts(model, names), cfg.target_bits)
        a_bits = self._activation_bits(model, list(bits))
        return {n: (b, a_bits[n]) for n, b in bits.items()}

    def _finalize(self, model, ctx):
        simulated = super()._finalize(model, ctx)
        self.stats["mixed_bits"] = ",".join(f"{n}:{e.w_bits}" for n, e in self.frozen.items())
        self.stats["mixed_a_bits"] = ",".join(f"{n}:{e.a_bits or 'float'}" for n, e in self.frozen.items())
        return simulated

    def label(self) -> str:
        """``a8`` when every input has one width, else the range (``a4-8``); float inputs count as 32."""
        widths = sorted({e.a_bits or 32 for e in (self.frozen or {}).values()}) or [self.config.a_bits or 32]
        a = str(widths[0]) if len(widths) == 1 else f"{widths[0]}-{widths[-1]}"
        return f"mixed w{self.stats['quant_avg_w_bits']:.2f}a{a} (simulated)"


@dataclass(frozen=True)
class BinaryConfig:
    keep_first_last: bool = option(True, doc="leave the first and last layer in float (customary)")
    per_channel: bool = option(True, doc="one scale alpha per output channel")
    layers: Tuple[str, ...] = option(("re:.*",), doc="layer names or 're:' patterns (Conv/Linear)")
    finetune_epochs: int = option(3, low=0, high=10_000, doc="epochs trained with binary weights (STE)")


@dataclass(frozen=True)
class TernaryConfig(BinaryConfig):
    threshold: float = option(0.7, low=0.0, high=2.0, high_open=True,
                              doc="delta = threshold * mean|W| (TWN: 0.7)")


@register_method("binary", "quantization", BinaryConfig)
class Binary(FakeQuantMethod):
    """Binary weights alpha * sign(W) (BWN), trained with a straight-through gradient; simulated."""

    kind: ClassVar[str] = "binary"

    def _plan(self, model, ctx) -> Plan:
        bits = 1 if self.kind == "binary" else 2
        return {n: (bits, None) for n in self._selected(model, self.config.keep_first_last)}

    def _quantizer(self):
        return BinaryWeight(self.config.per_channel)

    def _wrap(self, model, plan, ctx):
        layers = select_layers(model, list(plan))
        for name, (bits, _) in plan.items():
            replace_module(model, name, QuantLayer(layers[name], self._quantizer(), None, bits, None))

    def label(self) -> str:
        return f"{self.kind} weights (simulated)"


@register_method("ternary", "quantization", TernaryConfig)
class Ternary(Binary):
    """Ternary weights alpha * {-1, 0, +1} (TWN), trained with a straight-through gradient; simulated."""

    kind = "ternary"

    def _quantizer(self):
        return TernaryWeight(self.config.threshold, self.config.per_channel)
