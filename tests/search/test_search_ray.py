"""A small real Ray Tune search (4 trials), its run directory, apply on a front recipe, resume."""
import csv
import json
import math
import os

from pathlib import Path

import optuna
import pytest

from automl.errors import RunDirError
from automl.recipe import Recipe, apply_recipe
from automl.spaces import parse_space
from automl.io import parse_yaml

SPACE = """
version: 1
task: digits
arch:
  family: cnn
  width: {choice: [8, 16]}
  depth: {int: [1, 2]}
train:
  epochs: 3
  lr: {float: [3e-3, 1e-2], log: true}
compression:
  pruning:
    method: {choice: [none, magnitude]}
    ratio: {float: [0.3, 0.6], when: {pruning.method: magnitude}}
    finetune_epochs: 1
  quantization:
    method: {choice: [none, int8_ptq]}
objectives: {accuracy: max, latency_ms: min, size_kb: min}
budget: {trials: 4, concurrency: 2, grace_epochs: 1, seed: 3}
"""


@pytest.fixture(scope="module")
def space():
    return parse_space(parse_yaml(SPACE, "tiny.yaml"), "tiny.yaml")


@pytest.fixture(scope="module")
def finished(space, tmp_path_factory):
    from automl.search import run_search

    out = tmp_path_factory.mktemp("run") / "search"
    outcome = run_search(space, out)
    yield outcome
    import ray

    ray.shutdown()


