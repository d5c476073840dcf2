"""Everything a run directory holds, written from plain trial rows (no Ray here)."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from automl.io import atomic_write_text, write_json
from automl.recipe import recipe_from_config
from automl.search.pareto import pareto_front
from automl.search.plots import plot_search
from automl.search.rundir import write_output_set
from automl.spaces import SearchSpace

META = ("trial_id", "status", "feasible", "error", "traceback")


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
    params = space.names()  # then parameters a search phase added (budget.strategy sequential)
    added = sorted({k for r in rows for k in r.get("config", {})} - set(params))
    return list(META) + metrics + extra + added + params


def flatten(row: Dict) -> Dict:
    return {**{k: row.get(k) for k in META}, **row.get("metrics", {}), **row.get("config", {})}


def front_rows(rows: Sequence[Dict], space: SearchSpace) -> List[Dict]:
    eligible = [r for r in rows if r["status"] == "completed" and r.get("feasible")]
    return [eligible[i] for i in pareto_front([r["metrics"] for r in eligible], space.objectives)]


def _best(front: Sequence[Dict], space: SearchSpace) -> Dict[str, Dict]:
    best = {}
    for metric, mode in space.objectives.items():
        pick = max if mode == "max" else min
        if front:
            row = pick(front, key=lambda r: r["metrics"][metric])
            best[metric] = {"trial_id": row["trial_id"], "value": row["metrics"][metric]}
    return best


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _signed(value) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _profile_markdown(info: Dict) -> List[str]:
    dev, val = info["device"], info["validation"]
    if info.get("latency_source") == "modelled":
        lines = ["## Hardware profile (MODELLED, not measured)", "",
                 f"- file: `{info['path']}` ({info['entries']} entries), an analytic model of {dev['runtime']}: "
                 "every latency and energy below is predicted by the model, nothing was measured", ""]
        lines += ["Where each metric comes from:", ""]
        return lines + [f"- {k}: {v}" for k, v in info["metric_sources"].items()] + [""]
    lines = ["## Hardware profile", "",
             f"- file: `{info['path']}` ({info['entries']} entries, {info['status']}, created {info['created']})",
             f"- device: {dev['cpu_model']}, {dev['threads']} thread(s), batch {dev['batch']}, {dev['runtime']} "
             f"{dev['runtime_version']}, precisions {', '.join(dev['precisions'])}",
             f"- measured for space `{info['measured_for_space'].get('source', '?')}`"
             + ("" if info["same_space"] else " (not this space: layers it lacks are interpolated or fail)"),
             f"- energy: {info['energy_source']}"]
    if val:
        tau = val.get("kendall_tau")
        lines.append(f"- validation ({val.get('samples', '?')} whole models, {val.get('date', '?')}): "
                     f"{_pct(val.get('within_10pct'))} within +-10%, Kendall tau "
                     f"{'n/a' if tau is None else format(tau, '.3f')}, RMSPE {_pct(val.get('rmspe'))}")
    else:
        lines.append("- validation: none recorded (run `automl profile validate`)")
    lines += ["", "Where each metric comes from:", ""]
    lines += [f"- {k}: {v}" for k, v in info["metric_sources"].items()]
    return lines + [""]


def _front_check_markdown(check: Dict) -> List[str]:
    lines = ["## Predicted vs measured (Pareto front)", "",
             f"Every front recipe applied again and its deployed model timed on {check['measured_on']} "
             f"with {check['protocol']}.",
             ""]
    if not check["same_cpu"]:
        lines += ["**The profile describes another CPU than the one measured here: the errors below compare "
                  "two devices.**", ""]
    lines += ["| trial | precision | predicted ms | measured ms | error | apply ms | accuracy (search / re-applied) |",
              "|---|---|---|---|---|---|---|"]
    for r in check["rows"]:
        lines.append(f"| {r['trial_id']} | {r['precision']} | {r['predicted_ms']:.6g} | {r['measured_ms']:.6g} | "
                     f"{100 * r['error']:+.1f}% | {_fmt(r['apply_latency_ms'])} | "
                     f"{_fmt(r['search_accuracy'])} / {_fmt(r['measured_accuracy'])} |")
    lines += ["", f"Within +-{100 * check['tolerance']:.0f}%: {_pct(check['within_10pct'])} of {check['points']} "
                  f"points; mean error {_signed(check['mean_error'])}, largest |error| "
                  f"{_pct(check['max_abs_error'])}.", ""]
    return lines


def within_budget(rows: Sequence[Dict]) -> Dict[str, Dict]:
    """The fastest and the smallest completed, feasible trial (the constraints, e.g. accuracy_drop,
    are the budget), with their speed-up and size reduction against the baseline."""
    ok = [r for r in rows if r["status"] == "completed" and r.get("feasible")]
    out = {}
    for label, key in (("fastest", "latency_ms"), ("smallest", "size_kb")):
        have = [r for r in ok if isinstance(r["metrics"].get(key), (int, float))]
        if have:
            m = min(have, key=lambda r: r["metrics"][key])
            out[label] = {"trial_id": m["trial_id"], **{k: m["metrics"].get(k) for k in (
                "accuracy", "accuracy_drop", "latency_ms", "size_kb", "speedup", "size_reduction", "precision")}}
    return out


def _baseline_markdown(report: Dict) -> List[str]:
    base = report["baseline"]
    lines = ["## Against the uncompressed model", "",
             f"Baseline (the model as given, measured once): accuracy {_fmt(base.get('accuracy'))}, test accuracy "
             f"{_fmt(base.get('test_accuracy'))}, latency {_fmt(base.get('latency_ms'))} ms, size "
             f"{_fmt(base.get('size_kb'))} kB, {_fmt(base.get('params'))} parameters, "
             f"{_fmt(base.get('macs'))} MACs.", ""]
    picks = report.get("within_budget") or {}
    if not picks:
        return lines + ["No completed trial meets the constraints (the accuracy budget).", ""]
    lines += ["Within the constraints (the accuracy budget):", "",
              "| pick | trial | accuracy | accuracy drop | latency ms | speed-up | size kB | size reduction "
              "| precision |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, p in picks.items():
        lines.append(f"| {label} | {p['trial_id']} | {_fmt(p['accuracy'])} | {_fmt(p['accuracy_drop'])} | "
                     f"{_fmt(p['latency_ms'])} | {_fmt(p['speedup'])}x | {_fmt(p['size_kb'])} | "
                     f"{_fmt(p['size_reduction'])}x | {p['precision']} |")
    slower = [label for label, p in picks.items() if (p.get("speedup") or 1.0) < 1.0]
    if slower:
        lines += ["", f"Note: the {' and '.join(slower)} pick is SLOWER than the uncompressed model."]
    return lines + [""]


def _markdown(report: Dict, front: Sequence[Dict], space: SearchSpace) -> str:
    keys = list(space.objectives) + ["test_accuracy", "precision", "nonzero_params"]
    if "profile" in report:
        keys += [k for k in ("latency_ms", "energy_mj", "measured_latency_ms") if k not in keys and any(
            k in r["metrics"] for r in front)]
        cost = ("- latency_ms and energy_mj: PREDICTED from the hardware profile below; accuracy and size_kb: "
                "measured on the deployed model")
    else:
        cost = ("- latency: median of batch-"
                f"{space.deploy.batch} runs of the deployed ONNX model in onnxruntime, {space.deploy.threads} "
                "thread(s); size_kb: deflate-compressed size of that file")
    lines = [
        "# automl search report", "",
        f"- space: `{report['space_source']}` (hash `{report['space_hash']}`), task `{space.task}`",
        f"- trials: {report['trials']} ({', '.join(f'{k} {v}' for k, v in report['status_counts'].items())})",
        f"- wall time: {report['wall_time_s']:.1f} s",
        "- search: " + ", ".join(f"{k} {v}" for k, v in report["search"].items())
        + f"; front hypervolume {report['hypervolume']:.4f} (objectives scaled to this run's range, reference 1.05)",
        cost, "", "![front against every completed trial, per pair of objectives](pareto.png)", "",
        "## Pareto front", "",
        "| trial | " + " | ".join(keys) + " | recipe |",
        "|---" * (len(keys) + 2) + "|",
    ]
    if report.get("baseline"):
        vals = [_fmt(report["baseline"].get(k)) for k in keys]
        lines.append("| **baseline** | " + " | ".join(str(v) for v in vals) + " | (uncompressed) |")
    for r in front:
        vals = [_fmt(r["metrics"].get(k)) for k in keys]
        lines.append(f"| {r['trial_id']} | " + " | ".join(str(v) for v in vals) + f" | recipes/{r['trial_id']}.yaml |")
    slower = [r for r in front if "warning" in r["metrics"] and "speedup_vs_float" in r["metrics"]]
    if slower:
        lines += ["", "Int8 / fp16 SLOWER than its own fp32 form (measured, `speedup_vs_float` in trials.csv): "
                  + ", ".join(f"{r['trial_id']} ({r['metrics']['speedup_vs_float']:.2f}x)" for r in slower)
                  + ". Their lower precision buys size, not speed."]
    if report.get("baseline"):
        lines += [""] + _baseline_markdown(report)
    lines += ["", "## Best per objective", ""]
    lines += [f"- {m} ({space.objectives[m]}): {b['value']:.6g} (trial {b['trial_id']})"
              for m, b in report["best"].items()]
    if "profile" in report:
        lines += [""] + _profile_markdown(report["profile"])
    if report.get("front_check"):
        lines += _front_check_markdown(report["front_check"])
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, space: SearchSpace, rows: List[Dict], *, wall_time_s: float, versions: Dict,
                  profile: Optional[Dict] = None, front_check: Optional[Dict] = None,
                  baseline: Optional[Dict] = None) -> Dict:
    """trials.csv, front.csv, pareto.png, recipes/*.yaml, report.json, report.md. Returns the report.

    ``profile`` (``costing.profile_report``) marks a profiled search: the report names the profile and
    says which metrics are predicted; ``front_check`` (``frontcheck.measure_front``) adds the table of
    predicted vs measured latency over the front; ``baseline`` (a search over a user's model) adds the
    uncompressed model as the reference row and the fastest / smallest trial within the constraints.
    The files replace the old ones as one set (``rundir.write_output_set``)."""
    return write_output_set(Path(out), lambda staging: _write_all(
        staging, space, rows, wall_time_s=wall_time_s, versions=versions, profile=profile,
        front_check=front_check, baseline=baseline))


def _write_all(out: Path, space: SearchSpace, rows: List[Dict], *, wall_time_s: float, versions: Dict,
               profile: Optional[Dict], front_check: Optional[Dict], baseline: Optional[Dict]) -> Dict:
    columns = columns_for(rows, space)
    atomic_write_text(out / "trials.csv", _csv([flatten(r) for r in rows], columns))
    front = front_rows(rows, space)
    atomic_write_text(out / "front.csv", _csv([flatten(r) for r in front], columns))
    volumes = plot_search(out / "pareto.png", rows, front, space, baseline=baseline, **(
        {"cost_source": f"predicted from the profile of {profile['device']['cpu_model']}"} if profile else {}))
    for r in front:
        extra = {"profile": profile["path"], "profile_device": profile["device"]["cpu_model"]} if profile else {}
        recipe = recipe_from_config(space, r["config"], provenance={
            "trial_id": r["trial_id"], "space_source": space.source, "versions": versions, **extra})
        metrics = {k: v for k, v in r["metrics"].items() if not (isinstance(v, float) and not math.isfinite(v))}
        dataclasses.replace(recipe, metrics=metrics).save(out / "recipes" / f"{r['trial_id']}.yaml")
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    report = {
        "space_source": space.source, "space_hash": space.hash, "task": space.task,
        "objectives": space.objectives, "constraints": space.constraints,
        "trials": len(rows), "status_counts": counts, "wall_time_s": wall_time_s,
        "search": {k: getattr(space.budget, k) for k in ("strategy", "sampler", "scheduler", "seed", "concurrency")},
        "front": [{"trial_id": r["trial_id"], "metrics": r["metrics"], "config": r["config"],
                   "recipe": f"recipes/{r['trial_id']}.yaml"} for r in front],
        "best": _best(front, space), "versions": versions,
        # over (objectives scaled to this run's range, reference 1.05 each): see pareto.scaled_hypervolumes
        "hypervolume": volumes[-1] if volumes else 0.0, "hypervolume_by_trial": [round(v, 5) for v in volumes],
        "measurement": {"latency": f"median of batch-{space.deploy.batch} runs after warm-up, "
                                   f"onnxruntime CPU, {space.deploy.threads} thread(s)",
                        "size_kb": "deflate-compressed size of the deployed ONNX file"},
    }
    if baseline:
        report["baseline"] = {k: v for k, v in baseline.items() if isinstance(v, (int, float, str))}
        report["within_budget"] = within_budget(rows)
    if profile:
        report["profile"] = profile
        report["measurement"]["latency"] = profile["metric_sources"]["latency_ms"]
        report["measurement"]["energy"] = profile["metric_sources"]["energy_mj"]
        if "measured_latency_ms" in profile["metric_sources"]:
            report["measurement"]["measured_latency_ms"] = profile["metric_sources"]["measured_latency_ms"]
    if front_check is not None:
        report["front_check"] = front_check
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _markdown(report, front, space))
    return report
