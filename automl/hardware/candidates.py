"""Candidates of a search space in their deployed *shape*, without training.

Latency does not depend on weight values, so a candidate is built from its flat config with random
weights and the structural effect of each compression stage, which its method builds
(``Method.deployed_shape``): structured pruning thins channels uniformly, layer pruning bypasses
blocks (automl.compress.pruning.shapes), ``exits`` attaches untrained exit heads; masks-only pruning
changes nothing a dense kernel sees.

The quantization stage gives the deployed precision (its method's ``profile_precision``): int8 methods that write a
QDQ int8 model deploy ``int8_static`` (``int8_ptq`` its mode); a *simulated* model (``mixed``,
``binary``, ``ternary``, ``qat`` / ``data_free`` below 8 bits, ``kmeans`` weight sharing) computes in
float and is priced as the fp32 model, noted in ``notes['quantization']``: its fake-quantizers'
elementwise cost is not in the candidate.

An ``early_exit.method: exits`` candidate is the (thinned) backbone cut into segments with an
untrained exit head after each chosen block (``EarlyExitModel``), as the method builds it. It
deploys one graph per segment (blocks + exit head), so its layers are those of every segment graph,
and its cost depends on where inputs leave (see ``ExitPlan`` and validate.py). Exit heads pool to
their grid with AdaptiveAvgPool2d; on a map that the grid divides this is the AveragePool the ONNX
export writes, so the candidate holds that AvgPool2d (a layer the profile measures).
"""
from __future__ import annotations

import dataclasses

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from automl.compress import get_method
from automl.errors import ConfigError, ProfileError
from automl.hardware.layers import PRECISIONS, LayerKey, TracedLayer, distinct_keys, trace_layers
from automl.spaces.adapter import resolve, sample_config
from automl.spaces.domains import Choice, Fixed, IntRange

# runtime -> the precisions it deploys. onnxruntime_int8 deploys every candidate as static int8.
RUNTIMES: Dict[str, Tuple[str, ...]] = {"onnxruntime": PRECISIONS, "onnxruntime_int8": ("int8_static",),
                                        "torch": ("fp32",)}
# early-exit config options that change the deployed graphs (the rest change only where inputs leave)
EXIT_SHAPE_OPTIONS = ("method", "exits", "positions", "head_size", "head_pool")


class InvalidCandidate(ConfigError):
    """A config its method refuses on its architecture (e.g. more exits than the model has blocks)."""


@dataclass
class ExitPlan:
    """A real exit distribution for an untrained early-exit candidate: the inputs it is measured on
    (a multiple of the batch), one confidence threshold per early exit, and the share of the inputs
    leaving at each early exit under PyTorch inference with them."""

    inputs: torch.Tensor
    thresholds: Tuple[float, ...]
    criterion: str
    shares: Tuple[float, ...]


@dataclass
class Candidate:
    config: Dict[str, Any]
    model: nn.Module            # an EarlyExitModel for an early-exit candidate
    example: torch.Tensor
    precision: str
    notes: Dict[str, Any] = field(default_factory=dict)
    _layers: Optional[List[List[TracedLayer]]] = field(default=None, repr=False)   # per segment
    early_exit: Any = None      # the parsed EarlyExitConfig of an `exits` stage
    exit_plan: Optional[ExitPlan] = None   # set by validation: measure the deployed runner on its inputs
    _segments: Optional[List[Tuple[nn.Module, torch.Tensor]]] = field(default=None, repr=False)

    @property
    def segments(self) -> List[Tuple[nn.Module, torch.Tensor]]:
        """The deployed graphs and the input each sees at the candidate's batch: one per segment of an
        early-exit candidate (its blocks + exit head), else the whole model."""
        if self._segments is None:
            if self.early_exit is None:
                self._segments = [(self.model, self.example)]
            else:
                self._segments, h = [], self.example
                with torch.no_grad():
                    for segment, head in zip(self.model.segments, self.model.exit_heads):
                        self._segments.append((nn.Sequential(segment, head).eval(), h))
                        h = segment.eval()(h)
        return self._segments

    @property
    def segment_layers(self) -> List[List[TracedLayer]]:
        if self._layers is None:
            self._layers = [trace_layers(graph, x, self.precision) for graph, x in self.segments]
        return self._layers

    @property
    def layers(self) -> List[TracedLayer]:
        """Every layer the deployed graphs run (all segments of an early-exit candidate)."""
        return [t for layers in self.segment_layers for t in layers]

    def backbone(self) -> "Candidate":
        """The same model without its exits (one graph), for whole-model calibration; itself when it has none."""
        if self.early_exit is None:
            return self
        model = nn.Sequential(*self.model.segments, self.model.exit_heads[-1]).eval()
        return Candidate(self.config, model, self.example, self.precision,
                         {**self.notes, "early_exit": "backbone only (exit heads removed)"})


