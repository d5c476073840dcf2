"""Bring your own model: builders, checkpoints (weights_only), sha256, structure round trips, zero-epoch recipes."""
import dataclasses

import pytest
import torch

import automl
from automl.arch.structure import apply_structure, structure_of
from automl.arch.user import build_user_model, file_sha256, parse_model_source
from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe
from automl.recipe.saved import apply_to_dir
from automl.validate import Where
from repo_paths import BYOM_MODELS

BUILDER = f"{BYOM_MODELS}:build"
HERE = Where("space.yaml", "model")


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    """The user's side: their model trained for 3 epochs on digits, saved as a state_dict."""
    torch.manual_seed(0)
    model = build_user_model(parse_model_source({"builder": BUILDER}, HERE))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(3):
        task.train_epoch(model, optimizer, task.train_loader(batch_size=32, seed=epoch))
    path = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    torch.save(model.state_dict(), path)
    return path, task.evaluate(model, task.val_loader())


def source(**extra):
    return parse_model_source({"builder": BUILDER, **extra}, HERE)


def test_builder_and_checkpoint_load_the_trained_weights(trained, task):
    path, accuracy = trained
    model = build_user_model(source(checkpoint=str(path)))
    assert task.evaluate(model, task.val_loader()) == pytest.approx(accuracy)
    assert source(checkpoint=str(path)).to_dict()["sha256"] == file_sha256(path)


def test_a_training_checkpoint_with_a_nested_state_dict_and_module_prefix_loads(trained, tmp_path, task):
    path, accuracy = trained
    state = {f"module.{k}": v for k, v in torch.load(path, weights_only=True).items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pt")
    model = build_user_model(source(checkpoint=str(tmp_path / "ckpt.pt")))
    assert task.evaluate(model, task.val_loader()) == pytest.approx(accuracy)


def test_a_checkpoint_without_batchnorm_counters_loads(trained, tmp_path, task):
    """Older checkpoints (torchvision's published weights among them) lack num_batches_tracked."""
    path, accuracy = trained
    state = {k: v for k, v in torch.load(path, weights_only=True).items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(torch.load(path, weights_only=True))  # the test model has BatchNorm
    torch.save(state, tmp_path / "old.pt")
    model = build_user_model(source(checkpoint=str(tmp_path / "old.pt")))
    assert task.evaluate(model, task.val_loader()) == pytest.approx(accuracy)


@pytest.mark.parametrize("data, words", [
    ({"builder": "no_such_module_xyz:build"}, "cannot import the builder's module"),
    ({"builder": "build"}, "package.module:function"),
    ({"builder": f"{BYOM_MODELS}:nothing"}, "has no callable 'nothing'"),
    ({"builder": f"{BYOM_MODELS}:not_a_model"}, "must return a torch.nn.Module"),
    ({"builder": BUILDER, "kwargs": {"depth": 3}}, "the builder raised TypeError"),
    ({"builder": BUILDER, "checkpoint": "missing.pt"}, "checkpoint not found"),
    ({"builder": BUILDER, "extra": 1}, "unknown key"),
])
def test_model_source_errors_name_the_key_and_the_fix(data, words):
    with pytest.raises(ConfigError, match=words) as info:
        build_user_model(parse_model_source(data, HERE))
    assert "space.yaml: model" in str(info.value) and "Fix:" in str(info.value)


def test_a_checkpoint_of_another_shape_names_the_first_parameter(trained, tmp_path):
    path, _ = trained
    with pytest.raises(ConfigError, match=r"parameter 'conv1.weight' has shape \(16, 1, 3, 3\) in the checkpoint "
                                          r"but \(8, 1, 3, 3\)"):
        build_user_model(parse_model_source({"builder": BUILDER, "kwargs": {"width": 8}, "checkpoint": str(path)},
                                            HERE))
    state = torch.load(path, weights_only=True)
    state.pop("head.bias")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match="has no 'head.bias'"):
        build_user_model(source(checkpoint=str(tmp_path / "partial.pt")))


def test_a_pickled_model_object_is_never_unpickled(tmp_path):
    torch.save(build_user_model(source()), tmp_path / "whole.pt")  # a full pickle could run code
    with pytest.raises(ConfigError, match="weights_only=True.: it holds pickled Python objects") as info:
        build_user_model(source(checkpoint=str(tmp_path / "whole.pt")))
    assert "\x1b[" not in str(info.value)  # torch's terminal colours are stripped
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="it is not a file written by torch.save"):
        build_user_model(source(checkpoint=str(tmp_path / "notes.pt")))


def test_a_changed_checkpoint_is_refused(trained, tmp_path):
    path, _ = trained
    copy = tmp_path / "w.pt"
    copy.write_bytes(path.read_bytes())
    recorded = source(checkpoint=str(copy)).to_dict()
    state = torch.load(copy, weights_only=True)
    state["head.bias"] += 1
    torch.save(state, copy)
    with pytest.raises(ConfigError, match="checkpoint changed"):
        build_user_model(parse_model_source(recorded, HERE))


