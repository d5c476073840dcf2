"""Pruning sensitivity analysis (Distiller-style): prune ONE layer at a time at a series of levels,
evaluate, restore, and read off how much pruning each layer tolerates.

  element  the ``level`` share of the layer's smallest-magnitude weights is zeroed
  filter   the ``level`` share of the layer's output filters (Conv) / output rows (Linear) with the
           smallest L1 norm is zeroed (at least one is kept)

Only masks are applied (weights set to zero, no thinning), so every point costs one evaluation and
the model is put back bit-exactly afterwards. ``ratios_from_sensitivity`` turns the rows into
per-layer pruning ratios for a tolerated accuracy drop; they fit ``PruningConfig.per_layer`` of a
ratio method (magnitude, agp ...).
"""
from __future__ import annotations

import csv
import io
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from automl.compress.layers import PRUNABLE, select_layers
from automl.compress.pruning.criteria import l1_norm, rank_to_keep
from automl.compress.pruning.granularity import expand_mask, group_view
from automl.compress.pruning.magnitude import magnitude_masks
from automl.errors import ConfigError
from automl.io import atomic_write_bytes, atomic_write_text
from automl.registry import unknown_name

SUPPORTED = ("element", "filter")
COLUMNS = ("layer", "granularity", "level", "accuracy", "drop", "params", "pruned")

Row = Dict[str, object]


def check_levels(levels: Iterable[float], key: str = "levels") -> List[float]:
    """Levels as sorted unique floats, each strictly inside (0, 1)."""
    out = []
    for level in levels:
        ok = isinstance(level, (int, float)) and not isinstance(level, bool) and 0.0 < level < 1.0
        if not ok:
            raise ConfigError("every sensitivity level must be a share strictly between 0 and 1", key=key,
                              value=level, fix="use levels such as 0.1,0.2,...,0.9")
        out.append(float(level))
    if not out:
        raise ConfigError("no sensitivity levels given", key=key, value=[], fix="give at least one level, e.g. 0.5")
    return sorted(set(out))


def check_granularities(granularities: Iterable[str], key: str = "granularity") -> List[str]:
    out = []
    for g in granularities:
        if g not in SUPPORTED:
            raise unknown_name("sensitivity granularity", g, SUPPORTED, key=key)
        if g not in out:
            out.append(g)
    if not out:
        raise ConfigError("no granularity given", key=key, value=[], fix=f"use {' or '.join(SUPPORTED)}")
    return out


def keep_mask(weight: torch.Tensor, granularity: str, level: float) -> torch.Tensor:
    """Bool keep-mask of ``weight``'s shape that prunes the ``level`` share at ``granularity``."""
    if granularity == "element":
        return magnitude_masks({"w": weight}, level)["w"]
    if granularity == "filter":
        keep = rank_to_keep(l1_norm(group_view(weight, "filter")), level)
        return expand_mask(keep, weight.shape, "filter")
    raise unknown_name("sensitivity granularity", granularity, SUPPORTED, key="granularity")


def _resolve(model: nn.Module, layers) -> Dict[str, nn.Module]:
    if layers is None:
        layers = ["re:.*"]
    if isinstance(layers, str):
        layers = [layers]
    chosen = dict(layers) if isinstance(layers, Mapping) else select_layers(model, list(layers), kinds=PRUNABLE)
    for name, module in chosen.items():
        if parametrize.is_parametrized(module, "weight"):
            raise ConfigError("layer weight is parametrized (masked); zeroing it would not stick", key=name,
                              value=type(module).__name__, fix="analyse the dense model, before masks are attached")
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ConfigError("layer has no weight tensor", key=name, value=type(module).__name__,
                              fix="select Conv/Linear layers")
    return chosen


def _set(weight: torch.Tensor, value: torch.Tensor):
    with torch.no_grad():   # only the edit; ``evaluate`` keeps autograd if it wants it
        weight.copy_(value)


