"""AdaRound: learned rounding lands on the layer's grid, beats nearest rounding on the layer outputs and on
accuracy at 2 bits, and is an option of qat and mixed from a recipe."""
import copy

import pytest
import torch

from automl.compress.quantization.adaround import AdaRoundSettings, adaround, adaround_if_better, agreement
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


def test_rounding_that_agrees_less_with_float_is_given_back(trained, task):
    """On this small CNN at 2 bits everywhere AdaRound lowers every layer's output error and still agrees
    with the float model less often; the guard then restores nearest rounding."""
    model = _prepared(trained, task, 2)
    nearest = agreement(model, task.val_loader())
    stats = adaround_if_better(model, _batches(task, 8, seed=1), task.val_loader(), AdaRoundSettings(iterations=300))
    assert stats["nearest_agreement"] == pytest.approx(nearest)
    assert stats["adaround_error_ratio"] < 0.8
    final = agreement(model, task.val_loader())
    assert final == pytest.approx(max(stats["adaround_agreement"], nearest))
    assert stats["adaround_kept"] == float(stats["adaround_agreement"] >= nearest)


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
