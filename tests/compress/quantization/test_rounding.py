"""Learned rounding (AdaRound, GPTQ): the weights land on the layer's grid next to the float weight, the
layer outputs come closer to float than with nearest rounding, a rounding that agrees less with the float
model is given back, and both are options of qat and mixed from a recipe."""
import copy

import pytest
import torch
import torch.nn as nn

from automl.compress.quantization.adaround import AdaRoundSettings, adaround_layer
from automl.compress.quantization.gptq import gptq_layer
from automl.compress.quantization.qat import prepare_qat, qat_layers
from automl.compress.quantization.rounding import (agreement, float_predictions, float_weights, layer_inputs,
                                                   nearest, round_model, rounded_if_better)
from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe


def fast_adaround(layer, x_float, x_in, seed=0):
    return adaround_layer(layer, x_float, x_in, seed, AdaRoundSettings(iterations=200))


ROUNDINGS = {"adaround": fast_adaround, "gptq": gptq_layer}


@pytest.fixture(scope="module")
def trained(trained_cnn):
    return trained_cnn


def _batches(task, n, seed=0):
    return [x for x, _ in task.train_loader(64, seed)][:n]


def _prepared(model, task, bits):
    plan = {"re:.*": (bits, 8)}
    return prepare_qat(copy.deepcopy(model), plan, "lsq", True, batches=_batches(task, 4))


@pytest.mark.parametrize("rounding", sorted(ROUNDINGS))
def test_rounded_weights_sit_on_the_grid_next_to_the_float_weight(trained, task, rounding):
    model = _prepared(trained, task, 3)
    floats = float_weights(model)
    report = round_model(model, _batches(task, 4, seed=1), ROUNDINGS[rounding])
    assert set(report) == set(floats)
    for name, layer in qat_layers(model).items():
        step = layer.weight_quant.qparams()[0].reshape(-1, *([1] * (floats[name].dim() - 1)))
        levels = layer.layer.weight.detach() / step
        assert torch.allclose(levels, levels.round(), atol=1e-4), name
        # the LSQ quantizer reproduces the rounded weight, so what ships is what the rounding chose
        assert torch.allclose(layer.weight_quant(layer.layer.weight).detach(), layer.layer.weight.detach(),
                              rtol=1e-6, atol=0)
        if rounding == "adaround":  # AdaRound picks the grid point just below or just above (or the clip)
            low = torch.floor(floats[name] / step).clamp(-layer.weight_quant.qn, layer.weight_quant.qp)
            assert bool(((levels.round() - low) >= 0).all() and ((levels.round() - low) <= 1).all()), name
    if rounding == "adaround":  # fitted to the float model's outputs (GPTQ fits W x~, see below)
        assert sum(r["error"] for r in report.values()) < sum(r["error_nearest"] for r in report.values())


@pytest.mark.parametrize("rounding", sorted(ROUNDINGS))
def test_rounding_is_kept_only_where_it_agrees_with_float_at_least_as_often(trained, task, rounding):
    model = _prepared(trained, task, 2)
    reference = float_predictions(model, task.val_loader(), float_weights(model))
    nearest = agreement(model, task.val_loader(), reference)
    stats = rounded_if_better(model, _batches(task, 8, seed=1), task.val_loader(), ROUNDINGS[rounding], rounding)
    assert stats["nearest_agreement"] == pytest.approx(nearest) and stats["rounding"] == rounding
    assert agreement(model, task.val_loader(), reference) == pytest.approx(max(stats["rounding_agreement"], nearest))
    assert stats["rounding_kept"] == float(stats["rounding_agreement"] >= nearest)


def test_a_rounding_that_agrees_less_is_given_back(trained, task):
    def harmful(layer, x_float, x_in, seed):  # every weight on the wrong side, as a bad optimum would be
        return -layer.weight_quant(layer.layer.weight)

    model = _prepared(trained, task, 4)
    floats = float_weights(model)
    stats = rounded_if_better(model, _batches(task, 2), task.val_loader(), harmful, "harmful")
    assert stats["rounding_kept"] == 0.0 and stats["rounding_agreement"] < stats["nearest_agreement"]
    for name, weight in float_weights(model).items():
        assert torch.equal(weight, floats[name]), name


