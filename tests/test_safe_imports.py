"""Code named in a file: standard-library targets are refused before anything runs, imports are announced,
and `automl check` imports and checks the task."""
from pathlib import Path

import pytest
from cli_helpers import run_cli

from automl.arch.user import import_builder
from automl.errors import ConfigError
from automl.tasks import get_task
from automl.validate import Where

SPACE = Path(__file__).parents[1] / "automl" / "spaces" / "builtin" / "digits_cnn.yaml"


@pytest.mark.parametrize("spec", ["tempfile:mkdtemp", "this:nothing", "os.path:join", "sys:exit", "builtins:print"])
def test_standard_library_task_is_refused_before_import(spec, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(ConfigError, match=r"standard library.*Fix: name a task factory") as info:
        get_task(spec, file="space.yaml")
    assert "space.yaml" in str(info.value) and spec in str(info.value)
    assert list(tmp_path.iterdir()) == []  # mkdtemp never ran


def test_standard_library_builder_is_refused():
    with pytest.raises(ConfigError, match=r"'os:system' is in Python's standard library"):
        import_builder("os:system", Where("recipe.yaml", "model.builder"))


def _space(tmp_path, task):
    text = SPACE.read_text().replace("task: digits", f"task: {task}")
    assert f"task: {task}" in text
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _check(path):
    return run_cli("check", path)


def test_check_imports_the_task(tmp_path, monkeypatch):
    from automl import imports

    monkeypatch.setattr(imports, "_ANNOUNCED", set())  # imports are announced once per process: a fresh one
    missing = _check(_space(tmp_path, "no_such_module:make"))
    assert missing.returncode == 2 and "cannot import task module 'no_such_module'" in missing.stderr
    assert "importing task factory module 'no_such_module' named in" in missing.stderr
    stdlib = _check(_space(tmp_path, "tempfile:mkdtemp"))
    assert stdlib.returncode == 2 and "standard library" in stdlib.stderr and "Traceback" not in stdlib.stderr
    assert _check(SPACE).returncode == 0
