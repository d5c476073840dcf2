"""CLI behaviour on bad input: exit code 2, one paragraph naming the key, never a traceback."""
import subprocess
import sys

import pytest
from cli_helpers import run_cli

BAD = {
    "unknown_key": ("version: 1\ntask: digits\narch: {family: cnn}\nobjectives: {accuracy: max}\nbudgett: {trials: 2}\n",
                    "budgett", "did you mean 'budget'"),
    "misspelt_method": ("version: 1\ntask: digits\narch: {family: cnn}\nobjectives: {accuracy: max}\n"
                        "compression:\n  pruning: {method: {choice: [none, magnitud]}}\n",
                        "compression.pruning.method", "did you mean 'magnitude'"),
    "float_low_gt_high": ("version: 1\ntask: digits\narch: {family: cnn}\nobjectives: {accuracy: max}\n"
                          "train: {lr: {float: [1e-2, 1e-3]}}\n", "train.lr", "low < high"),
}


_run = run_cli


def test_the_installed_entry_point_exits_2_on_bad_input(tmp_path):
    """The real process: ``python -m automl`` gives the same exit code and one paragraph, no traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text(BAD["unknown_key"][0])
    proc = subprocess.run([sys.executable, "-m", "automl", "check", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "budgett" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("command", ["check", "search"])
def test_bad_space_exits_2_with_one_paragraph(tmp_path, name, command):
    text, key, hint = BAD[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    args = [command, str(path)] if command == "check" else [command, "--space", str(path), "--out", str(tmp_path / "run")]
    proc = _run(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert "\n" not in message
    assert str(path) in message and key in message and hint in message
    assert not (tmp_path / "run").exists()


def test_search_refuses_existing_run_dir(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trials.csv").write_text("precious results\n")
    proc = _run("search", "--out", str(tmp_path / "run"), "--trials", "1")
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (tmp_path / "run" / "trials.csv").read_text() == "precious results\n"


def test_check_lists_default_parameters():
    proc = _run("check")
    assert proc.returncode == 0
    assert "pruning.ratio" in proc.stdout and "when pruning.method eq 'magnitude'" in proc.stdout


@pytest.mark.parametrize("flag,value", [("--trials", "0"), ("--trials", "2000000"), ("--concurrency", "0")])
def test_bad_budget_override(tmp_path, flag, value):
    proc = _run("search", flag, value, "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and f"{flag}: must be between 1 and" in proc.stderr and value in proc.stderr
    assert not (tmp_path / "r").exists()


def test_errors_found_while_a_recipe_runs_name_the_recipe(tmp_path, capsys):
    from automl.cli import main

    recipe = tmp_path / "bad_layer.yaml"
    recipe.write_text("version: 1\ntask: digits\narch: {family: cnn, width: 8, depth: 1}\ntrain: {epochs: 1}\n"
                      "stages:\n  - method: magnitude\n    config: {ratio: 0.5, layers: [no_such_layer]}\n")
    assert main(["apply", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: layers: layer pattern matches no prunable layer (got 'no_such_layer')" in err
    assert not (tmp_path / "out").exists()


def test_strategy_override_is_checked_like_the_space(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("version: 1\ntask: digits\narch: {family: cnn}\nobjectives: {accuracy: max}\nbudget: {trials: 1}\n")
    proc = _run("search", "--space", str(path), "--strategy", "sequential", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "budget.trials: sequential runs two phases" in proc.stderr
    assert "\n" not in proc.stderr.strip() and not (tmp_path / "r").exists()


def test_budget_overrides_survive_a_reparse_of_the_space():
    """--trials / --concurrency are written into the space's raw form: fitting the space to a model without
    BatchNorm (a re-parse) and the run's space.yaml (what resume reads) keep them."""
    import argparse

    import torch.nn as nn

    from automl.cli import _override_budget
    from automl.spaces import parse_space
    from automl.spaces.user import fit_to_model, user_space

    space = user_space(builder="pkg.models:build", data={"path": "data.npz"})
    args = argparse.Namespace(trials=3, concurrency=1, strategy=None)
    space = _override_budget(space, args)
    assert (space.budget.trials, space.budget.concurrency) == (3, 1)
    assert parse_space(space.raw, space.source).budget.trials == 3
    fitted = fit_to_model(space, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), log=lambda m: None)
    assert (fitted.budget.trials, fitted.budget.concurrency) == (3, 1)


def test_the_api_budget_and_model_object_survive_fitting_the_space():
    """search_compression's path: a model object and trials given in Python, a model without BatchNorm
    (fit_to_model re-parses the space): both are still there after."""
    import dataclasses

    import torch.nn as nn

    from automl.arch.user import class_name
    from automl.spaces.user import fit_to_model, user_space, with_budget

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    space = user_space(object_class=class_name(model), task="loaders")
    space = with_budget(space, trials=3, concurrency=None)
    space = dataclasses.replace(space, model=space.model.with_object(model))
    fitted = fit_to_model(space, model, log=lambda m: None)
    assert fitted.budget.trials == 3 and fitted.model.obj is model
    assert with_budget(fitted, trials=5).model.obj is model
