"""budget.resources: what a trial holds, and the training threads its recipe records."""
import pytest
import torch

from automl.errors import AutoMLError, ConfigError
from automl.io import parse_yaml
from automl.recipe import apply_recipe, recipe_from_config
from automl.spaces import parse_space
from automl.spaces.adapter import sample_config

SPACE = """
version: 1
task: digits
arch: {family: cnn, width: 8, depth: 1}
train: {epochs: 1, lr: 0.005}
objectives: {accuracy: max, latency_ms: min}
budget: {trials: 2, concurrency: 1, resources: RESOURCES}
"""


def _space(resources, extra=""):
    text = SPACE.replace("RESOURCES", resources).replace("train: {epochs: 1, lr: 0.005}",
                                                            "train: {epochs: 1, lr: 0.005" + extra + "}")
    return parse_space(parse_yaml(text, "r.yaml"), "r.yaml")


def test_a_trial_trains_with_the_cpus_it_holds_and_its_recipe_says_so():
    space = _space("{cpu: 2}")
    assert space.budget.trial_cpus == 2 and space.deploy.threads == 1
    recipe = recipe_from_config(space, sample_config(space))
    assert recipe.train.threads == 2 and recipe.to_dict()["train"]["threads"] == 2
    explicit = _space("{cpu: 2}", ", threads: 3")
    assert recipe_from_config(explicit, sample_config(explicit)).train.threads == 3  # said explicitly


@pytest.mark.parametrize("resources, words", [("{gpu: 1}", "unknown key"), ("{cpu: 0}", "cpu"),
                                              ("[2]", "resources")])
def test_bad_resources_are_refused(resources, words):
    with pytest.raises(ConfigError, match=words) as info:
        _space(resources)
    assert "budget.resources" in str(info.value)


def test_apply_trains_with_train_threads_and_measures_with_deploy_threads(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    space = _space("{cpu: 2}")
    recipe = recipe_from_config(space, sample_config(space))
    result = apply_recipe(recipe, tmp_path)
    assert seen[0] == 2 and result.metrics["latency_ms"] > 0


def test_a_trial_no_node_can_hold_is_refused_before_the_search(monkeypatch):
    import ray

    from automl.search import controller

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}},
                                               {"Alive": False, "Resources": {"CPU": 64.0}}])
    controller._check_capacity(2)
    with pytest.raises(AutoMLError, match="4 CPUs per trial.*largest Ray node has 2"):
        controller._check_capacity(4)
