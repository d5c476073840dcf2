"""Candidates of a search space in their deployed *shape*, without training.

Latency does not depend on weight values, so a candidate is built from its flat config with random
weights and the structural effect of its compression: channel pruning that thins (``structured``
with a channel-wise granularity and ``thin: true``) removes the same share of channels in every
coupled group (the ``uniform`` allocation), rounded to a multiple of ``round_to`` as the method
rounds; layer pruning bypasses the first removable blocks, and masks-only pruning (magnitude, AGP,
threshold ...) changes nothing a dense kernel sees. The quantization stage gives the deployed
precision. Other allocations and criteria pick *which* channels go; the channel counts, and so the
latency, are what uniform gives.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from automl.errors import ConfigError, ProfileError
from automl.hardware.layers import PRECISIONS, LayerKey, TracedLayer, distinct_keys, trace_layers
from automl.spaces.adapter import resolve, sample_config
from automl.spaces.domains import Choice, Fixed, IntRange

# runtime -> the precisions it deploys. onnxruntime_int8 deploys every candidate as static int8.
RUNTIMES: Dict[str, Tuple[str, ...]] = {"onnxruntime": PRECISIONS, "onnxruntime_int8": ("int8_static",),
                                        "torch": ("fp32",)}
# quantization method -> deployed precision, from its parsed config
DEPLOYED_PRECISION = {"int8_ptq": lambda cfg: f"int8_{cfg.mode}"}


@dataclass
class Candidate:
    config: Dict[str, Any]
    model: nn.Module
    example: torch.Tensor
    precision: str
    notes: Dict[str, Any] = field(default_factory=dict)
    _layers: Optional[List[TracedLayer]] = field(default=None, repr=False)

    @property
    def layers(self) -> List[TracedLayer]:
        if self._layers is None:
            self._layers = trace_layers(self.model, self.example, self.precision)
        return self._layers


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
    precision = "fp32"
    for stage in recipe.stages:
        if stage.category == "quantization":
            if stage.method not in DEPLOYED_PRECISION:
                raise ProfileError(f"the profiler does not know which precision quantization method "
                                   f"'{stage.method}' deploys", key="quantization.method", value=stage.method,
                                   fix="add it to automl.hardware.candidates.DEPLOYED_PRECISION")
            precision = DEPLOYED_PRECISION[stage.method](stage.config)
    return precision


def thinned_count(channels: int, ratio: float, round_to: int = 1) -> int:
    """Channels a group keeps under uniform structured pruning: ``round(ratio * channels)`` go (at
    least one stays), then the count moves to a multiple of ``round_to`` as the method does
    (``allocation.rounded_count``), so the candidate has the shapes the method produces."""
    from automl.compress.pruning.allocation import rounded_count

    kept = channels - min(int(round(ratio * channels)), channels - 1)
    return rounded_count(kept, channels, round_to)


def _thin_uniform(model: nn.Module, example, ratio: float, patterns, round_to: int = 1) -> nn.Module:
    from automl.compress.layers import select_layers
    from automl.compress.pruning.thinning import coupled_groups, thin

    chosen = set(select_layers(model, patterns))
    keep = {}
    for g in coupled_groups(model, example):
        if chosen.intersection(g.outputs) or chosen.intersection(g.inputs):
            kept = thinned_count(g.channels, ratio, round_to)
            if kept < g.channels:
                keep[g.root] = list(range(kept))
    return thin(model, example, keep) if keep else model


def _apply_structure(model: nn.Module, example, stage, notes: Dict) -> nn.Module:
    cfg = stage.config
    if stage.method == "structured" and cfg.thin and cfg.granularity in ("filter", "row", "channel", "column"):
        ratio, round_to = cfg.ratio, cfg.round_to
        if cfg.mac_reduction:
            from automl.compress.pruning.allocation import ratio_for_mac_target

            ratio, _ = ratio_for_mac_target(model, example, cfg.mac_reduction,
                                            lambda level: _thin_uniform(model, example, level, cfg.layers, round_to))
        notes["thinned_ratio"] = float(ratio)
        return _thin_uniform(model, example, ratio, cfg.layers, round_to)
    if stage.method == "layer":
        from automl.compress.pruning import layerwise as lw

        candidates = lw.select_blocks(lw.removable_blocks(model, example, plain=cfg.plain), cfg.layers)
        count = lw.blocks_to_remove(cfg.blocks, len(candidates))
        chosen = lw.choose_blocks({n: float(i) for i, n in enumerate(candidates)}, count, candidates)
        lw.remove_blocks(model, [(n, candidates[n]) for n in chosen])
        notes["removed_blocks"] = list(chosen)
    return model   # masks only: the deployed dense kernels keep their shapes


def build_candidate(space, config: Dict[str, Any], *, task=None, runtime: str = "onnxruntime",
                    batch: Optional[int] = None, seed: int = 0) -> Candidate:
    """The deployed-shape model of ``config`` with random weights (see the module docstring)."""
    from automl.recipe.from_config import recipe_from_config
    from automl.tasks import get_task

    task = task if task is not None else get_task(space.task)
    recipe = recipe_from_config(space, config)
    torch.manual_seed(seed)
    model = task.build_model(recipe.family, recipe.arch).eval()
    probe = task.example_input(1)
    notes: Dict[str, Any] = {}
    for stage in recipe.stages:
        if stage.category == "pruning":
            model = _apply_structure(model, probe, stage, notes).eval()
    example = task.example_input(batch or space.deploy.batch)
    if example.shape[0] != (batch or space.deploy.batch):   # a task with fewer samples than the batch
        example = example[:1].repeat(batch or space.deploy.batch, *([1] * (example.dim() - 1)))
    return Candidate(dict(config), model, example, deployed_precision(recipe, runtime), notes)


def _grid_params(space, limit: int):
    """Finite unconditioned arch/quantization parameters and their values, if the grid is small."""
    grid = {}
    for p in space.params:
        if not (p.name.startswith("arch.") or p.name.startswith("quantization.")):
            continue
        d = p.domain
        values = list(d.values) if isinstance(d, Choice) else [d.value] if isinstance(d, Fixed) else \
            list(range(d.low, d.high + 1, d.step)) if isinstance(d, IntRange) and not d.log else None
        if values is None:
            return {}
        grid[p.name] = values
    size = int(np.prod([len(v) for v in grid.values()])) if grid else 0
    return grid if size <= limit else {}


def space_configs(space, *, samples: int = 200, seed: int = 0, grid_limit: int = 2000) -> List[Dict]:
    """Random configs of the space (seeds ``seed`` ...), plus every combination of the finite
    architecture and quantization parameters without pruning when that grid has at most
    ``grid_limit`` points, so no unpruned shape is left to chance. Deduplicated."""
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
    """The distinct layer keys the space's candidates need under ``runtime``, and counts of what was
    looked at (configs, distinct models, configs skipped because the runtime cannot deploy them)."""
    from automl.tasks import get_task

    check_runtime(runtime)
    task = task if task is not None else get_task(space.task)
    configs = space_configs(space, samples=samples, seed=seed)
    lists, skipped, models = [], 0, set()
    for i, config in enumerate(configs):
        cand = build_candidate(space, config, task=task, runtime=runtime, batch=batch, seed=i)
        if cand.precision not in RUNTIMES[runtime]:
            skipped += 1
            continue
        models.add(tuple(layer.key for layer in cand.layers))
        lists.append(cand.layers)
    if not lists:
        raise ConfigError(f"runtime '{runtime}' deploys none of the space's candidates", key="--runtime",
                          value=runtime, fix=f"it deploys {', '.join(RUNTIMES[runtime])}; choose another runtime")
    keys = distinct_keys(lists)
    return keys, {"configs": len(configs), "models": len(models), "skipped": skipped, "keys": len(keys)}