def test_gptq_lowers_each_layers_error_on_its_own_inputs(trained, task):
    """GPTQ's objective: || W x~ - Q x~ || with x~ the layer's (quantized) input, lower than nearest's."""
    model = _prepared(trained, task, 2)
    floats = float_weights(model)
    totals = {"nearest": 0.0, "gptq": 0.0}
    for name, layer in qat_layers(model).items():
        x_float, x_in = layer_inputs(model, layer, _batches(task, 4, seed=1), floats)
        with torch.no_grad():
            exact = layer._compute(x_in, layer.layer.weight)
            error = {k: float((layer._compute(x_in, w) - exact).pow(2).mean())
                     for k, w in (("nearest", nearest(layer)), ("gptq", gptq_layer(layer, x_float, x_in)))}
        assert error["gptq"] < error["nearest"], (name, error)  # the 9-column first layer has little room
        totals = {k: totals[k] + error[k] for k in totals}
    assert totals["gptq"] < 0.5 * totals["nearest"]


def test_gptq_solves_grouped_and_depthwise_convolutions_per_group(task):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    prepare_qat(model, {"re:.*": (3, 8)}, "lsq", True, batches=_batches(task, 2))
    floats = float_weights(model)
    for name, layer in qat_layers(model).items():
        x_float, x_in = layer_inputs(model, layer, _batches(task, 2, seed=1), floats)
        rounded = gptq_layer(layer, x_float, x_in)
        step = layer.weight_quant.qparams()[0].reshape(-1, *([1] * (rounded.dim() - 1)))
        assert torch.allclose(rounded / step, (rounded / step).round(), atol=1e-4), name
        with torch.no_grad():
            exact = layer._compute(x_in, layer.layer.weight)
            assert (layer._compute(x_in, rounded) - exact).pow(2).mean() < (
                layer._compute(x_in, nearest(layer)) - exact).pow(2).mean(), name


@pytest.mark.slow
@pytest.mark.parametrize("rounding", ["adaround", "gptq"])
def test_learned_rounding_rescues_a_two_bit_cnn(task, rounding):
    """The bench's digits CNN (12 epochs): nearest rounding at w2a8 (first and last layer 8 bits) loses
    points; a learned rounding wins at least one back."""
    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 32, "depth": 3, "kernel": 3, "pooling": "stride"})
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    for epoch in range(12):
        task.train_epoch(model, opt, task.train_loader(32, epoch))
    model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    plan = {n: (8 if n in (names[0], names[-1]) else 2, 8) for n in names}
    scores = {}
    for name in ("nearest", rounding):
        q = prepare_qat(copy.deepcopy(model), plan, "lsq", True, batches=_batches(task, 4))
        if name != "nearest":
            round_model(q, _batches(task, 8, seed=1), ROUNDINGS[rounding])
        scores[name] = task.evaluate(q.eval(), task.test_loader())
    assert scores[rounding] >= scores["nearest"] + 0.01


RECIPE = """version: 1
task: digits
arch: {family: cnn, width: 8, depth: 2}
train: {epochs: 2, lr: 0.01, batch_size: 32}
stages:
  - method: %s
    config: %s
"""


@pytest.mark.parametrize("rounding", ["adaround", "gptq"])
def test_qat_with_a_learned_rounding_from_a_recipe_reports_it(task, tmp_path, rounding):
    config = f"{{w_bits: 3, a_bits: 8, finetune_epochs: 0, rounding: {rounding}, rounding_iterations: 50}}"
    result = apply_recipe(Recipe.loads(RECIPE % ("qat", config)), tmp_path, task=task)
    m = result.metrics
    assert m["rounding"] == rounding and m["rounding_layers"] == m["quant_layers"] > 0
    assert 0 < m["rounding_flipped"] < 0.5 and m["rounding_error_ratio"] <= 1.0
    assert m["rounding_kept"] in (0.0, 1.0) and 0 < m["nearest_agreement"] <= 1
    assert result.artifact.shipped is not None and result.artifact.shipped.is_file()


def test_mixed_accepts_a_learned_rounding_and_round_trips_it():
    config = "{target_bits: 4, finetune_epochs: 0, rounding: gptq, rounding_batches: 2}"
    recipe = Recipe.loads(RECIPE % ("mixed", config))
    again = Recipe.from_dict(recipe.to_dict())
    assert again.stages[0].config.rounding == "gptq" and again.stages[0].config.rounding_batches == 2


def test_a_learned_rounding_needs_the_lsq_grid(task, tmp_path):
    config = "{w_bits: 4, quantizer: pact, finetune_epochs: 0, rounding: adaround}"
    with pytest.raises(ConfigError) as err:
        apply_recipe(Recipe.loads(RECIPE % ("qat", config)), tmp_path, task=task)
    assert err.value.key == "rounding" and "quantizer: lsq" in str(err.value)
