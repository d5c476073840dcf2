"""Contract: every registered compression method, on a user model of every construct it may meet
(residual, concat, depthwise, grouped, squeeze-excitation, channel shuffle, CBAM attention, Linear-only), either
compresses it into a deployable model or refuses with a ConfigError that names the key and the fix."""

import pytest
import torch

from automl.compress import METHODS
from automl.configs import parse_config
from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe
from automl.recipe.from_config import start_epoch_for
from automl.validate import Where
from repo_paths import BYOM_MODELS

GRAPH = f"{BYOM_MODELS}:graph"
KINDS = ("residual", "dense", "inverted_residual", "grouped", "se", "shuffle", "attention", "linear")
EPOCHS = 2


def recipe(method: str, kind: str) -> Recipe:
    info = METHODS.get(method)
    config = parse_config(info.config_cls, {}, Where(key=method))
    return Recipe.from_dict({
        "version": 1, "task": "digits", "model": {"builder": GRAPH, "kwargs": {"kind": kind}},
        "train": {"epochs": EPOCHS, "lr": 0.003, "batch_size": 64},
        "stages": [{"method": method, "start_epoch": start_epoch_for(config, EPOCHS), "config": {}}]})


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", [name for name, _ in METHODS.items()])
def test_method_compresses_or_refuses_clearly(method, kind, task, tmp_path):
    try:
        result = apply_recipe(recipe(method, kind), tmp_path, task=task)
    except ConfigError as exc:  # a refusal: one paragraph with the rule and the fix
        assert "Fix:" in str(exc), str(exc)
        return
    m = result.metrics
    assert m["latency_ms"] > 0 and m["size_kb"] > 0 and 0.0 <= m["accuracy"] <= 1.0
    assert result.artifact.path.is_file()
    assert torch.isfinite(result.model(task.example_input(2))).all() if method != "exits" else True
    # what a profile prices the trained artifact as agrees with what it prices the untrained candidate as
    declared = _declared_precision(method)
    assert result.artifact.quant.priced_as == (declared or "fp32"), (result.artifact.quant, declared)


def _declared_precision(method):
    from automl.errors import ProfileError

    info = METHODS.get(method)
    try:
        return info.handler_cls.profile_precision(parse_config(info.config_cls, {}, Where(key=method)))
    except ProfileError as exc:  # fp16: no CPU profile prices it; the artifact says what it is
        return exc.value


@pytest.mark.parametrize("method", [name for name, _ in METHODS.items()])
def test_method_says_what_precision_a_profile_prices_it_at(method):
    """Every method answers Method.profile_precision for its default config: a profile precision, None
    (the stage leaves the precision as it is) or a ProfileError that names the fix; no table elsewhere."""
    from automl.errors import ProfileError
    from automl.hardware.layers import PRECISIONS

    info = METHODS.get(method)
    config = parse_config(info.config_cls, {}, Where(key=method))
    try:
        precision = info.handler_cls.profile_precision(config)
    except ProfileError as exc:
        assert "Fix:" in str(exc), str(exc)
        return
    assert precision is None or precision in PRECISIONS


@pytest.mark.parametrize("method", [name for name, _ in METHODS.items()])
def test_method_builds_its_deployed_shape_or_refuses(method, task):
    """Method.deployed_shape (what a profile prices): a model that still runs the example, or a ConfigError."""
    info = METHODS.get(method)
    config = parse_config(info.config_cls, {}, Where(key=method))
    torch.manual_seed(0)
    model = task.build_model("resnet", {"width": 8, "stages": 2, "blocks": 2}).eval()
    example = task.example_input(2)
    notes = {}
    try:
        shaped = info.handler_cls.deployed_shape(model, example, config, notes)
    except ConfigError as exc:
        assert "Fix:" in str(exc), str(exc)
        return
    with torch.no_grad():
        out = shaped.eval()(example)
    assert out.shape == (2, task.num_classes)
    # the methods that change shapes say what they did; the rest leave the model as it was
    changed = {"structured": "thinned_ratio", "layer": "removed_blocks", "exits": "exit_after",
               "lowrank": "lowrank_layers", "ghost": "ghost_layers"}
    assert set(notes) == ({changed[method]} if method in changed else set())


def test_a_method_that_does_not_say_how_it_deploys_is_refused_at_registration():
    """A new method that forgets its deploy hooks fails before anyone can price or ship it."""
    from dataclasses import dataclass

    from automl.compress.base import KEEPS_PRECISION, KEEPS_SHAPE, Method, register_method

    @dataclass(frozen=True)
    class DummyConfig:
        pass

    class Forgetful(Method):
        pass

    class HalfDeclared(Method):
        profile_precision = KEEPS_PRECISION

    for handler in (Forgetful, HalfDeclared):
        with pytest.raises(TypeError, match="does not say how it deploys: define .*deployed_shape"):
            register_method("dummy_contract", "pruning", DummyConfig)(handler)
    assert "dummy_contract" not in dict(METHODS.items())

    class Declared(Method):
        profile_precision = KEEPS_PRECISION
        deployed_shape = KEEPS_SHAPE

    assert Declared.profile_precision(DummyConfig()) is None


def test_lowrank_prices_the_factorized_model():
    from automl.compress.factorization.method import LowRankConfig
    from automl.modelstats import count_macs
    from automl.tasks import get_task

    task = get_task("digits")
    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 16, "depth": 2}).eval()
    x, notes = task.example_input(1), {}
    config = LowRankConfig(rank_rule="macs", mac_ratio=0.5)
    shaped = METHODS.get("lowrank").handler_cls.deployed_shape(model, x, config, notes)
    assert notes["lowrank_layers"] > 0
    assert count_macs(shaped, x) < 0.8 * count_macs(model, x)
