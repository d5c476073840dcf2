"""Whole-model checks of a profile: fitting the correction (calibration) and validating the predictor.

Both draw random candidates of the space (pruned ones included: they are built in their deployed
shape, see candidates.py), export and measure them whole on the profile's runtime, and compare with
the sum of their entries. Calibration and validation use disjoint seed ranges, so the figures are
measured on candidates the correction was not fitted on. Whole models are measured with the
profile's protocol, re-measuring a chunk whose reference layer drifted from the profile's usual time.
"""
from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from automl.errors import ConfigError
from automl.hardware.candidates import RUNTIMES, Candidate, build_candidate
from automl.hardware.layers import weight_bytes
from automl.hardware.predict import fit_correction, predict_keys, price_layer
from automl.hardware.profile import HardwareProfile
from automl.io import write_json
from automl.spaces.adapter import sample_config

CALIBRATION_SEED = 100_000
VALIDATION_SEED = 200_000
# candidates -> (latency in ms on the profile's time base, drift of each measurement)
MeasureFn = Callable[[Sequence[Candidate]], Sequence]


def sample_candidates(space, n: int, *, seed: int, runtime: str, batch: int, task=None,
                      precision: Optional[str] = None, max_tries: Optional[int] = None) -> List[Candidate]:
    """``n`` random candidates (seeds ``seed``, ``seed + 1`` ...) that ``runtime`` deploys, optionally
    of one precision; fewer when the space rarely produces it within ``max_tries`` draws."""
    from automl.tasks import get_task

    task = task if task is not None else get_task(space.task)
    out, tries = [], max_tries or 50 * n
    for i in range(tries):
        if len(out) == n:
            break
        cand = build_candidate(space, sample_config(space, seed=seed + i), task=task, runtime=runtime, batch=batch,
                               seed=seed + i)
        if cand.precision in RUNTIMES[runtime] and (precision is None or cand.precision == precision):
            out.append(cand)
    return out


def _real_measure(profile: HardwareProfile, label: str, progress: bool) -> MeasureFn:
    from automl.hardware.measure import Progress, measure_candidates

    def measure(cands):
        bar = Progress(len(cands), label, unit="models", enabled=progress)
        stats = measure_candidates(cands, runtime=profile.device.runtime, threads=profile.device.threads,
                                   protocol=profile.protocol, progress=bar)
        return [(s.median_ms, s.drift) for s in stats]
    return measure


def _latencies(results) -> tuple:
    """A MeasureFn returns plain latencies (drift 1) or (latency, drift of its chunk) pairs."""
    pairs = [(float(r), 1.0) if np.isscalar(r) else (float(r[0]), float(r[1])) for r in results]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _spread(cands: List[Candidate], sums: List[float], n: int) -> List[int]:
    """Indices of ``n`` candidates evenly spaced over the sorted sums (the range ends included)."""
    order = sorted(range(len(cands)), key=lambda i: sums[i])
    if len(order) <= n:
        return order
    return [order[int(round(j * (len(order) - 1) / (n - 1)))] for j in range(n)] if n > 1 else order[-1:]


def calibrate(profile: HardwareProfile, space, *, per_precision: int = 20, seed: int = CALIBRATION_SEED,
              task=None, measure: Optional[MeasureFn] = None, progress: bool = True, pool: int = 4) -> HardwareProfile:
    """Measure ``per_precision`` whole candidates for each precision of the profile and fit the
    correction per precision (stored in ``profile.corrections``). The candidates are picked evenly
    over the range of summed entries from ``pool`` times as many random ones, so the fit sees small
    and large models (and those whose weights spill out of L2)."""
    measure = measure or _real_measure(profile, "calibrating (whole models)", progress)
    cands: List[Candidate] = []
    for i, p in enumerate(profile.device.precisions):
        drawn = sample_candidates(space, per_precision * pool, seed=seed + 10_000 * i, runtime=profile.device.runtime,
                                  batch=profile.device.batch, task=task, precision=p)
        sums = [sum(price_layer(profile, t.key, space=space.source).latency_ms for t in c.layers) for c in drawn]
        cands += [drawn[j] for j in _spread(drawn, sums, per_precision)]
    if not cands:
        raise ConfigError("no candidate of the space runs on the profile's runtime", key="--runtime",
                          value=profile.device.runtime, fix="profile with the runtime the space deploys to")
    measured, drift = _latencies(measure(cands))
    rows = []
    for c, m, dr in zip(cands, measured, drift):
        keys = [t.key for t in c.layers]
        rows.append({"precision": c.precision, "n_layers": len(keys),
                     "sum_ms": round(sum(price_layer(profile, k, space=space.source).latency_ms for k in keys), 9),
                     "measured_ms": round(m, 9), "drift": round(dr, 6),
                     "layer_bytes": [weight_bytes(k) for k in keys]})
    for p in sorted({c.precision for c in cands}):
        mine = [r for r in rows if r["precision"] == p]
        profile.corrections[p] = fit_correction(*([r[k] for r in mine] for k in ("sum_ms", "n_layers", "measured_ms",
                                                                                 "layer_bytes")),
                                                l2_cache_kb=profile.device.l2_cache_kb)
    profile.calibration = rows
    return profile


