"""Ray Tune controller: OptunaSearch (several objectives) + Pareto-aware or ASHA early stopping, run phase by
phase (budget.strategy), then the run outputs."""
from __future__ import annotations

import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from automl.errors import AutoMLError, ConfigError, RunDirError
from automl.hardware.shipped import auto_profile
from automl.search.rundir import TUNE_DIR, check_run_dir, prepare_run_dir, recover_outputs, run_lock
from automl.io import load_yaml, write_json, write_yaml
from automl.search.baseline import measure_baseline
from automl.supernet.inherit import check_space
from automl.search.costing import Costing, load_costing, profile_report, restore_costing, save_costing
from automl.search.interrupt import stop_on_signals
from automl.search.journal import JOURNAL, Journal, teach_study
from automl.search.strategy import SEQUENTIAL_PARAM, Phase, compression_phase, phase_of, phases
from automl.search.shipping import check_worker_imports, search_modules, user_code_paths
from automl.search.teachers import space_has_teachers, start_store
from automl.search.triallog import TrialLog
from automl.search.outputs import front_rows, write_outputs
from automl.search.pareto_asha import ParetoASHA
from automl.search.versions import library_versions
from automl.spaces import SearchSpace, define_by_run, parse_space



@dataclass
class SearchOutcome:
    run_dir: Path
    report: Dict
    rows: List[Dict]
    interrupted: Optional[str] = None  # the signal that stopped the search early


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


def make_sampler(budget, seed: int) -> optuna.samplers.BaseSampler:
    """``budget.sampler``, seeded. NSGA-II's generation is a sixth of the budget (4 to 50 trials), so a
    small search still sees several generations."""
    if budget.sampler == "random" or budget.strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if budget.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, budget.trials // 6)))
    # multivariate + group: TPE models parameters jointly, per set of parameters that occur together (our
    # spaces are conditional); constant_liar: concurrent trials are not sent to the same spot
    with warnings.catch_warnings():  # group is marked experimental in Optuna; the version is pinned and tested
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, budget.trials), multivariate=True,
                                          group=True, constant_liar=True)


def _searcher(space: SearchSpace, finished: Optional[List[Dict]] = None) -> ParetoOptunaSearch:
    """``budget.sampler`` over the space; on resume it is told the journaled trials first, and its seed moves on so
    the random start-up samples do not repeat the first attempt's."""
    finished = finished or []
    sampler = make_sampler(space.budget, seed=space.budget.seed + len(finished))
    searcher = ParetoOptunaSearch(space=define_by_run(space), metric=list(space.objectives),
                                  mode=list(space.objectives.values()), sampler=sampler)
    teach_study(searcher._ot_study, finished, space)
    return searcher


def _init_ray(address: Optional[str], cpus: int, modules=()):
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # user paths stay valid inside trials
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our TrialLog callback prints one line per trial
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
    shipped = user_code_paths(modules)
    try:
        if address:
            ray.init(address=address, **kwargs, **({"runtime_env": {"py_modules": shipped}} if shipped else {}))
        else:
            ray.init(num_cpus=max(cpus, 1), **kwargs)
    except Exception as exc:  # connection, auth (RAY_AUTH_MODE) ...
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise AutoMLError(f"could not start or reach {where}: {exc}. If the cluster uses token "
                          "authentication, set both RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token>; "
                          "check --address.") from None


def _check_capacity(cpus: int):
    """A trial no node can hold would wait forever: say so now."""
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if largest < cpus:
        raise AutoMLError(f"budget.resources asks for {cpus} CPUs per trial, and the largest Ray node has "
                          f"{largest:g}, so no trial could start. Fix: lower budget.resources.cpu, or add bigger nodes")


CONNECT_TIMEOUT_S = 30.0


