"""Output directories: nothing the user had is deleted before the new work is validated and written."""
from pathlib import Path

import pytest
from cli_helpers import run_cli

from automl.errors import ConfigError, RunDirError
from automl.recipe import Recipe
from automl.recipe.saved import apply_to_dir, check_output
from automl.search.controller import check_run_dir, run_search
from automl.spaces import load_default_space
from repo_paths import REPO

ROOT = REPO


def _old_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("the user's earlier result")
    return path


def _recipe(task="digits", epochs=1):
    return Recipe.from_dict({"version": 1, "task": task, "arch": {"family": "mlp", "width": 16, "depth": 1},
                             "train": {"epochs": epochs, "lr": 0.01}})


def test_apply_force_keeps_the_old_directory_when_the_recipe_fails(tmp_path):
    out = _old_dir(tmp_path / "out")
    with pytest.raises(ConfigError, match="no_such_module"):
        apply_to_dir(_recipe(task="no_such_module:make"), out, force=True)
    assert (out / "keep.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


def test_apply_force_replaces_the_directory_once_written(tmp_path, task):
    out = _old_dir(tmp_path / "out")
    result, metrics = apply_to_dir(_recipe(), out, force=True, task=task)
    assert not (out / "keep.txt").exists() and (out / metrics["artifact"]).is_file()
    assert result.artifact.path == out / metrics["artifact"]  # paths point at --out, not the staging directory
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_model_object_for_a_family_recipe_is_refused_by_key(tmp_path):
    import torch.nn as nn

    out = _old_dir(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"model: this recipe builds a model of a built-in family.*Fix: call apply "
                                          r"without model="):
        apply_to_dir(_recipe(), out, force=True, model=nn.Linear(64, 10))
    assert (out / "keep.txt").is_file()


def test_search_force_keeps_the_old_run_when_the_task_fails(tmp_path):
    import dataclasses

    out = _old_dir(tmp_path / "run")
    space = dataclasses.replace(load_default_space(), task="no_such_module:make")
    with pytest.raises(ConfigError, match="no_such_module"):
        run_search(space, out, force=True)
    assert (out / "keep.txt").is_file()


@pytest.mark.parametrize("check", [check_output, check_run_dir])
def test_out_that_is_a_file_or_below_one_is_refused(tmp_path, check):
    afile = tmp_path / "f"
    afile.write_text("x")
    for out in (afile, afile / "below"):
        with pytest.raises(RunDirError, match="is a file, not a directory. Fix: choose another --out"):
            check(out, True)


def test_a_run_that_never_started_can_be_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "space.yaml").write_text("version: 1\n")
    assert check_run_dir(out, False) == out.resolve()
    (out / "tune").mkdir()
    with pytest.raises(RunDirError, match="not empty"):
        check_run_dir(out, False)


def test_cli_apply_out_is_a_file_exits_2(tmp_path):
    _recipe().save(tmp_path / "r.yaml")
    (tmp_path / "f").write_text("x")
    proc = run_cli("apply", tmp_path / "r.yaml", "--out", tmp_path / "f" / "out")
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_directory_in_use_is_refused(tmp_path):
    import os
    import socket

    from automl.search.rundir import run_lock

    out = tmp_path / "run"
    with run_lock(out):
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            with run_lock(out):
                pass
    with run_lock(out):  # released at the end of the block
        pass
