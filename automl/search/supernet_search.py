"""Search on a trained supernet: thousands of candidates scored on inherited weights, then the front
applied for real.

Phase 1 asks the space's Optuna sampler for candidates (architecture x compression) and scores each
in milliseconds (automl.search.proxy: PyTorch accuracy after the candidate's stages, cost from
the profile), on ``budget.concurrency`` Ray workers; every scored candidate is journaled in
``candidates.jsonl`` as it is told to the sampler, so a stopped search resumes without repeating one.
With ``predictor_samples``, only that many candidates are measured so; a predictor (automl.search.predictor)
fitted on them scores the rest in a few milliseconds each (accuracy and size predicted, cost priced by the
profile), and the candidates it puts on the front are measured before any is chosen.
Phase 2 takes up to ``front_size`` points of the proxy front and runs their recipes like any trial
(``apply_recipe``: ``finetune_epochs`` from the inherited weights, export, int8 ..., measured); those
rows make the usual run directory (trials.csv, front.csv, recipes/ ...)."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import optuna
import ray

from automl.errors import ConfigError
from automl.io import load_yaml, write_json, write_yaml
from automl.hardware.shipped import auto_profile
from automl.search.controller import SearchOutcome, _init_ray, make_sampler
from automl.search.costing import load_costing, restore_costing, save_costing
from automl.search.journal import Journal, make_row
from automl.search.outputs import write_outputs
from automl.search.pareto import REFERENCE, feasible, hypervolume
from automl.search.pareto_asha import front_ranks
from automl.search.predictor import CandidatePredictor
from automl.search.trainable import CHANCE_MARGIN
from automl.search.rundir import prepare_run_dir, run_lock
from automl.search.versions import library_versions
from automl.spaces import define_by_run, parse_space
from automl.spaces.domains import Fixed
from automl.supernet.inherit import check_space

CANDIDATES, OPTIONS = "candidates.jsonl", "supernet_search.yaml"
STUDY_WINDOW = 1500  # trials one Optuna study holds before the search goes on in a fresh one (see _rolled)
COST_FALLBACK = {"latency_ms": "macs", "energy_mj": "macs"}  # without a profile, candidates are priced by MACs


@dataclasses.dataclass(frozen=True)
class SupernetSearch:
    candidates: int = 1000   # scored in phase 1
    front_size: int = 20     # proxy-front points applied for real, each fine-tuned train.epochs (phase 2)
    # 0: every candidate is measured on inherited weights; N: the first N are, a predictor fitted on them
    # scores the rest (accuracy and size predicted, cost priced), and its front is measured before phase 2
    predictor_samples: int = 0


class Evaluator:
    """A worker holding the task and the profile; the supernet loads once per process."""

    def __init__(self, space, profile):
        import torch

        torch.set_num_threads(1)
        self.space, self.profile, self.task, self.predictor = space, profile, space.build_task(), None
        self.priced: Dict = {}  # candidates' costs by deployed structure and precision (proxy.cost_key)

    def set_predictor(self, predictor):
        self.predictor = predictor

    def score(self, config: Dict, predicted: bool = False) -> Dict:
        from automl.search.proxy import safe_proxy

        return safe_proxy(self.space, config, self.task, self.profile, self.predictor if predicted else None,
                          self.priced)

    def apply(self, config: Dict, trial_id: str) -> Dict:
        import tempfile

        from automl.hardware.layer_costs import price_layers
        from automl.recipe import apply_recipe, recipe_from_config

        recipe = recipe_from_config(self.space, config, provenance={"trial_id": trial_id})
        with tempfile.TemporaryDirectory(prefix=f"automl-{trial_id}-") as tmp:
            return apply_recipe(recipe, Path(tmp), task=self.task, price_layers=price_layers).metrics


def objective_values(metrics: Dict, space, priced: bool) -> Optional[List[float]]:
    values = []
    for name in space.objectives:
        key = name if priced or name not in COST_FALLBACK else COST_FALLBACK[name]
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        values.append(float(value))
    return values


def run_supernet_search(space, out, options: SupernetSearch = SupernetSearch(), *, profile=None,
                        force: bool = False, log=print) -> SearchOutcome:
    """Phase 1 and 2 over ``space`` (which names its supernet); the run directory as any search's.
    ``profile`` prices the candidates (a file, a HardwareProfile, or "auto" as run_search takes it);
    without one they are priced by MACs."""
    if isinstance(profile, str) and profile == "auto":
        profile, _ = auto_profile(False, log=log)
    costing = load_costing(profile, space)
    if space.supernet is None:
        raise ConfigError("a supernet search needs the space's supernet", file=space.source, key="supernet",
                          fix="add 'supernet: {path: DIR}' or pass --supernet DIR")
    check_space(space)
    with run_lock(Path(out)):
        run_dir = prepare_run_dir(Path(out), force)
        write_yaml(run_dir / "space.yaml", space.raw)
        write_yaml(run_dir / OPTIONS, {"version": 1, **dataclasses.asdict(options)})
        save_costing(run_dir, costing)
        return _search(space, run_dir, options, None if costing is None else costing.profile, log)


def resume_supernet_search(run_dir, *, log=print) -> SearchOutcome:
    """Finish a stopped supernet search: journaled candidates and applied points are not repeated."""
    run_dir = Path(run_dir).resolve()
    space = parse_space(load_yaml(run_dir / "space.yaml"), str(run_dir / "space.yaml"))
    raw = load_yaml(run_dir / OPTIONS)
    options = SupernetSearch(**{k: raw[k] for k in ("candidates", "front_size", "predictor_samples") if k in raw})
    costing = restore_costing(run_dir)
    with run_lock(run_dir):
        return _search(space, run_dir, options, None if costing is None else costing.profile, log)


def _search(space, run_dir: Path, options: SupernetSearch, profile, log) -> SearchOutcome:
    started = time.time()
    _init_ray(None, space.budget.concurrency)
    workers = [ray.remote(num_cpus=1)(Evaluator).remote(space, profile) for _ in range(space.budget.concurrency)]
    num_classes = getattr(space.build_task(), "num_classes", None)
    try:
        scored, seconds, new, predictor = _phase_candidates(space, run_dir, options, profile is not None, workers,
                                                            log)
        measured = [r for r in scored if not r["metrics"].get("predicted")]
        if predictor is not None:  # the predicted front, measured on inherited weights before it is trusted
            measured += _verify_front(space, run_dir, scored, options, profile is not None, workers, num_classes,
                                      log)
        picks = pick_front(measured, space, options.front_size, num_classes)
        rows = _phase_front(finetune_space(space), run_dir, picks, workers, log)
    finally:  # their CPUs go back to Ray now, not when the handles are collected
        for worker in workers:
            ray.kill(worker)
    report = write_outputs(run_dir, space, rows, wall_time_s=time.time() - started, versions=library_versions())
    report["supernet"] = {"path": space.supernet.path, "sha256": space.supernet.sha256,
                          "candidates": len(scored), "measured_candidates": len(measured),
                          "candidate_seconds": round(seconds, 2),
                          "candidates_per_minute": round(60 * new / max(seconds, 1e-9), 1) if new else None,
                          "cost_basis": "profile" if profile is not None else "macs",
                          "front_applied": len(rows), "finetune_epochs": space.epochs}
    if predictor is not None:
        report["supernet"]["predictor"] = predictor_report(predictor, scored, measured, options)
    write_json(run_dir / "report.json", report)
    return SearchOutcome(run_dir=run_dir, report=report, rows=rows)


def finetune_space(space):
    """The space the front's points are applied with: a fine-tune at the low end of the space's learning
    rates (a sampled rate meant for training from scratch would undo the inherited weights)."""
    raw = json.loads(json.dumps(space.raw, default=str))
    lr = next((p.domain for p in space.params if p.name == "train.lr"), None)
    low = getattr(lr, "low", getattr(lr, "value", None))
    if low is None or not isinstance(raw.get("train"), dict):
        return space
    raw["train"]["lr"] = float(low)
    return parse_space(raw, space.source)


def _tuned(config: Dict, space) -> Dict:
    """A candidate's config with the fine-tune space's fixed training settings (epochs, lr)."""
    return {**config, **{p.name: p.domain.value for p in space.params
                         if p.name.startswith("train.") and isinstance(p.domain, Fixed)}}


def _read(path: Path) -> List[Dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _phase_candidates(space, run_dir: Path, options: SupernetSearch, priced: bool, workers, log):
    """Score candidates until ``options.candidates`` are journaled; returns (rows, seconds spent, how many
    were scored in those seconds, the predictor once fitted or None)."""
    path = run_dir / CANDIDATES
    rows = [r for r in _read(path) if "verifies" not in r]
    before = len(rows)
    study, suggest = _study(space, options, rows)
    predictor = _fit_predictor(space, rows, options, workers, log)
    began, last_log = time.time(), 0.0
    pending: Dict = {}  # ref -> (worker, study, trial, config): every worker kept busy, none waits for the slowest
    idle = list(workers)
    with open(path, "a", encoding="utf-8") as journal:
        while len(rows) < options.candidates:
            while idle and len(rows) + len(pending) < options.candidates:
                if len(study.get_trials(deepcopy=False)) >= STUDY_WINDOW:
                    study = _rolled(study, space, options, len(rows))
                worker, trial = idle.pop(), study.ask()
                config = _config(trial, suggest)
                pending[worker.score.remote(config, predictor is not None)] = (worker, study, trial, config)
            [ref], _ = ray.wait(list(pending), num_returns=1)
            worker, owner, trial, config = pending.pop(ref)  # owner: the study that asked (see _rolled)
            idle.append(worker)
            metrics = ray.get(ref)
            values = objective_values(metrics, space, priced)
            row = {"number": len(rows), "config": config, "metrics": metrics, "values": values}
            journal.write(json.dumps(row, sort_keys=True, default=str) + "\n")
            journal.flush()
            owner.tell(trial, values) if values else owner.tell(trial, state=optuna.trial.TrialState.FAIL)
            rows.append(row)
            predictor = predictor or _fit_predictor(space, rows, options, workers, log)
            if time.time() - last_log > 10 or len(rows) == options.candidates:
                last_log = time.time()
                log(f"candidates: {len(rows)}/{options.candidates} scored "
                    f"({60 * len(rows) / max(time.time() - began, 1e-9):.0f} per minute this run)")
    return rows, time.time() - began, len(rows) - before, predictor


def _study(space, options: SupernetSearch, rows: List[Dict]):
    """The Optuna study (NSGA-II unless the space asks for random sampling: TPE's cost per sample grows
    with the history), with the journaled candidates told again; and the space's suggest function."""
    study, suggest = _new_study(space, options, len(rows)), define_by_run(space)
    for row in rows:
        fixed = optuna.trial.FixedTrial(row["config"])
        suggest(fixed)
        study.add_trial(optuna.trial.create_trial(
            params=fixed.params, distributions=fixed.distributions, values=row.get("values"),
            state=optuna.trial.TrialState.COMPLETE if row.get("values") else optuna.trial.TrialState.FAIL))
    return study, suggest


