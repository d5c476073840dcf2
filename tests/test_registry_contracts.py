"""Contracts over every registry entry, parametrized by the registries themselves so a new entry is tested
the day it registers: compression methods (config round trip, lifecycle order; deploy hooks and the
seven-graph run are in tests/compress/test_method_contract.py), architecture families, tasks and schedule
policies. Pruning criteria: tests/compress/pruning/test_structured.py; shipped profiles:
tests/hardware/test_shipped_profile.py."""
import math

import pytest
import torch

from automl.arch import ARCHS
from automl.compress import CATEGORIES, METHODS, ApplyContext
from automl.compress.base import check_stage_combination
from automl.compress.schedule import POLICIES, build_scheduler, parse_schedule, schedule_to_dict
from automl.configs import config_to_dict, parse_config
from automl.errors import ConfigError, LifecycleError
from automl.recipe import Recipe
from automl.runtime import OrtModel, export_onnx
from automl.tasks import TASKS, get_task
from automl.tasks.base import Task
from automl.validate import Where


@pytest.mark.parametrize("method", METHODS.names())
def test_method_config_round_trips(method):
    info = METHODS.get(method)
    config = parse_config(info.config_cls, {}, Where(key=method))
    assert parse_config(info.config_cls, config_to_dict(config), Where(key=method)) == config
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": {"family": "cnn"}, "train": {"epochs": 2},
                               "stages": [{"method": method, "config": config_to_dict(config)}]})
    assert recipe.stages[0].config == config and Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("method", METHODS.names())
def test_method_lifecycle_out_of_order_is_refused(method, task, tmp_path):
    info = METHODS.get(method)
    handler = info.handler_cls(parse_config(info.config_cls, {}, Where(key=method)))
    ctx = ApplyContext(task=task, work_dir=tmp_path, epochs=1)
    model = task.build_model("cnn", {"width": 8, "depth": 2})
    for call in (lambda: handler.finalize(model, ctx), lambda: handler.deploy(None, ctx),
                 lambda: handler.on_epoch_start(model, 0, ctx), lambda: handler.after_step(model)):
        with pytest.raises(LifecycleError, match="the order is prepare"):
            call()
    assert handler.state == "new"


@pytest.mark.parametrize("method", METHODS.names())
def test_method_says_what_it_cannot_share_a_recipe_with(method):
    """Each method owns its incompatibilities; a recipe or space holding such a pair is refused, both ways."""
    info = METHODS.get(method)
    for category, why in info.handler_cls.CANNOT_SHARE.items():
        assert category in CATEGORIES and category != info.category and why
        for other in (n for n, i in METHODS.items() if i.category == category):
            for pair in ([method, other], [other, method]):
                with pytest.raises(ConfigError, match=f"cannot be combined: {why}"):
                    check_stage_combination(pair)


@pytest.mark.parametrize("family", ARCHS.names())
@pytest.mark.parametrize("task_name", TASKS.names())
def test_family_builds_runs_and_exports_with_its_defaults(family, task_name, tmp_path):
    task = get_task(task_name)
    info = ARCHS.get(family)
    params = config_to_dict(parse_config(info.params_cls, {}, Where(key="arch")))
    torch.manual_seed(0)
    model = task.build_model(family, params).eval()
    x = task.example_input(3)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (3, task.num_classes) and torch.isfinite(logits).all()
    artifact = export_onnx(model, task.example_input(1), tmp_path / "m.onnx")
    assert OrtModel(artifact.path)(x.numpy()).shape == (3, task.num_classes)


@pytest.mark.parametrize("task_name", TASKS.names())
def test_task_keeps_the_protocol(task_name):
    task = get_task(task_name)
    assert isinstance(task, Task)
    x, y = next(iter(task.train_loader(batch_size=8, seed=0)))
    assert tuple(x.shape[1:]) == tuple(task.example_input(1).shape[1:]) and x.shape[0] == y.shape[0] == 8
    for loader in (task.val_loader(), task.test_loader()):
        xv, yv = next(iter(loader))
        assert xv.shape[1:] == x.shape[1:] and int(yv.max()) < task.num_classes
    loss = task.loss(torch.zeros(8, task.num_classes), y)
    assert math.isclose(float(loss), math.log(task.num_classes), rel_tol=1e-5)


@pytest.mark.parametrize("policy", POLICIES.names())
def test_policy_round_trips_and_binds(policy, task):
    specs = parse_schedule([{"policy": policy, "start_epoch": 0, "end_epoch": 2}], Where(key="schedule"))
    assert parse_schedule(schedule_to_dict(specs), Where(key="schedule")) == specs
    model = task.build_model("cnn", {"width": 8, "depth": 2})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(specs, model, optimizer, epochs=3)
    scheduler.on_epoch_begin(0)
    loss = scheduler.before_backward(0, 0, torch.tensor(1.0, requires_grad=True))
    assert torch.isfinite(loss)
    scheduler.on_minibatch_end(0, 0)
    scheduler.on_epoch_end(0)