def check_runtime(runtime: str, key: str = "--runtime") -> str:
    if runtime not in RUNTIMES:
        from automl.registry import unknown_name

        raise unknown_name("runtime", runtime, RUNTIMES, key=key)
    return runtime


def deployed_precision(recipe, runtime: str = "onnxruntime") -> str:
    """The precision a recipe deploys at under ``runtime``."""
    check_runtime(runtime)
    if runtime == "onnxruntime_int8":
        return "int8_static"
    precision = "fp32"   # early exit deploys float segment graphs (it cannot share a recipe with quantization)
    for stage in recipe.stages:  # each method says what it deploys (Method.profile_precision)
        precision = get_method(stage.method).handler_cls.profile_precision(stage.config) or precision
    return precision


def build_candidate(space, config: Dict[str, Any], *, task=None, runtime: str = "onnxruntime",
                    batch: Optional[int] = None, seed: int = 0) -> Candidate:
    """The deployed-shape model of ``config`` with random weights (see the module docstring). Raises
    InvalidCandidate for a config its method refuses on its architecture."""
    from automl.compress.base import check_stage_combination
    from automl.recipe.from_config import recipe_from_config

    task = task if task is not None else space.build_task()
    # random weights: a supernet's would cost an extraction and change no shape
    recipe = dataclasses.replace(recipe_from_config(space, config), supernet=None)
    check_stage_combination([s.method for s in recipe.stages], file=space.source)
    from automl.recipe.build import recipe_model

    torch.manual_seed(seed)
    model = recipe_model(recipe, task).eval()
    probe = task.example_input(1)
    notes: Dict[str, Any] = {}
    exits = None
    # category order: pruning thins the backbone, then exit heads are built on the thinned blocks
    # (the method thins the model with its heads attached, which gives the heads the same inputs)
    for stage in recipe.stages:  # each method builds its own structural effect (Method.deployed_shape)
        try:
            model = get_method(stage.method).handler_cls.deployed_shape(model, probe, stage.config, notes).eval()
        except ProfileError:
            raise
        except ConfigError as exc:   # e.g. a MAC target or more exits than this architecture allows
            raise InvalidCandidate(exc.message, key=exc.key, value=exc.value, fix=exc.fix) from None
        if stage.category == "early_exit":
            exits = stage.config
    precision = deployed_precision(recipe, runtime)
    quant = [s for s in recipe.stages if s.category == "quantization"]
    if quant and precision == "fp32":
        notes["quantization"] = (f"{quant[-1].method}: float kernels (simulated low-bit or shared weights), "
                                 "priced as the fp32 model")
    size = batch or space.deploy.batch
    example = task.example_input(size)
    if example.shape[0] != size:   # a task with fewer samples than the batch
        example = example[:1].repeat(size, *([1] * (example.dim() - 1)))
    return Candidate(dict(config), model, example, precision, notes, early_exit=exits)


