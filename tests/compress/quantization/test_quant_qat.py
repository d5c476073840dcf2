"""QAT: layer selection, wrapping, calibration, training the digits CNN at 4 bits, conversion."""
import copy

import pytest
import torch
import torch.nn as nn

from automl.compress.quantization.fake_quant import LSQQuantizer, PACTQuantizer, STEQuantizer
from automl.compress.quantization.qat import (QuantLayer, calibrate_qat, convert_qat, prepare_qat, qat_layers,
                                              quantizer_parameters, resolve_layer_bits)
from automl.errors import ConfigError, LifecycleError, UnknownNameError


@pytest.fixture(scope="module")
def trained(trained_cnn):
    return trained_cnn


def _batches(task, n=4):
    return [x for x, _ in task.train_loader(64, 0)][:n]


def _tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_exact_names_beat_patterns_and_the_last_pattern_wins():
    model = _tiny()
    plan = resolve_layer_bits(model, {"3": (8, 8), "re:.*": (4, 4), "re:[03]": (2, None)})
    assert plan == {"0": (2, None), "3": (8, 8)}


def test_pattern_matching_nothing_raises_with_nearest_names():
    with pytest.raises(UnknownNameError) as err:
        prepare_qat(_tiny(), {"re:conv.*": (4, 4)})
    assert "re:conv.*" in str(err.value) and "nearest layer names" in str(err.value)


@pytest.mark.parametrize("layer_bits, key", [({"0": (1, 8)}, "layer_bits.0.weight"),
                                             ({"0": (4, 12)}, "layer_bits.0.activation"),
                                             ({"0": 4}, "layer_bits.0"), ({}, "layer_bits")])
def test_bad_layer_bits_name_the_key(layer_bits, key):
    with pytest.raises(ConfigError) as err:
        prepare_qat(_tiny(), layer_bits)
    assert err.value.key == key


def test_unknown_method_and_double_prepare():
    with pytest.raises(UnknownNameError, match="did you mean 'lsq'"):
        prepare_qat(_tiny(), {"0": (4, 4)}, method="lqs")
    with pytest.raises(UnknownNameError) as err:
        prepare_qat(_tiny(), {"0": (4, 4)}, act_observer="percentil")
    assert err.value.key == "act_observer" and "did you mean 'percentile'" in str(err.value)
    model = prepare_qat(_tiny(), {"0": (4, 4)})
    with pytest.raises(ConfigError, match="already prepared"):
        prepare_qat(model, {"3": (4, 4)})


@pytest.mark.parametrize("method, wtype, atype", [("lsq", LSQQuantizer, LSQQuantizer),
                                                  ("pact", STEQuantizer, PACTQuantizer),
                                                  ("ste", STEQuantizer, STEQuantizer)])
def test_prepare_wraps_selected_layers_with_the_method_quantizers(method, wtype, atype):
    model = prepare_qat(_tiny(), {"0": (4, 8), "3": (8, None)}, method=method)
    layers = qat_layers(model)
    assert list(layers) == ["0", "3"]
    assert isinstance(layers["0"].weight_quant, wtype) and isinstance(layers["0"].act_quant, atype)
    assert layers["3"].act_quant is None  # None keeps that input in float
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_calibration_sets_the_input_sign_from_the_data(task, trained):
    model = prepare_qat(copy.deepcopy(trained), {"re:.*": (4, 4)}, batches=_batches(task))
    layers = qat_layers(model)
    assert layers["features.0"].act_quant.signed  # standardised pixels are negative too
    assert not layers["features.4"].act_quant.signed and not layers["head"].act_quant.signed  # after ReLU
    assert all(layer.act_quant.initialized for layer in layers.values())
    assert calibrate_qat(model, task.train_loader(64, 0), max_batches=2) == 2


def test_lazy_initialisation_from_the_first_training_batch(task, trained):
    model = prepare_qat(copy.deepcopy(trained), {"head": (4, 4)})
    with pytest.raises(LifecycleError, match="calibrate first"):
        model.eval()(task.example_input(2))
    model.train()(_batches(task, 1)[0])
    assert qat_layers(model)["head"].act_quant.initialized


@pytest.mark.parametrize("method, epochs", [("lsq", 2), ("pact", 1), ("ste", 1)])
def test_4bit_qat_keeps_digits_accuracy(task, trained, method, epochs):
    fp32 = task.evaluate(trained, task.val_loader())
    assert fp32 > 0.93
    torch.manual_seed(0)
    model = prepare_qat(copy.deepcopy(trained), {"re:.*": (4, 4)}, method=method, batches=_batches(task))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(epochs):
        task.train_epoch(model, opt, task.train_loader(32, epoch))
    acc = task.evaluate(model, task.val_loader())
    assert acc > 0.9 and acc > fp32 - 0.05, (method, fp32, acc)
    converted, report = convert_qat(model)
    assert not qat_layers(converted)
    assert set(converted.state_dict()) == set(trained.state_dict())  # original names for export
    assert task.evaluate(converted, task.val_loader()) > 0.85  # weights quantized, activations float
    assert {n: (r["w_bits"], r["a_bits"]) for n, r in report.items()} == {
        "features.0": (4, 4), "features.4": (4, 4), "head": (4, 4)}


def test_lsq_gradients_reach_the_step_sizes(task, trained):
    model = prepare_qat(copy.deepcopy(trained), {"re:.*": (4, 4)}, batches=_batches(task))
    params = quantizer_parameters(model)
    assert len(params) == 6  # a weight step vector and an input step per layer
    x, y = next(iter(task.train_loader(64, 0)))
    task.loss(model.train()(x), y).backward()
    for layer in qat_layers(model).values():
        assert layer.weight_quant.step.grad is not None and layer.weight_quant.step.grad.abs().sum() > 0
        assert layer.act_quant.step.grad is not None and layer.act_quant.step.grad.abs() > 0
    before = [p.detach().clone() for p in params]
    torch.optim.SGD(params, lr=0.01).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_converted_weights_lie_on_the_reported_grid(task, trained):
    model = prepare_qat(copy.deepcopy(trained), {"re:features.*": (3, 8), "head": (8, None)},
                        batches=_batches(task))
    converted, report = convert_qat(model)
    assert report["head"]["a_scale"] is None and report["features.4"]["a_signed"] is False
    for name, entry in report.items():
        w = converted.get_submodule(name).weight.detach()
        scale = torch.tensor(entry["w_scale"]).view(-1, *([1] * (w.dim() - 1)))
        codes = w / scale
        qmax = 2 ** (entry["w_bits"] - 1) - 1
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert codes.min() >= -qmax - 1 - 1e-3 and codes.max() <= qmax + 1e-3
        assert all(len(torch.unique(row)) <= 2 ** entry["w_bits"] for row in w.reshape(w.shape[0], -1))
    assert isinstance(qat_layers(model)["head"], QuantLayer)  # the prepared model is left as it was


def test_a_dataparallel_style_prefix_is_ignored():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = _tiny()

        def forward(self, x):
            return self.module(x)

    model = prepare_qat(Wrapped(), {"3": (4, 8), "module.0": (8, 8)}, method="ste")
    assert list(qat_layers(model)) == ["0", "3"]
    converted, report = convert_qat(model)
    assert list(report) == ["0", "3"] and isinstance(converted.module[3], nn.Linear)