def analyze(model: nn.Module, evaluate: Callable[[nn.Module], float], layers=None,
            levels: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
            granularities: Sequence[str] = SUPPORTED, *, baseline: Optional[float] = None,
            on_row: Optional[Callable[[Row], None]] = None) -> List[Row]:
    """One row per (layer, granularity, level), each with only that layer pruned.

    ``layers``: a {name: module} mapping, or names / 're:' patterns (None = every Conv/Linear).
    ``evaluate(model) -> accuracy`` is called in eval mode; ``baseline`` (the unpruned accuracy) is
    measured first unless given. ``drop = baseline - accuracy``. Weights are restored after every
    point (also when ``evaluate`` raises), and the train/eval flag at the end.
    """
    levels = check_levels(levels)
    granularities = check_granularities(granularities)
    chosen = _resolve(model, layers)
    was_training = model.training
    model.eval()
    try:
        base = float(evaluate(model)) if baseline is None else float(baseline)
        rows: List[Row] = []
        for name, module in chosen.items():
            weight = module.weight
            original = weight.detach().clone()
            try:
                for g in granularities:
                    for level in levels:
                        mask = keep_mask(original, g, level)
                        _set(weight, torch.where(mask, original, torch.zeros_like(original)))
                        accuracy = float(evaluate(model))
                        _set(weight, original)
                        row = {"layer": name, "granularity": g, "level": level, "accuracy": accuracy,
                               "drop": base - accuracy, "params": original.numel(),
                               "pruned": int((~mask).sum())}
                        rows.append(row)
                        if on_row is not None:
                            on_row(row)
            finally:
                _set(weight, original)
    finally:
        model.train(was_training)
    return rows


def baseline_of(rows: Sequence[Row]) -> float:
    """The unpruned accuracy the rows were measured against."""
    if not rows:
        raise ConfigError("no sensitivity rows", value=[], fix="run analyze() on at least one layer")
    return float(rows[0]["accuracy"]) + float(rows[0]["drop"])


def _of(rows: Sequence[Row], granularity: str) -> List[Row]:
    present = sorted({str(r["granularity"]) for r in rows})
    picked = [r for r in rows if r["granularity"] == granularity]
    if not picked:
        raise ConfigError("the sensitivity rows hold no points at this granularity", key="granularity",
                          value=granularity, fix=f"analyse it too, or use one of: {', '.join(present) or '(none)'}")
    return picked


def ratios_from_sensitivity(rows: Sequence[Row], max_drop: float, granularity: str = "element") -> Dict[str, float]:
    """{layer: largest level whose accuracy drop is <= max_drop}, 0.0 where no level is; layers in
    row order. Levels are judged one by one (a noisy curve may tolerate 0.6 but not 0.5)."""
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0.0 <= max_drop < 1.0:
        raise ConfigError("max_drop must be an accuracy share in [0, 1)", key="max_drop", value=max_drop,
                          fix="use e.g. 0.01 for one percentage point")
    ratios: Dict[str, float] = {}
    for r in _of(rows, granularity):
        best = ratios.setdefault(str(r["layer"]), 0.0)
        if float(r["drop"]) <= max_drop + 1e-12 and float(r["level"]) > best:  # 1e-12: float noise in base - acc
            ratios[str(r["layer"])] = float(r["level"])
    return ratios


def rank_layers(rows: Sequence[Row], granularity: str = "element") -> List[tuple]:
    """[(layer, mean drop over the levels, params)], most sensitive first."""
    sums: Dict[str, list] = {}
    for r in _of(rows, granularity):
        entry = sums.setdefault(str(r["layer"]), [0.0, 0, int(r["params"])])
        entry[0] += float(r["drop"])
        entry[1] += 1
    ranked = [(name, total / count, params) for name, (total, count, params) in sums.items()]
    return sorted(ranked, key=lambda t: -t[1])


# writers ----------------------------------------------------------------------------------------------
def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def write_csv(path, rows: Sequence[Row]):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(r[k]) for k in COLUMNS})
    return atomic_write_text(path, buf.getvalue())


