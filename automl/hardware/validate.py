"""Whole-model checks of a profile: fitting the correction (calibration) and validating the predictor.

Both draw random candidates of the space (pruned ones included: they are built in their deployed
shape, see candidates.py), export and measure them whole on the profile's runtime, and compare with
the sum of their entries. Calibration and validation use disjoint seed ranges, so the figures are
measured on candidates the correction was not fitted on. Whole models are measured with the
profile's protocol, re-measuring a chunk whose reference layer drifted from the profile's usual time.

Early exit: calibration measures an early-exit candidate's backbone (one graph, as the correction
prices each deployed graph). Validation gives each early-exit candidate a real exit distribution
although its heads are untrained: random shares of a set of real inputs are made to leave at each
exit by placing the thresholds between their confidences (``exit_thresholds``); the deployed runner
is measured on those inputs at the profile's batch and the prediction (``predict_early_exit``) uses
the exit shares that runner produced on them. At batch 1 the prediction is the exact expectation;
at a larger batch a segment runs on the batch's remaining inputs, which the prediction prices as
its reach times the full batch.
"""
from __future__ import annotations

import datetime
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from automl.errors import ConfigError
from automl.hardware.candidates import RUNTIMES, Candidate, ExitPlan, InvalidCandidate, build_candidate
from automl.hardware.layers import weight_bytes
from automl.hardware.predict import expected_cost, fit_correction, predict_early_exit, predict_keys, price_layer
from automl.hardware.profile import HardwareProfile
from automl.io import write_json
from automl.spaces.adapter import sample_config

CALIBRATION_SEED = 100_000
VALIDATION_SEED = 200_000
EXIT_INPUTS = 32    # real inputs an early-exit candidate's exit distribution is measured on
# candidates -> latency in ms on the profile's time base, or (latency, drift of the measurement), or
# (latency, drift, exit shares the deployed early-exit runner produced on the candidate's plan inputs)
MeasureFn = Callable[[Sequence[Candidate]], Sequence]


def sample_candidates(space, n: int, *, seed: int, runtime: str, batch: int, task=None,
                      precision: Optional[str] = None, max_tries: Optional[int] = None,
                      keep: Optional[Callable[[Candidate], bool]] = None) -> List[Candidate]:
    """``n`` random candidates (seeds ``seed``, ``seed + 1`` ...) that ``runtime`` deploys, optionally
    of one precision and accepted by ``keep``; fewer when the space rarely produces them within
    ``max_tries`` draws. Configs their method refuses on their architecture are drawn again."""

    task = task if task is not None else space.build_task()
    out, tries = [], max_tries or 50 * n
    for i in range(tries):
        if len(out) == n:
            break
        try:
            cand = build_candidate(space, sample_config(space, seed=seed + i), task=task, runtime=runtime,
                                   batch=batch, seed=seed + i)
        except InvalidCandidate:
            continue
        if cand.precision in RUNTIMES[runtime] and (precision is None or cand.precision == precision) \
                and (keep is None or keep(cand)):
            out.append(cand)
    return out


def exit_thresholds(conf: torch.Tensor, counts: Sequence[int]) -> List[float]:
    """Thresholds (one per early exit) that let ``counts[i]`` of the inputs still running leave at early
    exit i, from their confidences ``conf`` (early exits x inputs; an input leaves when conf > threshold).
    Each lies midway between the last confidence that leaves and the first that stays, so a runtime
    whose confidences differ in the last bits decides the same; 1.0 lets none leave. Equal confidences
    move together, so fewer may leave than asked."""
    active = torch.ones(conf.shape[1], dtype=torch.bool)
    out = []
    for i, k in enumerate(counts):
        c = conf[i][active].sort(descending=True).values
        k = min(int(k), len(c))
        t = 1.0 if k == 0 else float(c[-1]) / 2 if k == len(c) else (float(c[k - 1]) + float(c[k])) / 2
        out.append(t)
        active &= ~(conf[i] > t)
    return out


def plan_exits(cand: Candidate, inputs: torch.Tensor, seed: int) -> ExitPlan:
    """A random exit distribution over ``inputs`` for an (untrained) early-exit candidate: the shares
    leaving at each exit are drawn uniformly from the simplex, thresholds placed to realise them."""
    from automl.compress.early_exit.model import confidence, exit_indices

    model, criterion = cand.model.eval(), cand.early_exit.criterion
    with torch.no_grad():
        logits = model.all_exits(inputs)
    conf = torch.stack([confidence(lg, criterion) for lg in logits])
    n_exits, n = len(logits), inputs.shape[0]
    edges = np.floor(np.cumsum(np.random.default_rng(seed).dirichlet(np.ones(n_exits))) * n + 1e-9).astype(int)
    thresholds = exit_thresholds(conf[:-1], np.diff(np.concatenate([[0], edges]))[:-1])
    taken = exit_indices(conf, thresholds + [-1.0])
    counts = torch.bincount(taken, minlength=n_exits)
    return ExitPlan(inputs, tuple(thresholds), criterion, tuple(float(c) / n for c in counts[:-1]))


