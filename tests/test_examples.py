"""Every shipped example space and recipe loads; the packaged default equals the one in search_spaces/."""
from pathlib import Path

import pytest

from automl.recipe import Recipe
from automl.spaces import default_space_path, load_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_example_spaces_load(path):
    space = load_space(path)
    assert space.params and space.objectives


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_load_and_round_trip(path, tmp_path):
    recipe = Recipe.load(path)
    recipe.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == recipe


def test_packaged_default_is_the_example():
    assert (ROOT / "search_spaces" / "digits_cnn.yaml").read_text() == default_space_path().read_text()


@pytest.mark.ray
@pytest.mark.slow
def test_bring_your_own_model_example_runs_as_the_readme_says(tmp_path, capsys):
    """examples/byom at a small scale: the user's data folder and checkpoint, then the README's two commands."""
    import subprocess
    import sys

    from automl.cli import main

    work = tmp_path / "work"
    subprocess.run([sys.executable, str(ROOT / "examples/byom/prepare.py"), "--out", str(work), "--per-class", "30",
                    "--epochs", "4"], check=True, capture_output=True)
    out = tmp_path / "run"
    code = main(["search", "--model", str(ROOT / "examples/byom/models.py") + ":build", "--checkpoint",
                 str(work / "weights.pt"), "--data", str(work / "data"), "--space",
                 str(ROOT / "examples/byom/space.yaml"), "--max-drop", "0.05", "--trials", "2", "--epochs", "1",
                 "--out", str(out)])
    assert code == 0
    recipes = sorted((out / "recipes").glob("*.yaml"))
    assert recipes, capsys.readouterr().out
    assert main(["apply", str(recipes[0]), "--out", str(tmp_path / "model")]) == 0
    import automl

    assert type(automl.load(tmp_path / "model")).__name__ == "SmallNet"
    import ray

    ray.shutdown()
