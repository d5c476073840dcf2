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

from automl.errors import AutoMLError, RunDirError
from automl.hardware.shipped import auto_profile
from automl.search.rundir import TUNE_DIR, check_run_dir, prepare_run_dir, recover_outputs, run_lock
from automl.io import load_yaml, write_json, write_yaml
from automl.recipe.usermodel import check_user_model
from automl.search.baseline import measure_baseline
from automl.supernet.inherit import check_space
from automl.search.costing import Costing, load_costing, profile_report, restore_costing, save_costing
from automl.search.interrupt import stop_on_signals
from automl.search.journal import JOURNAL, Journal, teach_study
from automl.search.strategy import SEQUENTIAL_PARAM, Phase, compression_phase, phase_of, phases
from automl.search.raystart import RayStart, _init_ray, check_reachable  # noqa: F401  (tests import the last two)
from automl.search.shipping import check_worker_imports, search_modules
from automl.search.teachers import space_has_teachers, start_store
from automl.search.triallog import TrialLog
from automl.search.outputs import front_rows, write_outputs
from automl.search.pareto_asha import ParetoASHA
from automl.search.versions import library_versions
from automl.spaces import SearchSpace, define_by_run, parse_space
from automl.spaces.user import fit_to_model
from automl.tasks.data import check_images



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


def _check_capacity(cpus: int):
    """A trial no node can hold would wait forever: say so now."""
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if largest < cpus:
        raise AutoMLError(f"budget.resources asks for {cpus} CPUs per trial, and the largest Ray node has "
                          f"{largest:g}, so no trial could start. Fix: lower budget.resources.cpu, or add bigger nodes")


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
         task=None, started: Optional[float] = None, starting: Optional[RayStart] = None) -> SearchOutcome:
    """``starting``: Ray, already starting (run_search); else it starts after the task is built."""
    started = started or time.time()
    task = task if task is not None else space.build_task()  # fail fast, before Ray starts
    with stop_on_signals() as stopper:
        return _search_and_write(space, run_dir, address, costing, task, stopper, started, starting)


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


def _run_trials(space: SearchSpace, run_dir: Path, starting: RayStart, modules, task, journal: Journal,
                log: TrialLog, stopper, costing, baseline) -> float:
    """Waits for Ray and runs the trials the journal lacks, phase by phase; returns Ray's start-up seconds."""
    finished = journal.read()
    if finished:
        print(f"automl: {len(finished)} of {space.budget.trials} trials already finished ({JOURNAL}); "
              f"running the other {space.budget.trials - len(finished)}", flush=True)
    ray_s = starting.wait()
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
                      started: float, starting: Optional[RayStart] = None) -> SearchOutcome:
    journal = Journal(run_dir)
    finished = journal.read()
    modules = search_modules(space, task)
    if starting is None and len(finished) < space.budget.trials:  # Ray starts while the baseline is measured
        starting = RayStart(address, _ray_cpus(space), modules)
    try:
        baseline = measure_baseline(space, task, run_dir, costing, log=lambda m: print(m, flush=True))
    except BaseException:
        if starting is not None:
            starting.stop()
        raise
    log = TrialLog(journal, space, run_dir, done=len(finished), interrupt=stopper)
    ray_s = 0.0
    if starting is not None and len(finished) < space.budget.trials:
        ray_s = _run_trials(space, run_dir, starting, modules, task, journal, log, stopper, costing, baseline)
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
    # a local Ray starts while the inputs are read and checked (a remote one needs the user's modules)
    starting = None if address or os.environ.get("RAY_ADDRESS") else RayStart(None, _ray_cpus(space))
    try:
        if isinstance(profile, str) and profile == "auto":
            profile, measure_front = auto_profile(measure_front)
        costing = load_costing(profile, space, measure_trials=measure_trials, measure_front=measure_front)
        if space.supernet is not None:  # an architecture the supernet cannot hold fails here, not in every trial
            check_space(space)
        task = task if task is not None else space.build_task()  # a bad task must not cost the old run
        check_images(task)
        model = check_user_model(space, task)  # ... nor a model that does not build, load or fit the data
        space = space if model is None else fit_to_model(space, model)
        with run_lock(Path(out)):
            run_dir = prepare_run_dir(Path(out), force)
            write_yaml(run_dir / "space.yaml", space.raw)
            save_costing(run_dir, costing)
            return _run(space, run_dir, address=address, costing=costing, task=task, started=started,
                        starting=starting)
    except BaseException:
        if starting is not None:
            starting.stop()
        raise


def _ray_cpus(space: SearchSpace) -> int:
    return space.budget.concurrency * space.budget.trial_cpus


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