def _new_study(space, options: SupernetSearch, seed_offset: int):
    """An empty study of the space's objectives, its sampler seeded ``seed_offset`` past the space's seed."""
    directions = ["maximize" if d == "max" else "minimize" for d in space.objectives.values()]
    budget = dataclasses.replace(space.budget, trials=options.candidates,
                                 sampler="random" if space.budget.sampler == "random" else "nsga2")
    return optuna.create_study(directions=directions, sampler=make_sampler(budget, seed=budget.seed + seed_offset))


def _rolled(study, space, options: SupernetSearch, seed_offset: int):
    """A fresh study carrying the old one's elites: NSGA-II's survivors for its next generation, told as the
    new study's generation 0 so evolution goes on from them. (Optuna's NSGA-II scans every trial of its study
    on each ask: past a few thousand trials asking costs more than scoring a candidate with the predictor.)"""
    sampler = study.sampler
    select, key = getattr(sampler, "select_parent", None), getattr(sampler, "_get_generation_key", None)
    trials = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    generation = max((t.system_attrs.get(key(), -1) for t in trials), default=-1) if key else -1
    elites = select(study, generation + 1) if select and generation >= 0 else []
    fresh = _new_study(space, options, seed_offset)
    for t in elites:
        fresh.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, values=t.values,
                                                  system_attrs={key(): 0}))
    return fresh


