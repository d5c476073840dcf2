"""Optimal Brain Damage: the diagonal Fisher, the saliency, the structured criterion and the `obd` method."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.compress import ApplyContext, get_method
from automl.compress.pruning.criteria import obd
from automl.compress.pruning.fisher import diagonal_fisher, obd_saliency
from automl.configs import parse_config
from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe
from automl.tasks.base import TensorClassificationTask
from automl.validate import Where


def dead_input_task(n=96):
    """4 features, the first always zero: the weights reading it never change the loss."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    x[:, 0] = 0
    y = (x[:, 1] > 0).long()
    return TensorClassificationTask(x, y, x, y, x, y)


def test_fisher_is_the_mean_squared_gradient_of_batches():
    task, model = dead_input_task(), nn.Linear(4, 2)
    fisher = diagonal_fisher(model, task, dict(model.named_parameters()), batches=3, batch_size=32)
    assert model.weight.grad is None and model.training  # nothing left for the optimizer, mode restored
    expected = torch.zeros_like(model.weight)
    for x, y in list(task.train_loader(batch_size=32, seed=0))[:3]:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        expected += model.weight.grad ** 2 / 3
    assert torch.allclose(fisher["weight"], expected)
    assert (fisher["weight"][:, 0] == 0).all() and (fisher["weight"][:, 1:] > 0).all()


def test_saliency_ranks_pruned_weights_below_unused_ones():
    w, fisher = torch.tensor([0.0, 5.0, 0.1, 1.0]), torch.tensor([1.0, 0.0, 2.0, 2.0])
    s = obd_saliency(w, fisher)
    assert s[0] == 0 and 0 < s[1] < s[2] < s[3] and s[3] == pytest.approx(1.0)
    assert obd(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[2.0, 1.0], [1.0, 9.0]])).tolist() == [3.0, 4.5]
    with pytest.raises(ConfigError, match="grouped the same way"):
        obd(torch.ones(2, 3), torch.ones(3, 2))


def test_obd_prunes_large_weights_the_loss_does_not_feel():
    """Magnitude keeps the large weights reading the dead input; OBD removes them first."""
    task = dead_input_task()
    masks = {}
    for name in ("magnitude", "obd"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 2))
        with torch.no_grad():
            model[0].weight[:, 0] = 3.0  # the largest weights, on the dead input
        info = get_method(name)
        handler = info.handler_cls(parse_config(info.config_cls, {"ratio": 0.25, "finetune_epochs": 0}, Where(key=name)))
        handler.prepare(model, ApplyContext(task=task, work_dir=".", epochs=1))
        handler.on_epoch_start(model, 0, None)
        masks[name] = handler.masks.masks()["0"]
    assert masks["magnitude"][:, 0].all() and not masks["obd"][:, 0].any()
    assert int((~masks["obd"]).sum()) == 2  # exactly the ratio


@pytest.mark.parametrize("stage", [{"method": "obd", "start_epoch": 2, "config": {"ratio": 0.8, "finetune_epochs": 1}},
                                   {"method": "structured", "start_epoch": 2,
                                    "config": {"ratio": 0.5, "criterion": "obd", "finetune_epochs": 1}}])
def test_obd_through_apply(task, tmp_path, stage):
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": {"family": "cnn", "width": 16, "depth": 2},
                               "train": {"epochs": 3, "lr": 0.005, "seed": 0}, "stages": [stage]})
    m = apply_recipe(recipe, tmp_path, task=task).metrics
    if stage["method"] == "obd":
        assert m["pruned_sparsity"] == pytest.approx(0.8, abs=1e-3)
    else:
        assert m["params"] < 0.6 * 5178  # half the filters thinned away
    assert m["accuracy"] > 0.5
