"""Recipes: YAML round trip, construction from trial configs, validation errors."""
import copy

import pytest

from automl.compress.pruning.magnitude import MagnitudePruningConfig
from automl.compress.quantization.ptq import Int8PTQConfig
from automl.errors import ConfigError, UnknownNameError
from automl.io import load_yaml
from automl.recipe import Recipe, Stage, recipe_from_config
from automl.settings import TrainSettings
from automl.spaces import load_default_space, sample_config


@pytest.fixture(scope="module")
def space():
    return load_default_space()


@pytest.fixture(scope="module")
def configs(space):
    return [sample_config(space, seed) for seed in range(40)]


def base_dict():
    return {
        "version": 1,
        "task": "digits",
        "arch": {"family": "cnn", "width": 16, "depth": 2},
        "train": {"epochs": 4, "lr": 0.01},
        "stages": [
            {"method": "magnitude", "start_epoch": 2, "config": {"ratio": 0.5, "finetune_epochs": 2}},
            {"method": "int8_ptq", "config": {"mode": "dynamic"}},
        ],
    }


def test_base_dict_is_valid():
    recipe = Recipe.from_dict(base_dict(), "r.yaml")
    assert recipe.family == "cnn" and recipe.arch == {"width": 16, "depth": 2}
    assert recipe.train == TrainSettings(epochs=4, lr=0.01)
    assert recipe.stages == (Stage("magnitude", MagnitudePruningConfig(ratio=0.5, finetune_epochs=2), 2),
                             Stage("int8_ptq", Int8PTQConfig(mode="dynamic"), None))
    assert [s.category for s in recipe.stages] == ["pruning", "quantization"]


def test_round_trip_of_sampled_recipes(space, configs, tmp_path):
    for i, cfg in enumerate(configs):
        recipe = recipe_from_config(space, cfg, provenance={"trial": f"t{i}", "seed": i})
        assert Recipe.from_dict(recipe.to_dict()) == recipe
        path = recipe.save(tmp_path / f"r{i}.yaml")
        loaded = Recipe.load(path)
        assert loaded == recipe
        assert loaded.to_dict() == recipe.to_dict()
        assert load_yaml(path) == recipe.to_dict()


def test_round_trip_keeps_metrics_and_string_provenance(tmp_path):
    recipe = Recipe.from_dict({**base_dict(), "metrics": {"accuracy": 0.9, "latency_ms": 0.05},
                               "provenance": {"space_hash": "8e91234567890123", "note": "1e-3"}})
    loaded = Recipe.load(recipe.save(tmp_path / "r.yaml"))
    assert loaded == recipe
    assert loaded.provenance["space_hash"] == "8e91234567890123"
    assert loaded.metrics == {"accuracy": 0.9, "latency_ms": 0.05}


def test_loads_from_text():
    text = ("version: 1\ntask: digits\narch: {family: cnn, width: 8}\n"
            "stages:\n  - {method: magnitude, config: {ratio: 5e-1}}\n")
    recipe = Recipe.loads(text, "inline.yaml")
    assert recipe.stages[0].config.ratio == 0.5
    assert recipe.stages[0].start_epoch is None
    assert recipe.train == TrainSettings()


def test_recipe_from_config_drops_none_and_places_magnitude(space, configs):
    kinds = set()
    for cfg in configs:
        recipe = recipe_from_config(space, cfg)
        methods = [s.method for s in recipe.stages]
        assert "none" not in methods
        expected = [m for m in (cfg["pruning.method"], cfg["quantization.method"]) if m != "none"]
        assert methods == expected
        kinds.add(tuple(methods))
        assert recipe.train.epochs == 12 and recipe.train.batch_size == 32
        assert recipe.train.lr == cfg["train.lr"]
        assert recipe.arch == {k[5:]: v for k, v in cfg.items() if k.startswith("arch.")}
        assert recipe.provenance["space_hash"] == space.hash
        for stage in recipe.stages:
            if stage.method == "magnitude":
                assert stage.config.ratio == cfg["pruning.ratio"]
                assert stage.config.finetune_epochs == 4
                assert stage.start_epoch == 12 - 4
            else:
                assert stage.config == Int8PTQConfig(mode=cfg["quantization.mode"])
                assert stage.start_epoch is None
    assert len(kinds) == 4, kinds  # none/none, magnitude, int8, both


def test_recipe_from_config_start_epoch_never_negative(space):
    cfg = {**sample_config(space, 0), "pruning.method": "magnitude", "pruning.ratio": 0.5,
           "pruning.finetune_epochs": 20}
    recipe = recipe_from_config(space, cfg)
    assert recipe.stages[0].start_epoch == 0


def test_recipe_from_config_rejects_bad_values(space):
    cfg = {**sample_config(space, 0), "pruning.method": "magnitude", "pruning.ratio": 1.5}
    with pytest.raises(ConfigError, match=r"compression\.pruning\.ratio: out of range"):
        recipe_from_config(space, cfg)