def _fit_predictor(space, rows: List[Dict], options: SupernetSearch, workers, log):
    """Once ``predictor_samples`` candidates are measured: the predictor fitted on them, handed to every
    worker (None before, or without a predictor)."""
    if not options.predictor_samples:
        return None
    measured = [r for r in rows if not r["metrics"].get("predicted") and "error" not in r["metrics"]]
    if len(measured) < options.predictor_samples:
        return None
    predictor = CandidatePredictor(space, seed=space.budget.seed)
    quality = predictor.fit([r["config"] for r in measured], [r["metrics"] for r in measured])
    ray.get([w.set_predictor.remote(predictor) for w in workers])
    log("predictor fitted on {} measured candidates; held out: {}".format(len(measured), ", ".join(
        f"{t} Kendall tau {q['kendall_tau']:.2f}, error {q['mae']:.4g}" for t, q in quality.items()) or "too few"))
    return predictor


def _verify_front(space, run_dir: Path, rows: List[Dict], options: SupernetSearch, priced: bool, workers,
                  num_classes, log) -> List[Dict]:
    """The predicted candidates ``pick_front`` would choose (twice the front size), measured on inherited
    weights; journaled as rows that ``verifies`` their number, so a resume measures none twice."""
    path = run_dir / CANDIDATES
    done = {r["verifies"]: r for r in _read(path) if "verifies" in r}
    predicted = [r for r in rows if r["metrics"].get("predicted")]
    todo = [r for r in pick_front(predicted, space, 2 * options.front_size, num_classes) if r["number"] not in done]
    log(f"predicted front: measuring {len(todo)} candidates on inherited weights ({len(done)} done)")
    with open(path, "a", encoding="utf-8") as journal:
        for start in range(0, len(todo), len(workers)):
            batch = todo[start:start + len(workers)]
            for row, ref in zip(batch, [w.score.remote(r["config"]) for w, r in zip(workers, batch)]):
                metrics = ray.get(ref)
                out = {"number": row["number"], "verifies": row["number"], "config": row["config"],
                       "metrics": metrics, "values": objective_values(metrics, space, priced)}
                journal.write(json.dumps(out, sort_keys=True, default=str) + "\n")
                journal.flush()
                done[row["number"]] = out
    return list(done.values())