def read_csv(path) -> List[Row]:
    """Rows back from ``write_csv`` (numbers parsed), e.g. to re-derive ratios at another max_drop."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [{"layer": r["layer"], "granularity": r["granularity"], "level": float(r["level"]),
                 "accuracy": float(r["accuracy"]), "drop": float(r["drop"]), "params": int(r["params"]),
                 "pruned": int(r["pruned"])} for r in csv.DictReader(handle)]


def plot_sensitivity(path, rows: Sequence[Row], *, title: str = "pruning sensitivity"):
    """Accuracy vs level, one line per layer (starting at the unpruned accuracy), one panel per granularity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = baseline_of(rows)
    grans = list(dict.fromkeys(str(r["granularity"]) for r in rows))
    n_layers = len({r["layer"] for r in rows})
    fig, axes = plt.subplots(1, len(grans), figsize=(5.2 * len(grans), 4.2), dpi=120, sharey=True, squeeze=False)
    for ax, g in zip(axes[0], grans):
        lines: Dict[str, list] = {}
        for r in _of(rows, g):
            lines.setdefault(str(r["layer"]), [(0.0, base)]).append((float(r["level"]), float(r["accuracy"])))
        for layer, pts in lines.items():
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, linewidth=1.2, label=layer)
        ax.axhline(100 * base, color="#888888", linestyle="--", linewidth=0.8)
        ax.set_title(f"{g} pruning", fontsize=9)
        ax.set_xlabel("level (share pruned in that layer only)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%)")
    axes[0][-1].legend(fontsize=6 if n_layers > 8 else 8, loc="lower left", ncol=1 + n_layers // 12)
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


# recipes ----------------------------------------------------------------------------------------------
def per_layer_target(recipe, granularities: Sequence[str], key: str = "--write-recipe") -> tuple:
    """(index of the recipe's pruning stage that can take per-layer ratios, the granularity whose
    ratios fit it). Raises a ConfigError saying why when the recipe cannot take them."""
    from automl.compress.base import get_method

    index = next((i for i, s in enumerate(recipe.stages) if s.category == "pruning"), None)
    if index is None:
        raise ConfigError("the recipe has no pruning stage to take per-layer ratios", key=key,
                          value=[s.method for s in recipe.stages],
                          fix="add a pruning stage (e.g. method: magnitude) to the recipe, or leave out --write-recipe")
    stage = recipe.stages[index]
    where = f"stages.{index}.config"
    if not hasattr(stage.config, "per_layer"):
        raise ConfigError(f"pruning method '{stage.method}' has no per_layer setting", key=where, value=stage.method,
                          fix="use a ratio method with per_layer, such as magnitude or agp")
    handler = get_method(stage.method).handler_cls
    if getattr(handler, "level_kind", "sparsity") != "sparsity":
        raise ConfigError(f"per_layer of '{stage.method}' holds {getattr(handler, 'level_field', 'level')} values, "
                          "not shares pruned", key=where, value=stage.method,
                          fix="use a ratio method such as magnitude or agp for sensitivity ratios")
    granularity = getattr(stage.config, "granularity", "element")
    if granularity not in granularities:
        fix = (f"add {granularity} to --granularity" if granularity in SUPPORTED else
               f"sensitivity analysis covers {' and '.join(SUPPORTED)} pruning only")
        raise ConfigError(f"the recipe's pruning stage prunes at '{granularity}' granularity, which is not analysed",
                          key="--granularity", value=list(granularities), fix=fix)
    return index, granularity


def recipe_with_per_layer(recipe, index: int, ratios: Mapping[str, float], model: nn.Module,
                          provenance: Optional[dict] = None):
    """A copy of ``recipe`` whose stage ``index`` has ``per_layer`` = the ratios of the layers it prunes
    (the others are returned, skipped). Recorded metrics are dropped: they belong to the old recipe."""
    import dataclasses

    stage = recipe.stages[index]
    pruned = select_layers(model, stage.config.layers, kinds=PRUNABLE)
    kept = {n: float(r) for n, r in ratios.items() if n in pruned}
    skipped = [n for n in ratios if n not in pruned]
    if not kept:
        raise ConfigError("none of the analysed layers is pruned by the recipe's pruning stage",
                          key=f"stages.{index}.config.layers", value=list(stage.config.layers),
                          fix=f"analyse some of: {', '.join(pruned)}")
    stages = list(recipe.stages)
    stages[index] = dataclasses.replace(stage, config=dataclasses.replace(stage.config, per_layer=kept))
    new = dataclasses.replace(recipe, stages=tuple(stages), metrics={},
                              provenance={**recipe.provenance, **(provenance or {})})
    return new, skipped