def test_structure_round_trip_rebuilds_thinned_and_replaced_layers():
    torch.manual_seed(0)
    model = build_user_model(source()).eval()
    model.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
    model.side = torch.nn.Sequential(torch.nn.Conv2d(16, 4, 1), torch.nn.Conv2d(4, 16, 1))  # low-rank style
    state = model.state_dict()
    fresh = apply_structure(build_user_model(source()), structure_of(model), state)
    fresh.load_state_dict(state)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(fresh.eval()(x), model(x))


def recipe_for(path, stages, epochs=0):
    return Recipe.from_dict({"version": 1, "task": "digits", "model": {"builder": BUILDER, "checkpoint": str(path)},
                             "train": {"epochs": epochs, "lr": 0.001}, "stages": stages})


def test_zero_epoch_int8_recipe_quantizes_the_trained_model(trained, tmp_path):
    path, accuracy = trained
    result = apply_recipe(recipe_for(path, [{"method": "int8_ptq", "config": {"mode": "static"}}]), tmp_path)
    assert result.metrics["precision"] == "int8_static"
    assert result.metrics["torch_accuracy"] == pytest.approx(accuracy)  # no training happened
    assert result.metrics["accuracy"] >= accuracy - 0.03


@pytest.mark.slow
def test_thinned_model_loads_back_into_the_users_class(trained, tmp_path, task):
    path, _ = trained
    stages = [{"method": "structured", "start_epoch": 0,
               "config": {"mac_reduction": 1.5, "round_to": 4, "finetune_epochs": 1}}]
    result, metrics = apply_to_dir(recipe_for(path, stages, epochs=1), tmp_path / "out")
    assert metrics["thinned_params"] < metrics["dense_params"]
    loaded = automl.load(tmp_path / "out")
    assert type(loaded).__name__ == "Tiny"
    assert sum(p.numel() for p in loaded.parameters()) == metrics["params"]
    x = task.example_input(8)
    torch.testing.assert_close(loaded(x), result.model.eval()(x))
    assert (tmp_path / "out" / "model.pt2").is_file() and "torch_export_error" not in metrics
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    torch.testing.assert_close(program(x), loaded(x), rtol=1e-4, atol=1e-4)
    # an apply directory is also a checkpoint: the thinned model as a search's starting point
    again = build_user_model(source(checkpoint=str(tmp_path / "out")))
    torch.testing.assert_close(again.eval()(x), loaded(x))


def test_recipe_round_trip_keeps_the_model_source(trained):
    path, _ = trained
    recipe = recipe_for(path, [])
    again = Recipe.from_dict(recipe.to_dict())
    assert again.model.builder == BUILDER and again.model.sha256 == file_sha256(path)
    assert again.family == "" and again.arch == {}


@pytest.mark.parametrize("data, words", [
    ({"version": 1, "task": "digits", "arch": {"family": "cnn"}, "model": {"builder": BUILDER}}, "exactly one of"),
    ({"version": 1, "model": {"builder": BUILDER}}, "add 'task:'"),
    ({"version": 1, "task": "digits", "data": {"path": "x.npz"}, "model": {"builder": BUILDER}}, "either 'task:' or"),
])
def test_recipe_source_errors(data, words):
    with pytest.raises(ConfigError, match=words):
        Recipe.from_dict(data, "r.yaml")


def test_kd_self_teacher_of_a_user_model_is_the_trained_checkpoint(trained, tmp_path):
    from automl.compress import ApplyContext
    from automl.recipe.teacher import load_teacher
    from automl.tasks import get_task

    path, accuracy = trained
    recipe = recipe_for(path, [{"method": "kd", "config": {}}], epochs=1)
    task = get_task("digits")
    teacher = load_teacher("self", ApplyContext(task=task, work_dir=tmp_path, epochs=1, recipe=recipe))
    assert task.evaluate(teacher, task.val_loader()) == pytest.approx(accuracy)  # trained, not retrained
    assert not any(p.requires_grad for p in teacher.parameters())
    assert dataclasses.is_dataclass(recipe.model)


def test_kd_self_teacher_of_a_user_model_without_checkpoint_is_trained_first(tmp_path):
    from automl.compress import ApplyContext
    from automl.recipe.teacher import load_teacher
    from automl.tasks import get_task

    recipe = Recipe.from_dict({"version": 1, "task": "digits", "model": {"builder": BUILDER},
                               "train": {"epochs": 2, "lr": 0.01}, "stages": [{"method": "kd", "config": {}}]})
    task = get_task("digits")
    teacher = load_teacher("self", ApplyContext(task=task, work_dir=tmp_path, epochs=2, recipe=recipe,
                                                cache_dir=tmp_path / "cache"))
    assert task.evaluate(teacher, task.val_loader()) > 0.5  # trained, not the random initialisation


@pytest.mark.slow
def test_an_early_exit_model_is_loaded_from_its_deployed_files_not_as_a_module(tmp_path):
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": {"family": "cnn", "width": 8, "depth": 2},
                               "train": {"epochs": 1}, "stages": [{"method": "exits", "config": {"exits": 1}}]})
    apply_to_dir(recipe, tmp_path / "ee")
    with pytest.raises(ConfigError, match="EarlyExitRunner"):
        automl.load(tmp_path / "ee")