def validation_figures(predicted: Sequence[float], measured: Sequence[float]) -> Dict[str, object]:
    """Share within +-10% and +-5%, Kendall tau, RMSPE and mean signed error of predicted vs measured."""
    from scipy.stats import kendalltau

    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if p.shape != m.shape or p.size == 0 or np.any(m <= 0):
        raise ConfigError("validation needs as many positive measurements as predictions",
                          value=(p.size, m.size))
    err = (p - m) / m
    tau = float(kendalltau(p, m).statistic) if p.size > 1 else float("nan")
    return {"samples": int(p.size), "within_10pct": float(np.mean(np.abs(err) <= 0.10)),
            "within_5pct": float(np.mean(np.abs(err) <= 0.05)),
            "kendall_tau": None if math.isnan(tau) else tau, "rmspe": float(np.sqrt(np.mean(err ** 2))),
            "mean_error": float(np.mean(err)), "max_abs_error": float(np.max(np.abs(err)))}


def plot_validation(path, predicted, measured, precisions, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for prec in sorted(set(precisions)):
        idx = [i for i, q in enumerate(precisions) if q == prec]
        ax.scatter([measured[i] for i in idx], [predicted[i] for i in idx], s=14, label=prec)
    lo, hi = min(min(predicted), min(measured)) * 0.8, max(max(predicted), max(measured)) * 1.25
    grid = np.geomspace(lo, hi, 50)
    ax.plot(grid, grid, "k-", lw=0.8, label="exact")
    ax.fill_between(grid, grid * 0.9, grid * 1.1, color="grey", alpha=0.2, label="+-10%")
    ax.set(xscale="log", yscale="log", xlabel="measured latency (ms)", ylabel="predicted latency (ms)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def validate_profile(profile: HardwareProfile, space, out_dir, *, samples: int = 100, seed: int = VALIDATION_SEED,
                     task=None, measure: Optional[MeasureFn] = None, progress: bool = True,
                     save_profile: bool = True) -> Dict[str, object]:
    """Predict and measure ``samples`` random candidates; write validation.json and validation.png to
    ``out_dir`` and store the figures in the profile (saved back to its file)."""
    if profile.modelled:
        raise ConfigError("a modelled profile has no device to measure candidates on", key="--profile",
                          value=profile.device.runtime,
                          fix="validate a measured profile (automl profile measure); a modelled one is only predicted")
    out_dir = Path(out_dir)
    cands = sample_candidates(space, samples, seed=seed, runtime=profile.device.runtime, batch=profile.device.batch,
                              task=task)
    if not cands:
        raise ConfigError("no candidate of the space runs on the profile's runtime", key="--runtime",
                          value=profile.device.runtime, fix="validate with a profile for the space's runtime")
    preds = [predict_keys(profile, [layer.key for layer in c.layers], space=space.source) for c in cands]
    measure = measure or _real_measure(profile, "validating (whole models)", progress)
    measured, drift = _latencies(measure(cands))
    figures = validation_figures([p.latency_ms for p in preds], measured)
    rows = [{"config": c.config, "precision": c.precision, "predicted_ms": p.latency_ms, "measured_ms": m,
             "drift": d, "error": (p.latency_ms - m) / m, "sum_ms": p.sum_ms,
             "n_layers": p.n_layers, "spill_mb": p.spill_mb, "interpolated": p.count("interpolated"),
             "extrapolated": p.count("extrapolated"), "energy_mj": p.energy_mj,
             **({"structure": c.notes} if c.notes else {})}
            for c, p, m, d in zip(cands, preds, measured, drift)]
    worst = sorted(range(len(rows)), key=lambda i: -abs(rows[i]["error"]))[:5]
    figures["worst"] = [{k: rows[i][k] for k in ("config", "precision", "predicted_ms", "measured_ms", "error")}
                        for i in worst]
    figures["by_precision"] = {
        prec: validation_figures([r["predicted_ms"] for r in rows if r["precision"] == prec],
                                 [r["measured_ms"] for r in rows if r["precision"] == prec])
        for prec in sorted({r["precision"] for r in rows})}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "validation.json", {"profile": profile.source, "space": space.source, "seed": seed,
                                             "figures": figures, "candidates": rows})
    tau = figures["kendall_tau"]
    plot_validation(out_dir / "validation.png", [r["predicted_ms"] for r in rows], measured,
                    [r["precision"] for r in rows],
                    f"{len(rows)} candidates: {100 * figures['within_10pct']:.0f}% within +-10%, "
                    f"tau {'n/a' if tau is None else format(tau, '.2f')}")
    profile.validation = {**{k: v for k, v in figures.items() if k != "worst"},
                          "worst_error": rows[worst[0]]["error"], "seed": seed,
                          "space_hash": space.hash, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if save_profile and profile.source:
        profile.save()
    return figures
