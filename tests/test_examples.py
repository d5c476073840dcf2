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
