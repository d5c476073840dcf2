"""Ray Tune controller: OptunaSearch (several objectives) + ASHA on accuracy, then the run outputs."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import optuna
import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from automl.errors import AutoMLError, ConfigError, RunDirError
from automl.search.rundir import TUNE_DIR, check_run_dir, prepare_run_dir, run_lock
from automl.io import load_yaml, write_yaml
from automl.search.baseline import measure_baseline
from automl.search.costing import Costing, load_costing, profile_report, restore_costing, save_costing
from automl.search.outputs import front_rows, write_outputs
from automl.search.versions import library_versions
from automl.spaces import SearchSpace, define_by_run, parse_space



@dataclass
class SearchOutcome:
    run_dir: Path
    report: Dict
    rows: List[Dict]


class ParetoOptunaSearch(OptunaSearch):
    """Tells Optuna PRUNED for ASHA-stopped trials and FAIL for non-finite results.

    Stock OptunaSearch passes partial or NaN multi-objective values to ``study.tell``, which
    raises inside a logged warning and leaves the Optuna trial running forever.
    """

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and not error:
            values = [result.get(m) for m in self._metric]
            if not result.get("final"):
                result = None  # stopped early: no deployed metrics
            elif any(v is None or not math.isfinite(float(v)) for v in values):
                result, error = None, True
        super().on_trial_complete(trial_id, result, error)


def _searcher(space: SearchSpace) -> ParetoOptunaSearch:
    sampler = optuna.samplers.TPESampler(seed=space.budget.seed, n_startup_trials=min(10, space.budget.trials))
    return ParetoOptunaSearch(space=define_by_run(space), metric=list(space.objectives),
                              mode=list(space.objectives.values()), sampler=sampler)


class Progress(Callback):
    """One line per finished trial."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        m = trial.last_result or {}
        if m.get("final"):
            energy = f" energy={m['energy_mj']:.4g}mJ" if "energy_mj" in m else ""
            text = (f"acc={m.get('accuracy', float('nan')):.4f} lat={m.get('latency_ms', float('nan')):.4f}ms "
                    f"size={m.get('size_kb', float('nan')):.1f}kB{energy} {m.get('precision', '')}")
        else:
            text = f"stopped early at epoch {m.get('epoch', '?')} (acc={m.get('accuracy', float('nan')):.4f})"
        print(f"[{self.done}/{self.total}] {trial.trial_id}: {text}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        # one line here; the full traceback stays in the trial's error file
        error = _trial_error(trial)
        text = (error_text(error, limit=200) if error is not None else "") or "unknown error"
        log = f" (traceback: {trial.error_file})" if trial.error_file else ""
        print(f"[{self.done}/{self.total}] {trial.trial_id}: failed: {text}{log}", flush=True)


def _trial_error(trial):
    """The exception this driver just recorded for ``trial`` (Tune keeps it in the trial's own
    directory, written moments ago by this process), else its text."""
    try:
        return trial.get_pickled_error() or trial.get_error()
    except Exception:  # an unreadable record: the one-line summary falls back to the text file
        return trial.get_error()


def _init_ray(address: Optional[str], concurrency: int):
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # user paths stay valid inside trials
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our Progress callback prints one line per trial
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # ... failures included, not 50 traceback lines
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Per-epoch reports carry accuracy only (for ASHA); deployed metrics come with the final report.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None  # as Ray's own tools do
    if address:
        check_reachable(address)
    if not address:  # local workers import a user's model builder from where the driver runs
        paths = [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                  configure_logging=True)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=max(concurrency, 1), **kwargs)
    except Exception as exc:  # connection, auth (RAY_AUTH_MODE) ...
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise AutoMLError(f"could not start or reach {where}: {exc}. If the cluster uses token "
                          "authentication, set both RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token>; "
                          "check --address.") from None


CONNECT_TIMEOUT_S = 30.0