def predictor_report(predictor, rows: List[Dict], measured: List[Dict], options: SupernetSearch) -> Dict:
    """How far the predictor can be trusted: its held-out quality, and on the verified front the
    agreement of predicted and measured accuracy."""
    by_number = {r["number"]: r for r in rows}
    pairs = [(by_number[r["verifies"]]["metrics"].get("accuracy"), r["metrics"].get("accuracy"))
             for r in measured if "verifies" in r and r["verifies"] in by_number]
    pairs = [(a, b) for a, b in pairs if isinstance(a, float) and isinstance(b, float)]
    out = {"samples": options.predictor_samples, "held_out": predictor.quality,
           "predicted_candidates": sum(1 for r in rows if r["metrics"].get("predicted")),
           "verified": len(pairs)}
    if len(pairs) >= 2:
        predicted, actual = (np.array(v) for v in zip(*pairs))
        out["verified_accuracy_error"] = round(float(np.mean(np.abs(predicted - actual))), 4)
        out["verified_mean_gap"] = round(float(np.mean(actual - predicted)), 4)
    return out


def _config(trial, suggest) -> Dict:
    fixed = suggest(trial)  # suggests the sampled parameters into trial.params, returns the fixed ones
    return {**trial.params, **fixed}


def pick_front(rows: List[Dict], space, size: int, num_classes: Optional[int] = None) -> List[Dict]:
    """Up to ``size`` candidates of the proxy front, chosen greedily for the hypervolume they add
    (objectives scaled to [0, 1] over the front); candidates that do not predict (accuracy at chance
    level) are left out: being small, they would take front places."""
    chance = 1.0 / num_classes + CHANCE_MARGIN if num_classes else 0.0
    scored = [r for r in rows if r.get("values") and r["metrics"].get("accuracy", 1.0) > chance]
    signs = [1.0 if d == "max" else -1.0 for d in space.objectives.values()]
    points = [[s * v for s, v in zip(signs, r["values"])] for r in scored]
    if not points:
        return []
    ranks = _ranks(points)
    front = [(r, p) for r, p, rank in zip(scored, points, ranks) if rank == 0]
    highs = [max(p[k] for _, p in front) for k in range(len(signs))]
    spans = [max(h - min(p[k] for _, p in front), 1e-12) for k, h in enumerate(highs)]
    scaled = [[(h - v) / s for v, h, s in zip(p, highs, spans)] for _, p in front]  # 0 = best, to minimise
    chosen: List[int] = []
    while len(chosen) < min(size, len(front)):
        base = [scaled[i] for i in chosen]
        best = max((i for i in range(len(front)) if i not in chosen),
                   key=lambda i: (hypervolume(base + [scaled[i]], [REFERENCE] * len(signs)), -i))
        chosen.append(best)
    return [front[i][0] for i in sorted(chosen, key=lambda i: scaled[i][-1])]


