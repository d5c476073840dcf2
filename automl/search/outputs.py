"""Everything a run directory holds, written from plain trial rows (no Ray here)."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Dict, List, Sequence

from automl.io import atomic_write_bytes, atomic_write_text, write_json
from automl.recipe import recipe_from_config
from automl.search.pareto import pareto_front
from automl.spaces import SearchSpace

META = ("trial_id", "status", "feasible", "error")


def _csv(rows: Sequence[Dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    return buf.getvalue()


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def columns_for(rows: Sequence[Dict], space: SearchSpace) -> List[str]:
    metrics = list(space.objectives) + ["test_accuracy"]
    extra = sorted({k for r in rows for k in r.get("metrics", {})} - set(metrics))
    return list(META) + metrics + extra + space.names()


def flatten(row: Dict) -> Dict:
    return {**{k: row.get(k) for k in META}, **row.get("metrics", {}), **row.get("config", {})}


def front_rows(rows: Sequence[Dict], space: SearchSpace) -> List[Dict]:
    eligible = [r for r in rows if r["status"] == "completed" and r.get("feasible")]
    return [eligible[i] for i in pareto_front([r["metrics"] for r in eligible], space.objectives)]


def plot_front(path: Path, rows: Sequence[Dict], front: Sequence[Dict], space: SearchSpace):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = "latency_ms" if "latency_ms" in space.objectives else next(
        (k for k in space.objectives if k != "accuracy"), "latency_ms")
    done = [r["metrics"] for r in rows if r["status"] == "completed" and x_key in r["metrics"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter([m[x_key] for m in done], [100 * m["accuracy"] for m in done], s=18, c="#b0b0b0",
               label=f"completed trials ({len(done)})")
    pts = sorted((r["metrics"][x_key], 100 * r["metrics"]["accuracy"]) for r in front)
    if pts:
        ax.scatter(*zip(*pts), s=40, c="#d62728", zorder=3, label=f"Pareto front ({len(pts)})")
    ax.set_xscale("log")
    ax.set_xlabel(f"{x_key} (measured, deployed model; log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy vs cost; front over all objectives: " + ", ".join(space.objectives), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _best(front: Sequence[Dict], space: SearchSpace) -> Dict[str, Dict]:
    best = {}
    for metric, mode in space.objectives.items():
        pick = max if mode == "max" else min
        if front:
            row = pick(front, key=lambda r: r["metrics"][metric])
            best[metric] = {"trial_id": row["trial_id"], "value": row["metrics"][metric]}
    return best


def _markdown(report: Dict, front: Sequence[Dict], space: SearchSpace) -> str:
    keys = list(space.objectives) + ["test_accuracy", "precision", "nonzero_params"]
    lines = [
        "# automl search report", "",
        f"- space: `{report['space_source']}` (hash `{report['space_hash']}`), task `{space.task}`",
        f"- trials: {report['trials']} ({', '.join(f'{k} {v}' for k, v in report['status_counts'].items())})",
        f"- wall time: {report['wall_time_s']:.1f} s",
        "- latency: median of batch-"
        f"{space.deploy.batch} runs of the deployed ONNX model in onnxruntime, {space.deploy.threads} thread(s); "
        "size_kb: deflate-compressed size of that file", "",
        "## Pareto front", "",
        "| trial | " + " | ".join(keys) + " | recipe |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for r in front:
        vals = [_fmt(r["metrics"].get(k)) for k in keys]
        lines.append(f"| {r['trial_id']} | " + " | ".join(str(v) for v in vals) + f" | recipes/{r['trial_id']}.yaml |")
    lines += ["", "## Best per objective", ""]
    lines += [f"- {m} ({space.objectives[m]}): {b['value']:.6g} (trial {b['trial_id']})"
              for m, b in report["best"].items()]
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, space: SearchSpace, rows: List[Dict], *, wall_time_s: float, versions: Dict
                  ) -> Dict:
    """trials.csv, front.csv, pareto.png, recipes/*.yaml, report.json, report.md. Returns the report."""
    out = Path(out)
    columns = columns_for(rows, space)
    atomic_write_text(out / "trials.csv", _csv([flatten(r) for r in rows], columns))
    front = front_rows(rows, space)
    atomic_write_text(out / "front.csv", _csv([flatten(r) for r in front], columns))
    plot_front(out / "pareto.png", rows, front, space)
    for r in front:
        recipe = recipe_from_config(space, r["config"], provenance={
            "trial_id": r["trial_id"], "space_source": space.source, "versions": versions})
        metrics = {k: v for k, v in r["metrics"].items() if not (isinstance(v, float) and not math.isfinite(v))}
        dataclasses.replace(recipe, metrics=metrics).save(out / "recipes" / f"{r['trial_id']}.yaml")
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    report = {
        "space_source": space.source, "space_hash": space.hash, "task": space.task,
        "objectives": space.objectives, "constraints": space.constraints,
        "trials": len(rows), "status_counts": counts, "wall_time_s": wall_time_s,
        "front": [{"trial_id": r["trial_id"], "metrics": r["metrics"], "config": r["config"],
                   "recipe": f"recipes/{r['trial_id']}.yaml"} for r in front],
        "best": _best(front, space), "versions": versions,
        "measurement": {"latency": f"median of batch-{space.deploy.batch} runs after warm-up, "
                                   f"onnxruntime CPU, {space.deploy.threads} thread(s)",
                        "size_kb": "deflate-compressed size of the deployed ONNX file"},
    }
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _markdown(report, front, space))
    return report
