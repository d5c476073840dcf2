"""AdaRound: learned rounding lands on the layer's grid, beats nearest rounding on the layer outputs and on
accuracy at 2 bits, and is an option of qat and mixed from a recipe."""
import copy

import pytest
import torch

from automl.compress.quantization.adaround import (AdaRoundSettings, adaround, adaround_if_better, agreement,
                                                  float_predictions, float_weights)
from automl.compress.quantization.qat import prepare_qat, qat_layers
from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe

FAST = AdaRoundSettings(iterations=200)


@pytest.fixture(scope="module")
def trained(task):
    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 16, "depth": 2})
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for epoch in range(4):
        task.train_epoch(model, opt, task.train_loader(32, epoch))
    return model.eval()


def _batches(task, n, seed=0):
    return [x for x, _ in task.train_loader(64, seed)][:n]


def _prepared(model, task, bits):
    plan = {"re:.*": (bits, 8)}
    return prepare_qat(copy.deepcopy(model), plan, "lsq", True, batches=_batches(task, 4))


def test_rounded_weights_sit_on_the_grid_next_to_the_float_weight(trained, task):
    model = _prepared(trained, task, 3)
    floats = {n: l.layer.weight.detach().clone() for n, l in qat_layers(model).items()}
    report = adaround(model, _batches(task, 4, seed=1), FAST)
    assert set(report) == set(floats)
    for name, layer in qat_layers(model).items():
        step = layer.weight_quant.qparams()[0].reshape(-1, *([1] * (floats[name].dim() - 1)))
        levels = layer.layer.weight.detach() / step
        assert torch.allclose(levels, levels.round(), atol=1e-4), name
        # each weight went to the grid point just below or just above its float value (or the clip)
        low = torch.floor(floats[name] / step).clamp(-layer.weight_quant.qn, layer.weight_quant.qp)
        assert bool(((levels.round() - low) >= 0).all() and ((levels.round() - low) <= 1).all()), name
        # the LSQ quantizer reproduces the rounded weight, so what ships is what AdaRound chose
        assert torch.allclose(layer.weight_quant(layer.layer.weight).detach(), layer.layer.weight.detach())
        assert report[name]["error"] <= report[name]["error_nearest"] * 1.05 + 1e-9, name


def test_adaround_is_kept_only_where_it_agrees_with_float_at_least_as_often(trained, task):
    model = _prepared(trained, task, 2)
    reference = float_predictions(model, task.val_loader(), float_weights(model))
    nearest = agreement(model, task.val_loader(), reference)
    stats = adaround_if_better(model, _batches(task, 8, seed=1), task.val_loader(), AdaRoundSettings(iterations=300))
    assert stats["nearest_agreement"] == pytest.approx(nearest)
    assert stats["adaround_error_ratio"] < 0.8
    final = agreement(model, task.val_loader(), reference)
    assert final == pytest.approx(max(stats["adaround_agreement"], nearest))
    assert stats["adaround_kept"] == float(stats["adaround_agreement"] >= nearest)


def test_a_rounding_that_agrees_less_is_given_back(trained, task, monkeypatch):
    from automl.compress.quantization import adaround as module

    def harmful(model, batches, settings, floats):  # every weight rounded the wrong way, as a bad optimum would
        for layer in qat_layers(model).values():
            with torch.no_grad():
                layer.layer.weight.copy_(-layer.weight_quant(layer.layer.weight))
        return {n: {"flipped": 1.0, "error": 2.0, "error_nearest": 1.0} for n in qat_layers(model)}

    model = _prepared(trained, task, 4)
    floats = {n: w.clone() for n, w in float_weights(model).items()}
    monkeypatch.setattr(module, "adaround", harmful)
    stats = module.adaround_if_better(model, [], task.val_loader())
    assert stats["adaround_kept"] == 0.0 and stats["adaround_agreement"] < stats["nearest_agreement"]
    for name, weight in float_weights(model).items():
        assert torch.equal(weight, floats[name]), name


@pytest.mark.slow
def test_adaround_rescues_a_two_bit_cnn(task):
    """The bench's digits CNN (12 epochs): nearest rounding at w2a8 (first and last layer 8 bits) loses
    about 3 points; AdaRound recovers most of them."""
    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 32, "depth": 3, "kernel": 3, "pooling": "stride"})
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    for epoch in range(12):
        task.train_epoch(model, opt, task.train_loader(32, epoch))
    model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    plan = {n: (8 if n in (names[0], names[-1]) else 2, 8) for n in names}
    scores = {}
    for rounding in ("nearest", "adaround"):
        q = prepare_qat(copy.deepcopy(model), plan, "lsq", True, batches=_batches(task, 4))
        if rounding == "adaround":
            adaround(q, _batches(task, 8, seed=1), AdaRoundSettings(iterations=500))
        scores[rounding] = task.evaluate(q.eval(), task.test_loader())
    assert scores["adaround"] >= scores["nearest"] + 0.01


RECIPE = """version: 1
task: digits
arch: {family: cnn, width: 8, depth: 2}
train: {epochs: 2, lr: 0.01, batch_size: 32}
stages:
  - method: %s
    config: %s
"""


def test_qat_with_adaround_from_a_recipe_reports_its_rounding(task, tmp_path):
    config = "{w_bits: 3, a_bits: 8, finetune_epochs: 0, rounding: adaround, rounding_iterations: 50}"
    result = apply_recipe(Recipe.loads(RECIPE % ("qat", config)), tmp_path, task=task)
    m = result.metrics
    assert m["adaround_layers"] == m["quant_layers"] > 0
    assert 0 < m["adaround_flipped"] < 0.5 and m["adaround_error_ratio"] <= 1.0
    assert m["adaround_kept"] in (0.0, 1.0) and 0 < m["nearest_agreement"] <= 1
    assert result.artifact.shipped is not None and result.artifact.shipped.is_file()


def test_mixed_accepts_adaround_and_round_trips_it(tmp_path):
    config = "{target_bits: 4, finetune_epochs: 0, rounding: adaround, rounding_batches: 2}"
    recipe = Recipe.loads(RECIPE % ("mixed", config))
    again = Recipe.from_dict(recipe.to_dict())
    assert again.stages[0].config.rounding == "adaround" and again.stages[0].config.rounding_batches == 2


def test_adaround_needs_the_lsq_grid(task, tmp_path):
    config = "{w_bits: 4, quantizer: pact, finetune_epochs: 0, rounding: adaround}"
    with pytest.raises(ConfigError) as err:
        apply_recipe(Recipe.loads(RECIPE % ("qat", config)), tmp_path, task=task)
    assert err.value.key == "rounding" and "quantizer: lsq" in str(err.value)