@pytest.mark.ray
def test_run_directory(finished, space):
    out = finished.run_dir
    for name in ("trials.csv", "front.csv", "pareto.png", "report.md", "report.json", "space.yaml"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4
    assert {r["status"] for r in rows} <= {"completed", "early_stopped", "error"}
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed, "at least one trial must finish"
    report = json.loads((out / "report.json").read_text())
    assert report["trials"] == 4 and report["space_hash"] == space.hash
    assert set(report["best"]) == set(space.objectives)
    assert report["search"]["strategy"] == "joint" and 0 < report["hypervolume"] <= 1.05 ** 3
    assert len(report["hypervolume_by_trial"]) == sum(r["feasible"] == "True" for r in completed)
    timing = report["timing"]  # where the wall time went; the trials' span is inside it
    assert 0 < timing["trials_s"] < timing["wall_s"] and timing["ray_start_s"] > 0
    assert timing["front_check_s"] == 0  # no profile, so no front to measure again
    assert timing["overhead_s"] == pytest.approx(timing["wall_s"] - timing["trials_s"], abs=0.02)
    assert "![front" in (out / "report.md").read_text()
    front = list(csv.DictReader((out / "front.csv").open()))
    assert 1 <= len(front) <= len(completed)
    for row in front:
        recipe = Recipe.load(out / "recipes" / f"{row['trial_id']}.yaml")
        assert recipe.provenance["trial_id"] == row["trial_id"]
        assert math.isclose(recipe.metrics["accuracy"], float(row["accuracy"]), rel_tol=1e-5)


@pytest.mark.ray
def test_apply_reproduces_a_front_trial(finished, tmp_path):
    entry = finished.report["front"][0]
    recipe = Recipe.load(finished.run_dir / entry["recipe"])
    result = apply_recipe(recipe, tmp_path)
    assert abs(result.metrics["accuracy"] - entry["metrics"]["accuracy"]) <= 0.02
    assert abs(result.metrics["test_accuracy"] - entry["metrics"]["test_accuracy"]) <= 0.02


@pytest.mark.ray
def test_existing_run_dir_is_kept_and_resume_rewrites(finished, space):
    from automl.search import resume_search, run_search

    before = (finished.run_dir / "trials.csv").read_text()
    with pytest.raises(RunDirError, match="--force"):
        run_search(space, finished.run_dir)
    assert (finished.run_dir / "trials.csv").read_text() == before
    again = resume_search(finished.run_dir)
    assert len(again.rows) == 4
    assert {r["trial_id"] for r in again.rows} == {r["trial_id"] for r in finished.rows}


def test_searcher_marks_early_stopped_and_nan_trials(space):
    from automl.search.controller import _searcher

    searcher = _searcher(space)
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b", "c")}
    assert all("arch.width" in c and c["train.epochs"] == 3 for c in configs.values())
    searcher.on_trial_complete("a", {"accuracy": 0.5, "final": False})
    searcher.on_trial_complete("b", {"accuracy": 0.9, "latency_ms": float("nan"), "size_kb": 3.0, "final": True})
    searcher.on_trial_complete("c", {"accuracy": 0.9, "latency_ms": 0.1, "size_kb": 3.0, "final": True})
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL,
                      optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow
@pytest.mark.ray
def test_search_where_every_trial_fails_exits_1(tmp_path, capsys):
    from automl.cli import main

    broken = SPACE.replace("    method: {choice: [none, magnitude]}\n",
                           "    method: magnitude\n    layers: {fixed: [no_such_layer]}\n")
    broken = broken.replace("trials: 4", "trials: 2")
    (tmp_path / "broken.yaml").write_text(broken)
    code = main(["search", "--space", str(tmp_path / "broken.yaml"), "--out", str(tmp_path / "run"), "--no-profile"])
    out, err = capsys.readouterr()
    assert code == 1 and "no trial completed" in err and "no_such_layer" in err
    failures = [line for line in out.splitlines() if ": failed: " in line]
    assert len(failures) == 2 and all("no_such_layer" in line and ".txt)" in line for line in failures)
    assert "Traceback (most recent call last)" not in out + err  # the traceback is in the trial's file
    path = failures[0].rsplit("(traceback: ", 1)[1].rstrip(")")
    assert "no_such_layer" in Path(path).read_text()
    with open(tmp_path / "run" / "trials.csv") as f:  # trials.csv names each traceback inside the run
        named = [row["traceback"] for row in csv.DictReader(f)]
    assert len(named) == 2 and all((tmp_path / "run" / name).is_file() for name in named)


@pytest.mark.slow
@pytest.mark.ray
def test_pareto_scheduler_ranks_on_predicted_cost(space, tmp_path):
    from automl.search import run_search

    pareto = parse_space({**space.raw, "budget": {**space.raw["budget"], "scheduler": "pareto"}}, "tiny.yaml")
    outcome = run_search(pareto, tmp_path / "run")
    assert len(outcome.rows) == 4 and {r["status"] for r in outcome.rows} <= {"completed", "early_stopped"}
    assert all(r["metrics"]["predicted_cost"] > 0 for r in outcome.rows)  # MACs: no profile here


def _dying_task():
    """Digits, but the trial's process exits while it loads the training data (a local class: Ray
    ships it by value)."""
    from automl.tasks.digits import DigitsTask

    class Dying(DigitsTask):
        def train_loader(self, batch_size, seed):
            os._exit(3)

    return Dying()


@pytest.mark.slow
@pytest.mark.ray
def test_a_trial_whose_process_dies_says_how(space, tmp_path):
    from automl.search import run_search

    small = parse_space({**space.raw, "budget": {**space.raw["budget"], "trials": 2}}, "tiny.yaml")
    outcome = run_search(small, tmp_path / "run", task=_dying_task())
    assert [r["status"] for r in outcome.rows] == ["error", "error"]
    for row in outcome.rows:
        assert "exited with code 3" in row["error"] and "peak memory" in row["error"], row["error"]


def test_chance_accuracy_fails_the_trial():
    from automl.errors import MeasurementError
    from automl.search.trainable import check_above_chance

    with pytest.raises(MeasurementError, match=r"at chance level \(1/10 classes"):
        check_above_chance(0.1, 10)
    check_above_chance(0.5, 10)
    check_above_chance(None, 10)
    with pytest.raises(MeasurementError):
        check_above_chance(0.51, 2)


def test_unreachable_cluster_fails_fast(monkeypatch):
    """Nothing listening at --address (or RAY_ADDRESS): one paragraph within the connect timeout,
    not Ray's minutes of retries."""
    import time

    import ray

    from automl.errors import AutoMLError, ConfigError
    from automl.search.controller import _init_ray, check_reachable

    started = time.time()
    with pytest.raises(AutoMLError, match=r"no Ray cluster answers at ray://127\.0\.0\.1:1 .*AUTOML_CONNECT_TIMEOUT_S"):
        check_reachable("ray://127.0.0.1:1")
    assert time.time() - started < 10
    check_reachable("auto")  # resolved by Ray itself
    monkeypatch.setenv("AUTOML_CONNECT_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="AUTOML_CONNECT_TIMEOUT_S: must be a number of seconds"):
        check_reachable("127.0.0.1:1")
    monkeypatch.setenv("AUTOML_CONNECT_TIMEOUT_S", "5")
    if not ray.is_initialized():
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
        with pytest.raises(AutoMLError, match=r"at 127\.0\.0\.1:1 \(waited up to 5 s"):
            _init_ray(None, 1)
        assert not ray.is_initialized()