def check_reachable(address: str):
    """Fail within AUTOML_CONNECT_TIMEOUT_S (default 30 s) when nothing listens at a host:port address;
    Ray itself retries for many minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 address: [::1]:6379
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


def _scheduler(space: SearchSpace):
    """With fewer than two epochs (e.g. post-training compression of a trained model) there is nothing
    to stop early."""
    if space.epochs < 2:
        return FIFOScheduler()
    budget = space.budget
    kwargs = dict(metric="accuracy", mode="max", time_attr="training_iteration", max_t=space.epochs,
                  grace_period=min(budget.grace_epochs, space.epochs), reduction_factor=budget.reduction_factor)
    return ParetoASHA(**kwargs) if budget.scheduler == "pareto" else ASHAScheduler(**kwargs)


def _attempt_name(run_dir: Path) -> str:
    """Each start or resume writes Tune's files to its own tune/attempt-N: Ray workers left over from a
    killed driver cannot write into the directory of the attempt that replaces it."""
    tune_dir = run_dir / TUNE_DIR
    taken = [int(p.name.split("-")[1]) for p in tune_dir.glob("attempt-*") if p.name.split("-")[1].isdigit()]
    return f"attempt-{max(taken, default=0) + 1}"


def _tuner(space: SearchSpace, run_dir: Path, task, *, finished: List[Dict], trials: int, log: TrialLog, stopper,
           costing: Optional[Costing] = None, baseline: Optional[Dict] = None):
    from automl.search.trainable import run_trial

    _ship_file_modules()
    # trials that distil from the same teacher train it once and share it, on any node
    teachers = start_store(run_dir / "cache") if space_has_teachers(space) else None
    params = {"space": space, "task": task, "teachers": teachers, "driver": (socket.gethostname(), os.getpid()),
              **({"costing": costing} if costing is not None else {}),
              **({"baseline": baseline} if baseline is not None else {})}
    trainable = tune.with_resources(tune.with_parameters(run_trial, **params), {"cpu": space.budget.trial_cpus})
    tune_config = tune.TuneConfig(search_alg=_searcher(space, finished), scheduler=_scheduler(space),
                                  num_samples=trials - len(finished),
                                  max_concurrent_trials=space.budget.concurrency, reuse_actors=True,
                                  time_budget_s=space.budget.time_limit_s or None)
    run_config = tune.RunConfig(name=_attempt_name(run_dir), storage_path=str(run_dir / TUNE_DIR), verbose=0,
                                callbacks=[log], stop=stopper, failure_config=tune.FailureConfig(max_failures=0))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _run(space: SearchSpace, run_dir: Path, *, address: Optional[str], costing: Optional[Costing] = None,
         task=None, started: Optional[float] = None) -> SearchOutcome:
    started = started or time.time()
    task = task if task is not None else space.build_task()  # fail fast, before Ray starts
    with stop_on_signals() as stopper:
        return _search_and_write(space, run_dir, address, costing, task, stopper, started)


def timing(started: float, ray_s: float, log: TrialLog, front_check_s: float = 0.0) -> Dict[str, float]:
    """Where this run's wall time went: the controller's overhead is everything outside the span from
    the first trial's start to the last trial's end (Ray start-up, baseline, output writing, ...) except
    the front check (``front_check_s``: the front's models applied and timed, work the user asked for)."""
    now = time.time()
    first, last = log.first_start or now, log.last_end or now
    wall, trials = now - started, max(last - first, 0.0)
    overhead = wall - trials - front_check_s
    return {k: round(v, 4 if k == "overhead_share" else 2) for k, v in {
        "wall_s": wall, "ray_start_s": ray_s, "before_first_trial_s": first - started, "trials_s": trials,
        "after_last_trial_s": now - last, "front_check_s": front_check_s, "overhead_s": overhead,
        "overhead_share": overhead / max(wall, 1e-9)}.items()}


def _run_trials(space: SearchSpace, run_dir: Path, address, task, journal: Journal, log: TrialLog, stopper,
                costing, baseline) -> float:
    """Starts Ray and runs the trials the journal lacks, phase by phase; returns Ray's start-up seconds."""
    finished = journal.read()
    if finished:
        print(f"automl: {len(finished)} of {space.budget.trials} trials already finished ({JOURNAL}); "
              f"running the other {space.budget.trials - len(finished)}", flush=True)
    modules = search_modules(space, task)
    ray_started = time.time()
    _init_ray(address, space.budget.concurrency * space.budget.trial_cpus, modules)
    ray_s = time.time() - ray_started
    _check_capacity(space.budget.trial_cpus)
    check_worker_imports(modules)  # fail here, not in every trial
    stopper.install()  # ray.init replaced the SIGTERM handler
    for phase in phases(space, finished):
        if stopper.signal is not None:
            break
        if phase.space is None:  # sequential's second phase: on the first phase's best architectures
            phase = compression_phase(space, phase, [r for r in journal.read() if phase_of(r) == "architecture"])
            picked = ", ".join(phase.space.param(SEQUENTIAL_PARAM).domain.values)
            print(f"automl: architecture phase done; compression phase on the architectures of {picked}", flush=True)
        _fit_phase(phase, run_dir, task, log, stopper, costing, baseline)
    return ray_s


def _fit_phase(phase: Phase, run_dir: Path, task, log: TrialLog, stopper, costing, baseline):
    if phase.trials <= len(phase.finished):
        return
    log.space = phase.space  # its rows keep the phase's parameters (sequential.architecture)
    stopper.graceful = True
    try:
        _tuner(phase.space, run_dir, task, finished=phase.finished, trials=phase.trials, log=log, stopper=stopper,
               costing=costing, baseline=baseline).fit()
    finally:
        stopper.graceful = False


def _search_and_write(space: SearchSpace, run_dir: Path, address, costing, task, stopper,
                      started: float) -> SearchOutcome:
    journal = Journal(run_dir)
    finished = journal.read()
    baseline = measure_baseline(space, task, run_dir, costing, log=lambda m: print(m, flush=True))
    log = TrialLog(journal, space, run_dir, done=len(finished), interrupt=stopper)
    ray_s = 0.0
    if len(finished) < space.budget.trials:
        ray_s = _run_trials(space, run_dir, address, task, journal, log, stopper, costing, baseline)
    interrupted = stopper.signal
    rows = journal.read() + log.unfinished()  # in the order they finished
    versions = library_versions()
    profile = profile_report(costing, space) if costing is not None else None
    report = write_outputs(run_dir, space, rows, wall_time_s=time.time() - started, versions=versions,
                           profile=profile, baseline=baseline)
    front_check_s = 0.0
    if costing is not None and costing.measure_front and not interrupted:
        from automl.search.frontcheck import measure_front

        check_started = time.time()
        check = measure_front(run_dir, space, front_rows(rows, space), costing, task=task,
                              log=lambda m: print(m, flush=True))
        report = write_outputs(run_dir, space, rows, wall_time_s=time.time() - started, versions=versions,
                               profile=profile, front_check=check, baseline=baseline)
        front_check_s = time.time() - check_started
    report["timing"] = timing(started, ray_s, log, front_check_s)
    write_json(run_dir / "report.json", report)
    return SearchOutcome(run_dir=run_dir, report=report, rows=rows, interrupted=interrupted)


def run_search(space: SearchSpace, out, *, address: Optional[str] = None, force: bool = False, profile=None,
               measure_trials: bool = False, measure_front: bool = False, task=None) -> SearchOutcome:
    """Run the joint search and write the run directory.

    ``profile`` (a profile file, a loaded HardwareProfile, or "auto": the shipped CPU profile measured on
    this machine's kind of CPU when there is one, else none; what `automl search` does with the embedded
    default space) makes the search hardware-aware: each
    trial's latency_ms and energy_mj are predicted from it (see ``automl.search.costing``);
    ``measure_trials`` keeps the latency measured in each trial as measured_latency_ms, and
    ``measure_front`` re-applies and measures every Pareto point after the search. ``task`` replaces
    the space's task (e.g. a LoaderTask over DataLoaders given to the Python API). A search stopped by
    SIGINT or SIGTERM returns with ``interrupted`` set; ``resume_search`` finishes it."""
    started = time.time()
    check_run_dir(Path(out), force)
    if isinstance(profile, str) and profile == "auto":
        profile, measure_front = auto_profile(measure_front)
    costing = load_costing(profile, space, measure_trials=measure_trials, measure_front=measure_front)
    if space.supernet is not None:  # an architecture the supernet cannot hold fails here, not in every trial
        check_space(space)
    task = task if task is not None else space.build_task()  # a bad task must not cost the old run
    with run_lock(Path(out)):
        run_dir = prepare_run_dir(Path(out), force)
        write_yaml(run_dir / "space.yaml", space.raw)
        save_costing(run_dir, costing)
        return _run(space, run_dir, address=address, costing=costing, task=task, started=started)


def resume_search(run_dir, *, address: Optional[str] = None) -> SearchOutcome:
    """Finish a stopped search: the trials in its journal stay as they are (nothing is re-run or
    unpickled), the sampler learns from them, and the rest of the budget runs; then the outputs are
    rewritten."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "space.yaml").is_file():
        raise RunDirError(f"{run_dir} is not a resumable run directory (it has no space.yaml). "
                          "Fix: pass the --out directory of an earlier 'automl search'")
    space = parse_space(load_yaml(run_dir / "space.yaml"), str(run_dir / "space.yaml"))
    with run_lock(run_dir):
        recover_outputs(run_dir)
        return _run(space, run_dir, address=address, costing=restore_costing(run_dir))
