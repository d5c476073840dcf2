"""pareto.png: the front against every completed trial, one panel per pair of objectives, and the
front's hypervolume as trials finished."""
from __future__ import annotations

import io
import itertools
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from automl.io import atomic_write_bytes
from automl.search.pareto import REFERENCE, scaled_hypervolumes
from automl.spaces import SearchSpace


def plot_search(path: Path, rows: Sequence[Dict], front: Sequence[Dict], space: SearchSpace,
                cost_source: str = "measured, deployed model", baseline: Optional[Dict] = None) -> List[float]:
    """Writes the figure; returns the hypervolume after each completed, feasible trial (rows in the
    order they finished)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space.objectives)
    pairs = list(itertools.combinations(keys, 2)) or [(keys[0], keys[0])]
    done = [r["metrics"] for r in rows if r["status"] == "completed"]
    eligible = [r["metrics"] for r in rows if r["status"] == "completed" and r.get("feasible")]
    volumes = scaled_hypervolumes(eligible, space.objectives)
    panels = len(pairs) + 1
    cols = min(panels, 2 if panels <= 4 else 3)
    fig, axes = plt.subplots(math.ceil(panels / cols), cols, figsize=(5.2 * cols, 4.0 * math.ceil(panels / cols)),
                             dpi=100, squeeze=False)
    flat = list(axes.flat)
    for ax, (x, y) in zip(flat, pairs):
        _pair_panel(ax, x, y, done, [r["metrics"] for r in front], baseline, cost_source)
    _volume_panel(flat[len(pairs)], volumes, len(keys))
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(f"{len(done)} completed trials; the front is over all objectives ({', '.join(keys)})", fontsize=9)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return volumes


def _values(metrics: Sequence[Dict], key: str) -> List[float]:
    return [100 * m[key] if key.startswith("accuracy") else m[key] for m in metrics]


def _pair_panel(ax, x: str, y: str, done, front, baseline, cost_source: str):
    both = [m for m in done if x in m and y in m]
    ax.scatter(_values(both, x), _values(both, y), s=14, c="#b0b0b0", label=f"completed trials ({len(both)})")
    points = [m for m in front if x in m and y in m]
    if points:
        ax.scatter(_values(points, x), _values(points, y), s=36, c="#d62728", zorder=3,
                   label=f"Pareto front ({len(points)})")
    if baseline and x in baseline and y in baseline:
        ax.scatter(_values([baseline], x), _values([baseline], y), s=110, marker="*", c="black", zorder=4,
                   label="uncompressed model")
    for axis, key, setter in ((ax.xaxis, x, ax.set_xscale), (ax.yaxis, y, ax.set_yscale)):
        if not key.startswith("accuracy") and all(v > 0 for v in _values(both, key)) and both:
            setter("log")
        axis.set_label_text(_label(key, cost_source))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _label(key: str, cost_source: str) -> str:
    if key.startswith("accuracy"):
        return f"validation {key} (%)"
    return f"{key} ({cost_source})" if key in ("latency_ms", "energy_mj") else key


def _volume_panel(ax, volumes: Sequence[float], dims: int):
    if volumes:
        ax.plot(range(1, len(volumes) + 1), volumes, c="#1f77b4", marker="o", ms=3)
    ax.set_xlabel("completed, feasible trials (in the order they finished)")
    ax.set_ylabel(f"front hypervolume (scaled; ideal {REFERENCE ** dims:.3f})")
    ax.grid(alpha=0.3)
