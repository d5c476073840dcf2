"""Structured pruning's energy allocation weighed by the device: each group's cost is the latency or
energy a hardware profile prices for its layers (automl.hardware.layer_costs), not its MACs."""
import pytest
import torch

from automl.compress import ApplyContext
from automl.compress.pruning.structured import StructuredPruning, StructuredPruningConfig
from automl.errors import ConfigError, ProfileError
from automl.hardware.shipped import SHIPPED_PROFILES
from automl.recipe import Recipe, apply_recipe
from automl.hardware.layer_costs import price_layers
from automl.tasks import get_task

CNN = {"width": 32, "depth": 3, "kernel": 3, "pooling": "stride"}  # in the shipped profiles' space
PROFILE = str(SHIPPED_PROFILES[0])


@pytest.fixture(scope="module")
def task():
    return get_task("digits")


def test_every_layer_is_priced_from_the_profile(task):
    model = task.build_model("cnn", CNN)
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    latency = price_layers(model, task.example_input(4), PROFILE, "latency")
    energy = price_layers(model, task.example_input(1), PROFILE, "energy")
    assert set(layers) <= set(latency) and all(latency[n] > 0 for n in layers)
    assert set(latency) == set(energy) and all(energy[n] > 0 for n in layers)


def test_auto_is_the_searchs_own_profile_when_there_is_one(task):
    from automl.hardware.profile import HardwareProfile

    model, x = task.build_model("cnn", CNN), task.example_input(1)
    other = str(SHIPPED_PROFILES[-1])
    assert price_layers(model, x, other, "latency") != price_layers(model, x, PROFILE, "latency")  # two CPUs
    assert price_layers(model, x, "auto", "latency", auto=HardwareProfile.load(other)) == \
        price_layers(model, x, other, "latency")
    assert price_layers(model, x, PROFILE, "latency", auto=HardwareProfile.load(other)) == \
        price_layers(model, x, PROFILE, "latency")  # a named profile wins


def test_a_layer_the_profile_lacks_names_it_and_the_fix(task):
    with pytest.raises(ProfileError, match="no entry for conv") as err:
        price_layers(task.build_model("resnet", {"width": 16}), task.example_input(1), PROFILE, "latency")
    assert "automl profile measure" in err.value.fix
    with pytest.raises(ConfigError, match="profile not found") as err:
        price_layers(task.build_model("cnn", CNN), task.example_input(1), "nowhere.yaml", "latency")
    assert err.value.key == "profile"


def prune(task, costs, **config):
    """One pruning event with ``price_layers`` answering ``costs`` ({layer: cost}); returns the handler."""
    config = {"ratio": 0.5, "allocation": "energy", "round_to": 1, "finetune_epochs": 0, **config}
    handler = StructuredPruning(StructuredPruningConfig(**config), start_epoch=0)
    calls = []

    def priced(model, example, spec, cost):
        calls.append((spec, cost))
        return costs
    ctx = ApplyContext(task=task, work_dir=None, epochs=0, seed=0, steps_per_epoch=1, price_layers=priced)
    torch.manual_seed(0)
    model = handler.prepare(task.build_model("cnn", CNN), ctx)
    handler.on_epoch_start(model, 0, ctx)
    return handler, calls


def test_the_priced_groups_lose_most_and_the_profile_is_asked_once(task):
    """The same model and level: by MACs the wide middle layer loses most; priced as if the first
    conv were by far the slowest, the first conv's group loses most instead."""
    by_macs, calls = prune(task, {}, cost="macs")
    assert calls == []
    slow_first = {"features.0": 100.0, "features.3": 1.0, "features.6": 1.0, "classifier.1": 1.0}
    by_latency, calls = prune(task, slow_first, cost="latency", profile="mine.yaml")
    assert calls == [("mine.yaml", "latency")]  # priced once, on the dense shapes
    kept = lambda h, u: int(h.last_keep[u].sum())  # noqa: E731
    assert kept(by_latency, "features.0") < kept(by_macs, "features.0")
    # the level's share of the total cost comes out of the expensive group; the cheap ones keep nearly all
    assert kept(by_latency, "features.0") <= 16
    assert min(kept(by_latency, "features.3"), kept(by_latency, "features.6")) >= 60
    assert kept(by_macs, "features.3") < 60


def test_cost_from_a_profile_needs_the_energy_allocation_and_a_recipe(task):
    with pytest.raises(ConfigError, match="energy allocation only") as err:
        prune(task, {}, cost="latency", allocation="uniform")
    assert err.value.key == "cost"
    handler = StructuredPruning(StructuredPruningConfig(ratio=0.5, allocation="energy", cost="energy",
                                                       finetune_epochs=0), start_epoch=0)
    ctx = ApplyContext(task=task, work_dir=None, epochs=0, seed=0, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="through a recipe"):  # at prepare: before any training
        handler.prepare(task.build_model("cnn", CNN), ctx)
    handler = StructuredPruning(StructuredPruningConfig(ratio=0.5, allocation="energy", cost="latency",
                                                       profile="nowhere.yaml", finetune_epochs=0), start_epoch=3)
    ctx = ApplyContext(task=task, work_dir=None, epochs=4, seed=0, steps_per_epoch=1, price_layers=price_layers)
    with pytest.raises(ConfigError, match="profile not found"):
        handler.prepare(task.build_model("cnn", CNN), ctx)


def test_a_recipe_prices_its_groups_with_the_named_profile(task, tmp_path):
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": {"family": "cnn", **CNN},
                               "train": {"epochs": 1, "lr": 0.005, "seed": 0},
                               "stages": [{"method": "structured", "start_epoch": 0, "config": {
                                   "ratio": 0.5, "allocation": "energy", "cost": "latency", "profile": PROFILE,
                                   "finetune_epochs": 1}}]})
    metrics = apply_recipe(recipe, tmp_path / "run", task=task, price_layers=price_layers).metrics
    assert metrics["structured_allocation"] == "energy" and metrics["mac_reduction"] > 1.5