def error_of(data, source="bad_recipe.yaml"):
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(data, source)
    return info.value


def test_unknown_stage_method():
    data = base_dict()
    data["stages"][0]["method"] = "magnitud"
    err = error_of(data)
    assert isinstance(err, UnknownNameError)
    msg = str(err)
    assert msg.startswith("bad_recipe.yaml: stages.0.method: unknown compression method")
    assert "(got 'magnitud')" in msg
    assert "did you mean 'magnitude'?" in msg
    assert "valid names: " in msg and "int8_ptq" in msg and "magnitude" in msg


def test_stage_method_not_a_string():
    data = base_dict()
    data["stages"][0]["method"] = ["magnitude"]
    msg = str(error_of(data))
    assert "stages.0.method: expected a string" in msg and "(got ['magnitude'])" in msg


def test_stages_out_of_category_order():
    data = base_dict()
    data["stages"].reverse()
    msg = str(error_of(data))
    assert "stages: stages must follow the category order" in msg
    assert "(got ['int8_ptq', 'magnitude'])" in msg
    assert "order them as regularization -> distillation -> factorization -> pruning -> early_exit -> quantization" in msg


def test_two_stages_of_one_category():
    data = base_dict()
    data["stages"].insert(1, copy.deepcopy(data["stages"][0]))
    msg = str(error_of(data))
    assert "stages.1.method: a recipe has at most one pruning stage" in msg
    assert "(got 'magnitude')" in msg and "merge the two stages" in msg


def test_unknown_key_in_stage_config():
    data = base_dict()
    data["stages"][0]["config"]["ratoi"] = 0.5
    msg = str(error_of(data))
    assert "stages.0.config.ratoi: unknown key" in msg
    assert "(got 'ratoi')" in msg
    assert "did you mean 'ratio'?" in msg


def test_unknown_key_in_stage():
    data = base_dict()
    data["stages"][0]["start"] = 1
    msg = str(error_of(data))
    assert "stages.0.start: unknown key" in msg and "did you mean 'start_epoch'?" in msg


def test_bad_stage_config_value():
    data = base_dict()
    data["stages"][1]["config"]["mode"] = "dynamc"
    msg = str(error_of(data))
    assert "stages.1.config.mode: not one of the allowed values" in msg
    assert "did you mean 'dynamic'?" in msg


def test_start_epoch_type():
    data = base_dict()
    data["stages"][0]["start_epoch"] = 1.5
    assert "stages.0.start_epoch: expected an integer" in str(error_of(data))


@pytest.mark.parametrize("version", [2, 0, "1", True])
def test_bad_version(version):
    data = {**base_dict(), "version": version}
    msg = str(error_of(data))
    assert "version: unsupported recipe version" in msg
    assert f"(got {version!r})" in msg
    assert "use version: 1" in msg


def test_missing_and_unknown_top_level_keys():
    data = base_dict()
    del data["task"]
    assert "task: missing required key" in str(error_of(data))
    data = {**base_dict(), "stagse": []}
    msg = str(error_of(data))
    assert "stagse: unknown key" in msg and "did you mean 'stages'?" in msg


def test_bad_arch_in_recipe():
    data = base_dict()
    data["arch"]["widht"] = 8
    msg = str(error_of(data))
    assert "arch.widht: unknown key" in msg and "did you mean 'width'?" in msg
    data = base_dict()
    data["arch"]["family"] = "resnett"
    err = error_of(data)
    assert isinstance(err, UnknownNameError)
    assert "arch.family: unknown architecture family" in str(err)
    assert "valid names: cnn, mlp, mobilenetv2, resnet" in str(err)


def test_bad_train_in_recipe():
    data = base_dict()
    data["train"]["optimizer"] = "adamw"
    msg = str(error_of(data))
    assert "train.optimizer: not one of the allowed values" in msg and "use one of: adam, sgd" in msg


def test_load_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\ntask: digits\narch: {family: cnn}\nstages:\n  - method: prune\n")
    with pytest.raises(UnknownNameError) as info:
        Recipe.load(path)
    assert str(info.value).startswith(f"{path}: stages.0.method: unknown compression method")


@pytest.mark.parametrize("start", [99, -3, 5])
def test_start_epoch_outside_training_is_refused(start):
    data = base_dict()
    data["stages"][0]["start_epoch"] = start
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(data, "r.yaml")
    text = str(info.value)
    assert "r.yaml" in text and "stages.0.start_epoch" in text and str(start) in text and "0..4" in text


def test_start_epoch_at_the_bounds_is_kept():
    for start in (0, 4):
        data = base_dict()
        data["stages"][0]["start_epoch"] = start
        assert Recipe.from_dict(data, "r.yaml").stages[0].start_epoch == start