def exit_inputs(task, batch: int, n: int = EXIT_INPUTS) -> torch.Tensor:
    """``n`` real inputs of the task (validation split), cut to a whole number of batches."""
    x = task.example_input(max(n, batch))
    if x.shape[0] < batch:
        x = x[:1].repeat(batch, *([1] * (x.dim() - 1)))
    return x[: x.shape[0] // batch * batch]


def _real_measure(profile: HardwareProfile, label: str, progress: bool) -> MeasureFn:
    from automl.hardware.measure import measure_candidates
    from automl.hardware.timing import Progress

    def measure(cands):
        bar = Progress(len(cands), label, unit="models", enabled=progress)
        stats = measure_candidates(cands, runtime=profile.device.runtime, threads=profile.device.threads,
                                   protocol=profile.protocol, progress=bar)
        return [(s.median_ms, s.drift, s.exit_shares) for s in stats]
    return measure


def _latencies(results) -> tuple:
    """(latencies, drifts, exit shares or None) from a MeasureFn's results (see MeasureFn)."""
    rows = [(float(r), 1.0, None) if np.isscalar(r) else
            (float(r[0]), float(r[1]), None if len(r) < 3 or r[2] is None else tuple(r[2])) for r in results]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _spread(values: List[float], n: int) -> List[int]:
    """Indices of ``n`` items evenly spaced over the sorted ``values`` (the range ends included)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    if len(order) <= n:
        return order
    return [order[int(round(j * (len(order) - 1) / (n - 1)))] for j in range(n)] if n > 1 else order[-1:]


def _pick(sums: List[float], weights: List[float], n: int) -> List[int]:
    """``n`` distinct indices: half spread over the summed entries, the rest over the weight bytes (so
    the fit sees models on both sides of the L2 size, where the cold term sets in)."""
    chosen = list(dict.fromkeys(_spread(sums, (n + 1) // 2)))
    for k in range(max(n - len(chosen), 1), len(weights) + 1):
        new = [i for i in dict.fromkeys(_spread(weights, k)) if i not in chosen]
        if len(chosen) + len(new) >= n or k == len(weights):
            chosen += new[: n - len(chosen)]
            break
    return chosen


def calibrate(profile: HardwareProfile, space, *, per_precision: int = 24, seed: int = CALIBRATION_SEED,
              task=None, measure: Optional[MeasureFn] = None, progress: bool = True, pool: int = 4) -> HardwareProfile:
    """Measure ``per_precision`` whole candidates for each precision of the profile and fit the
    correction per precision (stored in ``profile.corrections``). The candidates are picked from
    ``pool`` times as many random ones, half evenly over the range of summed entries and half over the
    range of weight bytes, so the fit sees small and large models, and models on both sides of L2."""
    measure = measure or _real_measure(profile, "calibrating (whole models)", progress)
    cands: List[Candidate] = []
    for i, p in enumerate(profile.device.precisions):
        drawn = [c.backbone() for c in sample_candidates(space, per_precision * pool, seed=seed + 10_000 * i,
                                                         runtime=profile.device.runtime, batch=profile.device.batch,
                                                         task=task, precision=p)]
        sums = [sum(price_layer(profile, t.key, space=space.source).latency_ms for t in c.layers) for c in drawn]
        weights = [sum(weight_bytes(t.key) for t in c.layers) for c in drawn]
        cands += [drawn[j] for j in _pick(sums, weights, per_precision)]
    if not cands:
        raise ConfigError("no candidate of the space runs on the profile's runtime", key="--runtime",
                          value=profile.device.runtime, fix="profile with the runtime the space deploys to")
    measured, drift, _ = _latencies(measure(cands))
    rows = []
    for c, m, dr in zip(cands, measured, drift):
        keys = [t.key for t in c.layers]
        prices = [price_layer(profile, k, space=space.source) for k in keys]
        rows.append({"precision": c.precision, "n_layers": len(keys),
                     "sum_ms": round(sum(p.latency_ms for p in prices), 9),
                     "cold_excess_ms": round(sum(p.cold_ms - p.latency_ms for p in prices), 9),
                     "weight_bytes": sum(weight_bytes(k) for k in keys),
                     "measured_ms": round(m, 9), "drift": round(dr, 6)})
    for p in sorted({c.precision for c in cands}):
        mine = [r for r in rows if r["precision"] == p]
        profile.corrections[p] = fit_correction(*([r[k] for r in mine] for k in ("sum_ms", "n_layers", "measured_ms",
                                                                                 "cold_excess_ms", "weight_bytes")),
                                                l2_cache_kb=profile.device.l2_cache_kb)
    profile.calibration = rows
    return profile


def calibrate_handoff(profile: HardwareProfile, space, *, models: int = 12, seed: int = CALIBRATION_SEED + 50_000,
                      task=None, measure: Optional[MeasureFn] = None, progress: bool = True) -> HardwareProfile:
    """Fit the early-exit hand-over (Correction.handoff_*) of the fp32 correction: ``models`` early-exit
    candidates of the space run through every segment (all thresholds 1.0) on the profile's runtime;
    what their measured latency adds to their segments' summed predictions is charged to the
    hand-overs, a fixed cost each plus a cost per KB of feature map. A space without early exit, or a
    profile without fp32, is left unchanged."""
    from automl.hardware.predict import fit_handoff, predict_early_exit

    if "fp32" not in profile.device.precisions or not any(p.name.startswith("early_exit.") for p in space.params):
        return profile

    task = task if task is not None else space.build_task()
    cands = sample_candidates(space, models, seed=seed, runtime=profile.device.runtime, batch=profile.device.batch,
                              task=task, precision="fp32", max_tries=20 * models,
                              keep=lambda c: c.early_exit is not None)
    if not cands:
        return profile
    inputs = exit_inputs(task, profile.device.batch, profile.device.batch)
    for c in cands:
        n_exits = c.model.num_exits - 1
        c.exit_plan = ExitPlan(inputs, (1.0,) * n_exits, c.early_exit.criterion, (0.0,) * n_exits)
    measure = measure or _real_measure(profile, "calibrating (early-exit hand-overs)", progress)
    measured, drift, _ = _latencies(measure(cands))
    corr = replace(profile.correction("fp32"), handoff_ms=0.0, handoff_ms_per_kb=0.0)
    profile.corrections["fp32"] = corr
    rows = []
    for c, m, dr in zip(cands, measured, drift):
        pred = predict_early_exit(profile, c.model, c.example, [0.0] * (c.model.num_exits - 1), "fp32",
                                  space=space.source)
        rows.append({"precision": "fp32", "early_exit": True, "boundaries": len(pred.handoff_kb),
                     "handoff_kb": round(sum(pred.handoff_kb), 3), "segments_ms": round(pred.latency_ms, 9),
                     "measured_ms": round(m, 9), "drift": round(dr, 6)})
    fixed, per_kb = fit_handoff([r["measured_ms"] - r["segments_ms"] for r in rows], [r["boundaries"] for r in rows],
                                [r["handoff_kb"] for r in rows], [r["measured_ms"] for r in rows])
    profile.corrections["fp32"] = replace(corr, handoff_ms=fixed, handoff_ms_per_kb=per_kb, handoff_models=len(rows))
    profile.calibration = [r for r in profile.calibration if not r.get("early_exit")] + rows
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


def plot_validation(path, predicted, measured, groups, title: str):
    """Predicted vs measured on log axes, one colour per group (precision; early exit marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for group in sorted(set(groups)):
        idx = [i for i, q in enumerate(groups) if q == group]
        ax.scatter([measured[i] for i in idx], [predicted[i] for i in idx], s=14, label=group,
                   marker="^" if "early exit" in group else "o")
    lo, hi = min(min(predicted), min(measured)) * 0.8, max(max(predicted), max(measured)) * 1.25
    grid = np.geomspace(lo, hi, 50)
    ax.plot(grid, grid, "k-", lw=0.8, label="exact")
    ax.fill_between(grid, grid * 0.9, grid * 1.1, color="grey", alpha=0.2, label="+-10%")
    ax.set(xscale="log", yscale="log", xlabel="measured latency (ms)", ylabel="predicted latency (ms)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _row(profile: HardwareProfile, c: Candidate, measured: float, drift: float, shares, space) -> Dict[str, object]:
    """One validation row: the candidate predicted (an early-exit one with the exit shares measured on it)."""
    if c.early_exit is None:
        p = predict_keys(profile, [layer.key for layer in c.layers], space=space.source)
        extra = {"early_exit": False, "sum_ms": p.sum_ms, "n_layers": p.n_layers, "cold_share": p.cold_share,
                 "cold_excess_ms": p.cold_excess_ms}
    else:
        shares = list(shares if shares is not None else c.exit_plan.shares)
        p = predict_early_exit(profile, c.model, c.example, shares, c.precision, space=space.source)
        segs = p.segments
        extra = {"early_exit": True, "exit_shares": shares, "exit_reach": list(p.reach),
                 "exit_thresholds": list(c.exit_plan.thresholds), "exit_inputs": int(c.exit_plan.inputs.shape[0]),
                 "segment_ms": [s.latency_ms for s in segs],
                 "sum_ms": expected_cost([s.sum_ms for s in segs], p.reach),
                 "n_layers": sum(s.n_layers for s in segs), "cold_share": max(s.cold_share for s in segs),
                 "cold_excess_ms": expected_cost([s.cold_excess_ms for s in segs], p.reach)}
    return {"config": c.config, "precision": c.precision, "predicted_ms": p.latency_ms, "measured_ms": measured,
            "drift": drift, "error": (p.latency_ms - measured) / measured, **extra,
            "interpolated": p.count("interpolated"), "extrapolated": p.count("extrapolated"),
            "energy_mj": p.energy_mj, **({"structure": c.notes} if c.notes else {})}


def _figures_of(rows) -> Dict[str, object]:
    return validation_figures([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])


def validate_profile(profile: HardwareProfile, space, out_dir, *, samples: int = 100, seed: int = VALIDATION_SEED,
                     task=None, measure: Optional[MeasureFn] = None, progress: bool = True,
                     save_profile: bool = True, exit_inputs_n: int = EXIT_INPUTS) -> Dict[str, object]:
    """Predict and measure ``samples`` random candidates (early-exit ones on ``exit_inputs_n`` real inputs
    with a random exit distribution, see the module docstring); write validation.json and
    validation.png to ``out_dir`` and store the figures in the profile (saved back to its file).
    ``figures['early_exit']`` holds the figures of the early-exit candidates alone (None without any)."""

    if profile.modelled:
        raise ConfigError("a modelled profile has no device to measure candidates on", key="--profile",
                          value=profile.device.runtime,
                          fix="validate a measured profile (automl profile measure); a modelled one is only predicted")
    out_dir = Path(out_dir)
    task = task if task is not None else space.build_task()
    # early exit deploys float segment graphs: an int8 runtime cannot run them
    cands = sample_candidates(space, samples, seed=seed, runtime=profile.device.runtime, batch=profile.device.batch,
                              task=task, keep=lambda c: c.early_exit is None or c.precision == "fp32")
    if not cands:
        raise ConfigError("no candidate of the space runs on the profile's runtime", key="--runtime",
                          value=profile.device.runtime, fix="validate with a profile for the space's runtime")
    if any(c.early_exit is not None for c in cands):
        inputs = exit_inputs(task, profile.device.batch, exit_inputs_n)
        for i, c in enumerate(cands):
            if c.early_exit is not None:
                c.exit_plan = plan_exits(c, inputs, seed + i)
    measure = measure or _real_measure(profile, "validating (whole models)", progress)
    measured, drift, shares = _latencies(measure(cands))
    rows = [_row(profile, c, m, d, sh, space) for c, m, d, sh in zip(cands, measured, drift, shares)]
    figures = _figures_of(rows)
    worst = sorted(range(len(rows)), key=lambda i: -abs(rows[i]["error"]))[:5]
    figures["worst"] = [{k: rows[i][k] for k in ("config", "precision", "early_exit", "predicted_ms", "measured_ms",
                                                 "error")} for i in worst]
    figures["by_precision"] = {prec: _figures_of([r for r in rows if r["precision"] == prec])
                               for prec in sorted({r["precision"] for r in rows})}
    exits = [r for r in rows if r["early_exit"]]
    figures["early_exit"] = _figures_of(exits) if exits else None
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "validation.json", {"profile": profile.source, "space": space.source, "seed": seed,
                                             "figures": figures, "candidates": rows})
    tau = figures["kendall_tau"]
    plot_validation(out_dir / "validation.png", [r["predicted_ms"] for r in rows], measured,
                    [r["precision"] + (" early exit" if r["early_exit"] else "") for r in rows],
                    f"{len(rows)} candidates: {100 * figures['within_10pct']:.0f}% within +-10%, "
                    f"tau {'n/a' if tau is None else format(tau, '.2f')}")
    profile.validation = {**{k: v for k, v in figures.items() if k != "worst"},
                          "worst_error": rows[worst[0]]["error"], "seed": seed,
                          "space_hash": space.hash, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if save_profile and profile.source:
        profile.save()
    return figures