def _ranks(points: List[List[float]]) -> List[int]:
    """Non-dominated ranks of maximised points (any number of objectives)."""
    if len(points[0]) == 2:
        return front_ranks([(p[0], -p[1]) for p in points])
    dominated = [any(all(q[k] >= p[k] for k in range(len(p))) and q != p for q in points) for p in points]
    return [1 if d else 0 for d in dominated]


def _phase_front(space, run_dir: Path, picks: List[Dict], workers, log) -> List[Dict]:
    journal = Journal(run_dir)
    done = {r["trial_id"]: r for r in journal.read()}
    todo = [(f"sn{p['number']:05d}", p) for p in picks if f"sn{p['number']:05d}" not in done]
    log(f"front: applying {len(todo)} of {len(picks)} candidates ({len(done)} done), "
        f"{space.epochs} fine-tune epochs each")
    for start in range(0, len(todo), len(workers)):
        batch = todo[start:start + len(workers)]
        refs = [w.apply.remote(_tuned(p["config"], space), tid) for w, (tid, p) in zip(workers, batch)]
        for (tid, pick), ref in zip(batch, refs):
            try:
                metrics = {**ray.get(ref), "final": True}
                metrics.update({f"proxy_{k}": v for k, v in pick["metrics"].items() if isinstance(v, (int, float))})
                metrics["feasible"] = feasible(metrics, space.constraints)
                row = make_row(tid, metrics, _tuned(pick["config"], space), space)
            except ray.exceptions.RayTaskError as exc:
                row = make_row(tid, {}, _tuned(pick["config"], space), space, error=str(exc.cause)[:500])
            journal.append(row)
            done[tid] = row
            log(f"front {len(done)}/{len(picks)}: {tid} acc={row['metrics'].get('accuracy', float('nan')):.4f} "
                f"(inherited {pick['metrics'].get('accuracy', float('nan')):.4f})")
    return list(done.values())  # points applied before a resume changed the front are kept: they were measured


__all__ = ["SupernetSearch", "pick_front", "resume_supernet_search", "run_supernet_search"]