def _finite_values(domain) -> Optional[list]:
    if isinstance(domain, Choice):
        return list(domain.values)
    if isinstance(domain, Fixed):
        return [domain.value]
    if isinstance(domain, IntRange) and not domain.log:
        return list(range(domain.low, domain.high + 1, domain.step))
    return None


def _grid_params(space, limit: int):
    """Finite unconditioned arch/quantization parameters and their values, if the grid is small, plus
    the finite early-exit options that shape the deployed graphs (EXIT_SHAPE_OPTIONS)."""
    grid = {}
    for p in space.params:
        if p.name.startswith("early_exit.") and p.name.partition(".")[2] in EXIT_SHAPE_OPTIONS:
            values = _finite_values(p.domain)
            if values is not None:   # one that is not finite is left to chance, like the other options
                grid[p.name] = values
            continue
        if not (p.name.startswith("arch.") or p.name.startswith("quantization.")):
            continue
        values = _finite_values(p.domain)
        if values is None:
            return {}
        grid[p.name] = values
    size = int(np.prod([len(v) for v in grid.values()])) if grid else 0
    return grid if size <= limit else {}


def space_configs(space, *, samples: int = 200, seed: int = 0, grid_limit: int = 2000) -> List[Dict]:
    """Random configs of the space (seeds ``seed`` ...), plus every combination of the finite
    architecture and quantization parameters (and early-exit shape options) without pruning when that
    grid has at most ``grid_limit`` points, so no unpruned shape is left to chance. Deduplicated."""
    configs = [sample_config(space, seed=seed + i) for i in range(samples)]
    grid = _grid_params(space, grid_limit)
    rng = np.random.default_rng(seed)
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values))

        def pick(p, combo=combo):
            if p.name in combo:
                return combo[p.name]
            if p.name == "pruning.method" and isinstance(p.domain, Choice) and "none" in p.domain.values:
                return "none"
            return p.domain.sample(rng)
        configs.append(resolve(space, pick))
    seen, out = set(), []
    for c in configs:
        tag = json.dumps({k: v for k, v in c.items() if not k.startswith("train.")}, sort_keys=True, default=str)
        if tag not in seen:
            seen.add(tag)
            out.append(c)
    return out


def space_layer_keys(space, *, runtime: str = "onnxruntime", batch: Optional[int] = None, samples: int = 200,
                     seed: int = 0, task=None) -> Tuple[List[LayerKey], Dict[str, int]]:
    """The distinct layer keys the space's candidates need under ``runtime`` (an early-exit candidate's
    segment graphs, exit heads included, and its backbone, which calibration measures whole), and
    counts of what was looked at (configs, distinct models, configs skipped because the runtime cannot
    deploy them, configs their method refuses on their architecture)."""

    check_runtime(runtime)
    task = task if task is not None else space.build_task()
    configs = space_configs(space, samples=samples, seed=seed)
    lists, skipped, invalid, models = [], 0, 0, set()
    for i, config in enumerate(configs):
        try:
            cand = build_candidate(space, config, task=task, runtime=runtime, batch=batch, seed=i)
        except InvalidCandidate:
            invalid += 1
            continue
        if cand.precision not in RUNTIMES[runtime]:
            skipped += 1
            continue
        models.add(tuple(layer.key for layer in cand.layers))
        lists += [cand.layers] + ([cand.backbone().layers] if cand.early_exit is not None else [])
    if not lists and invalid == len(configs):
        raise ConfigError("every sampled config is refused by its method on its architecture", key="--space",
                          value=space.source, fix="build one with `automl apply` to see why, and fix the space")
    if not lists:
        raise ConfigError(f"runtime '{runtime}' deploys none of the space's candidates", key="--runtime",
                          value=runtime, fix=f"it deploys {', '.join(RUNTIMES[runtime])}; choose another runtime")
    keys = distinct_keys(lists)
    return keys, {"configs": len(configs), "models": len(models), "skipped": skipped, "invalid": invalid,
                  "keys": len(keys)}
