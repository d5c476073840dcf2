"""Finished trials are durable and resume neither loses nor repeats one: the journal, the sampler it
teaches, signals, kills at a finished-trial boundary, and a received run directory with a pickle payload."""
import csv
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from automl.errors import RunDirError
from automl.io import parse_yaml
from automl.search.interrupt import stop_on_signals
from automl.search.journal import Journal, make_row, teach_study
from automl.search.triallog import error_from_traceback
from automl.spaces import parse_space

SPACE = """
version: 1
task: digits
arch:
  family: cnn
  width: {choice: [8, 16]}
  depth: 2
train:
  epochs: 3
  lr: {float: [3e-3, 1e-2], log: true}
compression:
  pruning:
    method: {choice: [none, magnitude]}
    ratio: {float: [0.3, 0.6], when: {pruning.method: magnitude}}
    finetune_epochs: 1
objectives: {accuracy: max, latency_ms: min, size_kb: min}
budget: {trials: 6, concurrency: 2, grace_epochs: 1, seed: 3}
"""


@pytest.fixture
def space():
    return parse_space(parse_yaml(SPACE, "tiny.yaml"), "tiny.yaml")


def _row(space, trial_id, status="completed", accuracy=0.9, width=8):
    metrics = {"accuracy": accuracy, "latency_ms": 0.02, "size_kb": 3.0, "final": status == "completed",
               "feasible": True, "epoch": 3}
    config = {"arch.width": width, "arch.depth": 2, "train.epochs": 3, "train.lr": 5e-3, "pruning.method": "none",
              "pruning.finetune_epochs": 1}
    return make_row(trial_id, metrics, config, space, error="boom" if status == "error" else None)


def test_journal_keeps_each_trial_once_and_drops_a_cut_last_line(space, tmp_path):
    journal = Journal(tmp_path)
    for tid in ("a", "b", "a"):
        journal.append(_row(space, tid))
    with open(journal.path, "a") as f:
        f.write('{"trial_id": "c", "sta')  # a kill in the middle of a write
    rows = journal.read()
    assert [r["trial_id"] for r in rows] == ["a", "b"]
    assert rows[0]["metrics"]["accuracy"] == 0.9 and rows[0]["config"]["arch.width"] == 8


def test_damaged_journal_line_names_the_line(space, tmp_path):
    journal = Journal(tmp_path)
    journal.append(_row(space, "a"))
    with open(journal.path, "a") as f:
        f.write('{"trial_id": 3}\n')
    journal.append(_row(space, "b"))
    with pytest.raises(RunDirError, match=r"line 2 .*Fix: delete that line"):
        journal.read()


def test_sampler_learns_the_journaled_trials(space):
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    rows = [_row(space, "a"), _row(space, "b", status="early_stopped"), _row(space, "c", status="error"),
            _row(space, "d", width=99)]  # a value the space cannot produce is skipped, not fatal
    assert teach_study(study, rows, space) == 3
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                      optuna.trial.TrialState.FAIL]
    assert study.trials[0].values == [0.9, 0.02, 3.0] and study.trials[0].params["arch.width"] == 8


def test_error_line_from_a_traceback():
    text = ("Failure # 1 (occurred at now)\nray::ImplicitFunc.train() (pid=1)\nTraceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise ConfigError(\nautoml.errors.ConfigError: bad value\nFix: this\n')
    assert error_from_traceback(text) == "bad value Fix: this"
    foreign = text.replace("automl.errors.ConfigError", "ValueError")
    assert error_from_traceback(foreign) == "ValueError: bad value Fix: this"
    assert error_from_traceback("The actor died unexpectedly before finishing this task.\n").startswith("The actor")


def test_first_signal_stops_the_trials_gently_second_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stopper:
        with pytest.raises(KeyboardInterrupt):  # outside the trials (baseline, outputs): at once
            os.kill(os.getpid(), signal.SIGTERM)
        stopper.graceful = True
        assert not stopper.stop_all()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.stop_all() and stopper.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["AUTOML_TEST_MARKER"]),))