def check_reachable(address: str):
    """Fail within AUTOML_CONNECT_TIMEOUT_S (default 30 s) when nothing listens at a host:port address;
    Ray itself retries for many minutes."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # 'auto', 'local': Ray resolves these itself
        return
    try:
        timeout = float(os.environ.get("AUTOML_CONNECT_TIMEOUT_S", CONNECT_TIMEOUT_S))
    except ValueError:
        raise ConfigError("must be a number of seconds", key="AUTOML_CONNECT_TIMEOUT_S",
                          value=os.environ["AUTOML_CONNECT_TIMEOUT_S"],
                          fix="e.g. AUTOML_CONNECT_TIMEOUT_S=30") from None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise AutoMLError(f"no Ray cluster answers at {address} (waited up to {timeout:g} s: {exc}). Fix: start the "
                          "cluster ('ray start --head') or correct --address / RAY_ADDRESS; "
                          "AUTOML_CONNECT_TIMEOUT_S sets the wait") from None


def _ship_file_modules():
    """Modules imported from a file path (a builder such as models.py:build) do not exist on Ray's
    workers under their generated names: objects of their classes travel by value."""
    from ray import cloudpickle

    from automl.arch.user import FILE_MODULE_PREFIX

    for name, module in list(sys.modules.items()):
        if name.startswith(FILE_MODULE_PREFIX):
            cloudpickle.register_pickle_by_value(module)


def _tuner(space: SearchSpace, run_dir: Path, task, *, restore: bool, costing: Optional[Costing] = None,
           baseline: Optional[Dict] = None):
    from automl.search.trainable import run_trial

    _ship_file_modules()
    # trials that distil from the same teacher train it once and share it through this cache
    params = {"space": space, "task": task, "cache_dir": str(run_dir / "cache"),
              **({"costing": costing} if costing is not None else {}),
              **({"baseline": baseline} if baseline is not None else {})}
    trainable = tune.with_resources(tune.with_parameters(run_trial, **params), {"cpu": 1})
    if restore:
        return tune.Tuner.restore(str(run_dir / TUNE_DIR), trainable=trainable, resume_errored=True)
    # with fewer than two epochs (e.g. post-training compression of a trained model) there is nothing
    # to stop early
    scheduler = FIFOScheduler() if space.epochs < 2 else ASHAScheduler(
        metric="accuracy", mode="max", time_attr="training_iteration", max_t=space.epochs,
        grace_period=min(space.budget.grace_epochs, space.epochs), reduction_factor=space.budget.reduction_factor)
    tune_config = tune.TuneConfig(search_alg=_searcher(space), scheduler=scheduler,
                                  num_samples=space.budget.trials,
                                  max_concurrent_trials=space.budget.concurrency, reuse_actors=True,
                                  time_budget_s=space.budget.time_limit_s or None)
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=str(run_dir), verbose=0,
                                callbacks=[Progress(space.budget.trials)],
                                failure_config=tune.FailureConfig(max_failures=0))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _rows(result_grid, space: SearchSpace) -> List[Dict]:
    rows = []
    for result in result_grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        config = {k: v for k, v in (result.config or {}).items() if k in space.names()}
        if result.error is not None:
            status = "error"
        elif metrics.get("final"):
            status = "completed"
        else:
            status = "early_stopped"
        keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
                and k not in ("trial_id", "final", "feasible", "date", "hostname", "node_ip", "pid",
                              "timestamp", "experiment_tag", "time_this_iter_s", "time_total_s", "time_since_restore",
                              "iterations_since_restore", "checkpoint_dir_name", "done", "training_iteration")}
        rows.append({"trial_id": trial_id, "status": status, "feasible": bool(metrics.get("feasible")),
                     "error": error_text(result.error) if result.error is not None else None,
                     "metrics": keep, "config": config})
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def error_text(error, limit: int = 600) -> str:
    """One line for trials.csv: the original exception's message (Ray wraps it in a RayTaskError
    whose text starts with the worker's process title and a traceback)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        text = str(cause) if isinstance(cause, AutoMLError) else f"{type(cause).__name__}: {cause}"
    else:
        text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(cause, BaseException):
        return lines[0][:limit] if lines else ""
    return " ".join(lines)[:limit]


def _run(space: SearchSpace, run_dir: Path, *, address: Optional[str], restore: bool,
         costing: Optional[Costing] = None, task=None) -> SearchOutcome:
    task = task if task is not None else space.build_task()  # fail fast, before Ray starts
    started = time.time()
    baseline = measure_baseline(space, task, run_dir, costing, log=lambda m: print(m, flush=True))
    _init_ray(address, space.budget.concurrency)
    grid = _tuner(space, run_dir, task, restore=restore, costing=costing, baseline=baseline).fit()
    rows = _rows(grid, space)
    versions = library_versions()
    profile = profile_report(costing, space) if costing is not None else None
    report = write_outputs(run_dir, space, rows, wall_time_s=time.time() - started, versions=versions,
                           profile=profile, baseline=baseline)
    if costing is not None and costing.measure_front:
        from automl.search.frontcheck import measure_front

        check = measure_front(run_dir, space, front_rows(rows, space), costing, task=task,
                              log=lambda m: print(m, flush=True))
        report = write_outputs(run_dir, space, rows, wall_time_s=time.time() - started, versions=versions,
                               profile=profile, front_check=check, baseline=baseline)
    return SearchOutcome(run_dir=run_dir, report=report, rows=rows)


def run_search(space: SearchSpace, out, *, address: Optional[str] = None, force: bool = False, profile=None,
               measure_trials: bool = False, measure_front: bool = False, task=None) -> SearchOutcome:
    """Run the joint search and write the run directory.

    ``profile`` (a profile file or a loaded HardwareProfile) makes the search hardware-aware: each
    trial's latency_ms and energy_mj are predicted from it (see ``automl.search.costing``);
    ``measure_trials`` keeps the latency measured in each trial as measured_latency_ms, and
    ``measure_front`` re-applies and measures every Pareto point after the search. ``task`` replaces
    the space's task (e.g. a LoaderTask over DataLoaders given to the Python API)."""
    check_run_dir(Path(out), force)
    costing = load_costing(profile, space, measure_trials=measure_trials, measure_front=measure_front)
    task = task if task is not None else space.build_task()  # a bad task must not cost the old run
    with run_lock(Path(out)):
        run_dir = prepare_run_dir(Path(out), force)
        write_yaml(run_dir / "space.yaml", space.raw)
        save_costing(run_dir, costing)
        return _run(space, run_dir, address=address, restore=False, costing=costing, task=task)


def resume_search(run_dir, *, address: Optional[str] = None) -> SearchOutcome:
    """Finish an interrupted search (unfinished and errored trials run again) and rewrite the outputs."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "space.yaml").is_file() or not tune.Tuner.can_restore(str(run_dir / TUNE_DIR)):
        raise RunDirError(f"{run_dir} is not a resumable run directory (needs space.yaml and {TUNE_DIR}/). "
                          "Fix: pass the --out directory of an earlier 'automl search'")
    space = parse_space(load_yaml(run_dir / "space.yaml"), str(run_dir / "space.yaml"))
    with run_lock(run_dir):
        return _run(space, run_dir, address=address, restore=True, costing=restore_costing(run_dir))
