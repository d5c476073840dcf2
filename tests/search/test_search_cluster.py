"""A search on a two-node local Ray cluster started with token authentication: the user's task module
is shipped to the workers, a module the workers cannot import fails before any trial, and a missing
token gets the hint that works."""
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automl.search.shipping import user_code_paths
from automl.search.teachers import TeacherStore, write_entry

SPACE = """
version: 1
task: TASK
arch: {family: cnn, width: 8, depth: 2}
train: {epochs: 2, lr: {float: [3e-3, 1e-2], log: true}}
objectives: {accuracy: max, latency_ms: min}
budget: {trials: 2, concurrency: 2, seed: 0}
"""
TOKEN = "automl0test0token0abcdefghijklmnopqrstuv"


def _ray(*args, env, cwd):
    bin_dir = Path(sys.executable).parent
    return subprocess.run([str(bin_dir / "ray"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head and one more node on this machine, started from a directory without the user's code."""
    elsewhere = tmp_path_factory.mktemp("nodes")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    port = 6300 + os.getpid() % 500
    try:
        head = _ray("start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    "--disable-usage-stats", env=env, cwd=elsewhere)
        assert head.returncode == 0, head.stderr[-2000:]
        node = _ray("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--disable-usage-stats",
                    env=env, cwd=elsewhere)
        assert node.returncode == 0, node.stderr[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        _ray("stop", "--force", env=env, cwd=elsewhere)


def _search(tmp_path, cluster, task, token=True, **extra):
    address, env = cluster
    env = {**env, **extra}
    if not token:
        env.pop("RAY_AUTH_TOKEN")
    env["AUTOML_CONNECT_TIMEOUT_S"] = "10"
    (tmp_path / "space.yaml").write_text(SPACE.replace("TASK", task))
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "automl.cli", "search", "--space", "space.yaml", "--out", "run",
                           "--no-profile", "--address", address], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=400)
    return done, time.time() - started


def _write_task(folder: Path, name: str, guard: str = ""):
    (folder / f"{name}.py").write_text(f"import os\n{guard}\nfrom automl.tasks.digits import DigitsTask\n\n\n"
                                       "def make():\n    return DigitsTask()\n")


@pytest.mark.ray
@pytest.mark.slow
def test_user_task_module_runs_on_a_two_node_token_cluster(tmp_path, cluster):
    _write_task(tmp_path, "mytask")
    done, _ = _search(tmp_path, cluster, "mytask:make")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = (tmp_path / "run" / "trials.csv").read_text().splitlines()
    assert len(trials) == 3 and "completed" in trials[1] + trials[2]


@pytest.mark.ray
@pytest.mark.slow
def test_module_the_workers_cannot_import_fails_before_any_trial(tmp_path, cluster):
    # importable here only: the cluster's nodes were started without this variable
    guard = "if os.environ.get('AUTOML_TEST_DRIVER') != '1':\n    raise ImportError('needs the driver')"
    _write_task(tmp_path, "drivertask", guard)
    done, seconds = _search(tmp_path, cluster, "drivertask:make", AUTOML_TEST_DRIVER="1")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cannot import 'drivertask'" in done.stderr and "needs the driver" in done.stderr
    assert "[1/2]" not in done.stdout and seconds < 120


@pytest.mark.ray
@pytest.mark.slow
def test_missing_token_names_both_variables(tmp_path, cluster):
    done, _ = _search(tmp_path, cluster, "digits", token=False)
    assert done.returncode == 1 and "RAY_AUTH_MODE=token" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_a_teacher_trained_on_one_node_is_reused_on_every_node(tmp_path, cluster):
    """Trials see only their own directory; the run directory's cache is reached through the store."""
    space = SPACE.replace("trials: 2, concurrency: 2", "trials: 3, concurrency: 1")
    space = space.replace("train: {epochs: 2, lr: {float: [3e-3, 1e-2], log: true}}",
                          "train: {epochs: 2, lr: 0.005}\ncompression:\n  distillation: {method: kd, teacher: self}")
    (tmp_path / "kd.yaml").write_text(space.replace("TASK", "digits"))
    address, env = cluster
    done = subprocess.run([sys.executable, "-m", "automl.cli", "search", "--space", "kd.yaml", "--out", "run",
                           "--no-profile", "--address", address], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "run" / "trials.csv") as f:
        reused = sorted(float(row["teachers_reused"]) for row in csv.DictReader(f))
    assert reused == [0, 1, 1]  # trained by the first trial only
    assert len(list((tmp_path / "run" / "cache").glob("teacher-*"))) == 1


def test_teacher_store_entries_are_whole_and_first_come(tmp_path):
    store = TeacherStore(str(tmp_path / "cache"))
    assert store.get("teacher-a") is None
    assert store.put("teacher-a", {"model.pt": b"w1", "structure.json": b"{}"})
    assert not store.put("teacher-a", {"model.pt": b"w2"})  # the first published copy stays
    assert store.get("teacher-a") == {"model.pt": b"w1", "structure.json": b"{}"}
    write_entry(tmp_path / "local" / "teacher-a", {"../escape.pt": b"x"})  # names stay inside the entry
    assert [p.name for p in (tmp_path / "local" / "teacher-a").iterdir()] == ["escape.pt"]


def test_only_code_that_is_not_installed_is_shipped(tmp_path, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text("X = 1\n")
    (tmp_path / "single.py").write_text("Y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mypkg.tasks  # noqa: F401
    import single  # noqa: F401

    paths = user_code_paths(["mypkg.tasks", "single", "numpy", "automl.tasks", "never_imported"])
    assert paths == [str(package.resolve()), str((tmp_path / "single.py").resolve())]


def test_the_modules_a_search_needs_on_its_workers():
    from types import SimpleNamespace

    from automl.search.shipping import search_modules
    from automl.tasks.digits import DigitsTask

    class Local(DigitsTask):  # defined in a function: shipped by value, nothing to import
        pass

    model = SimpleNamespace(builder="mypkg.models:build", obj=None)
    space = SimpleNamespace(task="mypkg.tasks:make", model=model)
    assert search_modules(space) == ["mypkg.tasks", "mypkg.models"]
    file_built = SimpleNamespace(task="digits", model=SimpleNamespace(builder="models.py:build", obj=None))
    assert search_modules(file_built, DigitsTask()) == [] and search_modules(file_built, Local()) == []
    import json

    assert search_modules(SimpleNamespace(task="digits", model=None), json.JSONDecoder()) == ["json.decoder"]