def test_resume_of_a_received_directory_unpickles_nothing(space, tmp_path, monkeypatch):
    """Its journal already holds the whole budget: resume rewrites the outputs from it, and Tune's pickled
    state (a payload here) is never read."""
    from automl.search import resume_search

    run = tmp_path / "received"
    (run / "tune" / "attempt-1").mkdir(parents=True)
    (run / "space.yaml").write_text(SPACE)
    for tid in "abcdef":
        Journal(run).append(_row(space, tid, accuracy=0.5 + 0.05 * "abcdef".index(tid)))
    marker = tmp_path / "ran"
    monkeypatch.setenv("AUTOML_TEST_MARKER", str(marker))
    for name in ("tune/tuner.pkl", "tune/attempt-1/tuner.pkl", "tune/attempt-1/searcher-state-x.pkl"):
        (run / name).write_bytes(pickle.dumps(_Payload()))
    outcome = resume_search(run)
    assert not marker.exists()
    assert sorted(r["trial_id"] for r in outcome.rows) == list("abcdef")
    assert {r["status"] for r in outcome.rows} == {"completed"}


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "automl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _trials(run: Path):
    with open(run / "trials.csv") as f:
        return {row["trial_id"]: row for row in csv.DictReader(f)}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT to the process group", "SIGTERM", "SIGKILL"])
def test_stop_at_a_finished_trial_then_resume_loses_and_repeats_nothing(tmp_path, how):
    (tmp_path / "space.yaml").write_text(SPACE)
    run = tmp_path / "run"
    sig = getattr(signal, how.split()[0])
    search = _cli("search", "--space", str(tmp_path / "space.yaml"), "--out", str(run), "--no-profile",
                  start_new_session=True)
    printed = []
    for line in search.stdout:
        if line.startswith("["):
            printed.append(line.split()[1].rstrip(":"))
            if len(printed) == 2:  # the moment the second trial is reported finished
                (os.killpg if "group" in how else os.kill)(search.pid, sig)
    search.wait(timeout=120)
    journaled = {json.loads(line)["trial_id"]: json.loads(line) for line in (run / "journal.jsonl").open()}
    assert set(printed) <= set(journaled)  # what was reported finished is durable
    if sig == signal.SIGKILL:
        assert search.returncode == -signal.SIGKILL
    else:
        assert search.returncode == 130
        before = _trials(run)
        assert {t for t, r in before.items() if r["status"] != "interrupted"} == set(journaled)
        assert all(before[t]["status"] == "interrupted" for t in set(before) - set(journaled))
    resume = _cli("resume", str(run))
    out = resume.communicate(timeout=300)[0]
    assert resume.returncode == 0, out
    after = _trials(run)
    assert len(after) == 6 and {r["status"] for r in after.values()} <= {"completed", "early_stopped"}
    for trial_id, row in journaled.items():  # kept as they were, not trained again
        assert float(after[trial_id]["accuracy"]) == pytest.approx(row["metrics"]["accuracy"], abs=1e-6)
    rerun = [line for line in out.splitlines() if line.startswith("[") and line.split()[1].rstrip(":") in journaled]
    assert not rerun and f"{len(journaled)} of 6 trials already finished" in out


@pytest.mark.parametrize("name, kind", [("tpe", optuna.samplers.TPESampler), ("nsga2", optuna.samplers.NSGAIISampler),
                                        ("random", optuna.samplers.RandomSampler)])
def test_budget_sampler_is_used_seeded_and_taught_on_resume(space, name, kind):
    from automl.search.controller import _searcher

    chosen = parse_space({**space.raw, "budget": {**space.raw["budget"], "sampler": name}}, "tiny.yaml")
    first = _searcher(chosen).suggest("t0")
    again = _searcher(chosen)
    assert isinstance(again._ot_study.sampler, kind) and again.suggest("t0") == first  # seeded
    resumed = _searcher(chosen, [_row(chosen, "a"), _row(chosen, "b", status="early_stopped")])
    assert len(resumed._ot_study.trials) == 2 and isinstance(resumed._ot_study.sampler, kind)


def test_unknown_sampler_is_refused(space):
    from automl.errors import ConfigError

    with pytest.raises(ConfigError, match="sampler"):
        parse_space({**space.raw, "budget": {**space.raw["budget"], "sampler": "cmaes"}}, "tiny.yaml")
