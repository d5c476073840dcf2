"""data_free with calibration: synthetic -- int8 activation ranges from inputs generated to match the
model's BatchNorm statistics, no training data read."""
import pytest
import torch
import torch.nn as nn

from automl.compress.quantization import int8_methods
from automl.compress.quantization.synthetic import bn_matching_inputs
from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe


def _mismatch(model, batch):
    """Sum over BatchNorm layers of the squared gap between the batch's statistics and the running ones."""
    gaps = []

    def hook(m, inputs, _):
        a = inputs[0]
        dims = [0] + list(range(2, a.dim()))
        gaps.append(float((a.mean(dims) - m.running_mean).pow(2).mean() + (a.var(dims, unbiased=False)
                                                                             - m.running_var).pow(2).mean()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()(batch)
    for h in handles:
        h.remove()
    return sum(gaps)


def _trained_like():
    """Running statistics left by 'real' data: sparse bright strokes, unlike Gaussian noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    real = (torch.rand(512, 1, 8, 8) > 0.8).float() * 4.0 - 0.5
    for bn in (model[1], model[4]):
        bn.momentum = None  # cumulative average: the exact statistics of ``real``
    with torch.no_grad():
        model.train()(real)
    return model


def test_generated_inputs_match_the_batchnorm_statistics():
    model = _trained_like()
    noise = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    batches = bn_matching_inputs(model, noise[:2], batches=2, batch_size=16, steps=300)
    assert [tuple(b.shape) for b in batches] == [(16, 1, 8, 8)] * 2
    assert _mismatch(model, torch.cat(batches)) < 0.1 * _mismatch(model, noise)
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(ConfigError, match="BatchNorm.*calibration: data"):
        bn_matching_inputs(nn.Sequential(nn.Linear(4, 2)), torch.zeros(2, 4), batches=1)


def test_data_free_int8_reads_no_training_batch_to_calibrate(task, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("calibration read training data")

    monkeypatch.setattr(int8_methods, "calibration_batches", refuse)
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": {"family": "cnn", "width": 16, "depth": 2},
                               "train": {"epochs": 3, "lr": 0.005, "seed": 0},
                               "stages": [{"method": "data_free",
                                           "config": {"calibration": "synthetic", "synthetic_steps": 50}}]})
    result = apply_recipe(recipe, tmp_path, task=task)
    assert result.metrics["precision"] == "int8_datafree" and "synthetic" in result.artifact.notes["activations"]
    assert result.metrics["int8_parity"] >= 0.95 and result.metrics["accuracy"] > 0.8
