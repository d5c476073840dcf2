"""Quantization methods as recipe stages: int8_pt2e, qat, mixed, binary, ternary, data_free."""
import collections
import textwrap

import onnx
import pytest
import torch
import torch.nn as nn

from automl.compress import ApplyContext
from automl.compress.quantization import qat_methods
from automl.compress.quantization.int8_methods import deploy_int8
from automl.compress.quantization.qat import quantizer_parameters
from automl.errors import ConfigError, MeasurementError, UnknownNameError
from automl.recipe import Recipe, apply_recipe, recipe_from_config
from automl.recipe.apply import train_with_stages
from automl.runtime import Artifact
from automl.spaces import load_space

BASE = """version: 1
task: digits
arch: {family: cnn, width: 8, depth: 2}
train: {epochs: %d, lr: 0.01, batch_size: 32}
stages: %s
"""


def recipe(stages: str, epochs: int = 3) -> Recipe:
    return Recipe.loads(BASE % (epochs, stages))


def train(task, stages: str, epochs: int = 3):
    r = recipe(stages, epochs)
    return train_with_stages(r, task, ApplyContext(task=task, work_dir=".", epochs=epochs))


def onnx_ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_int8_pt2e_deploys_int8_that_agrees_with_torch_int8(task, tmp_path):
    result = apply_recipe(recipe("[{method: int8_pt2e}]"), tmp_path, task=task)
    m = result.metrics
    assert m["precision"] == "int8_pt2e"
    assert result.artifact.notes["int8_ops"] == "QLinearConv:2"
    assert m["int8_parity"] >= 0.99
    assert m["accuracy"] >= m["torch_accuracy"] - 0.02
    assert "QuantizeLinear" in onnx_ops(result.artifact.path)
    # the fp32 export already folds BatchNorm into the convolutions (eval-mode dynamo export)
    assert "BatchNormalization" not in onnx_ops(tmp_path / "model.onnx")


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:
            x = x * 2
        return self.head(x.mean(dim=(2, 3)))


def test_int8_pt2e_failure_names_the_alternative(task, tmp_path):
    ctx = ApplyContext(task=task, work_dir=tmp_path, epochs=1)
    with pytest.raises(MeasurementError, match=r"int8_pt2e: pt2e could not quantize.*Fix: use .*int8_ptq"):
        deploy_int8(_Branchy().eval(), ctx, tmp_path / "m.onnx", per_channel=True, batches=1,
                    precision="int8_pt2e", method="int8_pt2e")


def test_qat_quantizer_parameters_reach_the_optimizer(task, monkeypatch):
    torch.manual_seed(0)
    seen = {}
    original = qat_methods.FakeQuantMethod._activate

    def spy(self, model, ctx):
        original(self, model, ctx)
        params = quantizer_parameters(model)
        seen["ids"] = {id(p) for p in params}
        seen["values"] = [p.detach().clone() for p in params]
        seen["params"] = params

    monkeypatch.setattr(qat_methods.FakeQuantMethod, "_activate", spy)
    model, (handler,) = train(task, "[{method: qat, start_epoch: 1, config: {w_bits: 4, a_bits: 4}}]")
    assert seen["ids"] <= {id(p) for p in handler.trainable_parameters()}  # reserved before the optimizer
    assert len(seen["params"]) == 6  # three layers x (weight step, input step)
    moved = [not torch.equal(before, p.detach()) for before, p in zip(seen["values"], seen["params"])]
    assert all(moved), moved
    assert handler.plan == {"features.0": (8, 8), "features.4": (4, 4), "head": (8, 8)}  # first/last int8


def test_qat_low_bits_deploy_the_simulated_model(task, tmp_path):
    stages = "[{method: qat, start_epoch: 1, config: {w_bits: 4, a_bits: 4, quantizer: pact, first_last: same}}]"
    result = apply_recipe(recipe(stages), tmp_path, task=task)
    m = result.metrics
    assert m["precision"] == "w4a4 (simulated)" and "simulated" in result.artifact.notes
    assert m["quant_avg_w_bits"] == 4.0 and m["quant_layers"] == 3
    # the ONNX model computes what the fake-quantized torch model computes
    assert abs(m["accuracy"] - m["torch_accuracy"]) <= 1 / 360
    assert onnx_ops(result.artifact.path)["Round"] == 3
    conv = result.model.features[0].layer.weight.detach()
    assert all(len(torch.unique(row)) <= 16 for row in conv.flatten(1))  # 4-bit grid per channel


def test_qat_int8_deploys_real_int8(task, tmp_path):
    result = apply_recipe(recipe("[{method: qat, start_epoch: 2}]"), tmp_path, task=task)
    assert result.metrics["precision"] == "int8_qat"
    assert result.metrics["int8_parity"] >= 0.99
    assert "QLinearConv" in result.artifact.notes["int8_ops"]


def test_mixed_allocates_within_the_target(task):
    _, (handler,) = train(task, "[{method: mixed, start_epoch: 2, config: {target_bits: 3, min_bits: 2, "
                                "max_bits: 6, a_bits: 0}}]")
    bits = {n: w for n, (w, a) in handler.plan.items()}
    assert set(bits) == {"features.0", "features.4", "head"}
    assert all(s[2] >= s[4] >= s[6] for s in handler.sensitivity.values())
    assert all(2 <= b <= 6 for b in bits.values()) and all(a is None for _, a in handler.plan.values())
    assert handler.stats["quant_avg_w_bits"] <= 3.0
    assert handler.stats["mixed_bits"] == ",".join(f"{n}:{b}" for n, b in bits.items())
    assert handler.label().startswith("mixed w") and handler.label().endswith("a32 (simulated)")


def test_mixed_explicit_layer_bits(task):
    stages = "[{method: mixed, start_epoch: 2, config: {layer_bits: {'re:features.*': 3, features.4: 5, head: 8}}}]"
    model, (handler,) = train(task, stages)
    assert handler.plan == {"features.0": (3, 8), "features.4": (5, 8), "head": (8, 8)}  # exact beats pattern
    weight = model.features[4].layer.weight.detach()
    assert all(len(torch.unique(row)) <= 32 for row in weight.flatten(1))


def test_mixed_rejects_fractional_bits_and_unknown_layers(task):
    with pytest.raises(ConfigError, match=r"layer_bits\.head: layer bits must be whole numbers"):
        train(task, "[{method: mixed, config: {layer_bits: {head: 4.5}}}]", epochs=1)
    with pytest.raises(UnknownNameError, match="nearest layer names: head"):
        train(task, "[{method: mixed, config: {layer_bits: {haed: 4}}}]", epochs=1)


def test_monotone_sensitivity_never_rewards_fewer_bits():
    raw = {"a": {2: 0.5, 4: -0.1, 8: 0.0}, "b": {2: 0.2, 4: 0.3, 8: 0.1}}
    assert qat_methods.monotone(raw) == {"a": {8: 0.0, 4: 0.0, 2: 0.5}, "b": {8: 0.1, 4: 0.3, 2: 0.3}}


@pytest.mark.parametrize("quantization", ["{method: qat, start_epoch: 2, config: {w_bits: 4}}",
                                          "{method: kmeans, start_epoch: 2, config: {conv_bits: 4, bits: 4}}"])
def test_structured_thinning_after_fake_quantization(task, quantization):
    """The wrappers are gone after the last step, so thinning at the pruning stage's finalize works."""
    stages = f"[{{method: structured, start_epoch: 1, config: {{ratio: 0.5}}}}, {quantization}]"
    text = (BASE % (3, stages)).replace("width: 8, depth: 2", "width: 16, depth: 3")
    model, (pruning, quant) = train_with_stages(Recipe.loads(text), task, ApplyContext(task=task, work_dir=".",
                                                                                         epochs=3))
    conv = model.features[4] if isinstance(model.features[4], nn.Conv2d) else model.features[4].layer
    assert conv.weight.shape[0] == 16 and pruning.stats["channels_kept"]["features.4"] == "16/32"  # thinned
    assert all(len(torch.unique(row)) <= 17 for row in conv.weight.detach().flatten(1))  # still 4-bit values
    assert model(task.example_input(2)).shape == (2, 10)


def test_activation_bits_of_one_are_refused(task):
    with pytest.raises(ConfigError, match=r"a_bits: unsupported bit-width \(got 1\)"):
        train(task, "[{method: qat, config: {a_bits: 1}}]", epochs=1)


@pytest.mark.parametrize("method,levels", [("binary", 2), ("ternary", 3)])
def test_binary_and_ternary_weights(task, method, levels):
    model, (handler,) = train(task, f"[{{method: {method}, start_epoch: 1}}]")
    assert handler.plan == {"features.4": (1 if method == "binary" else 2, None)}  # first/last stay float
    weight = model.features[4].weight.detach()
    assert all(len(torch.unique(row)) <= levels for row in weight.flatten(1))
    assert len(torch.unique(model.features[0].weight.detach())) > levels
    assert handler.label() == f"{method} weights (simulated)"


def test_data_free_int8_is_real_and_low_bits_are_labelled(task, tmp_path):
    result = apply_recipe(recipe("[{method: data_free}]"), tmp_path, task=task)
    assert result.metrics["precision"] == "int8_datafree" and result.metrics["int8_parity"] >= 0.99
    assert result.metrics["datafree_equalized_pairs"] == 2
    model, (handler,) = train(task, "[{method: data_free, config: {bits: 4}}]")
    out = handler.deploy(Artifact(tmp_path / "model.onnx"), ApplyContext(task=task, work_dir=tmp_path, epochs=3))
    assert out.precision == "w4 (simulated, weight-only)"
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1].weight.detach()
    assert len(torch.unique(conv)) <= 16  # per-tensor 4-bit grid, BN folded


SPACE = """
version: 1
task: digits
arch: {family: cnn, width: 8, depth: 2}
train: {epochs: 6}
compression:
  quantization:
    method: {choice: [none, int8_pt2e, qat]}
    w_bits: {choice: [4, 8], when: {quantization.method: qat}}
    quantizer: {choice: [lsq, pact], when: {quantization.method: qat}}
    a_bits: 8
    finetune_epochs: 2
objectives: {accuracy: max, latency_ms: min}
"""


def test_space_with_quantization_choices_builds_recipes(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    space = load_space(tmp_path / "s.yaml")
    qat = recipe_from_config(space, {"arch.width": 8, "train.epochs": 6, "quantization.method": "qat",
                                     "quantization.w_bits": 4, "quantization.a_bits": 8,
                                     "quantization.quantizer": "pact", "quantization.finetune_epochs": 2})
    (stage,) = qat.stages
    assert stage.method == "qat" and stage.config.w_bits == 4 and stage.start_epoch == 4
    assert stage.config.quantizer == "pact"
    pt2e = recipe_from_config(space, {"arch.width": 8, "train.epochs": 6, "quantization.method": "int8_pt2e",
                                      "quantization.a_bits": 8})
    assert pt2e.stages[0].method == "int8_pt2e" and pt2e.stages[0].start_epoch is None
    bad = SPACE.replace("w_bits: {choice: [4, 8]", "w_bits: {choice: [4, 9]")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ConfigError, match=r"w_bits\.choice\.1: out of range \[2, 8\]"):
        load_space(tmp_path / "bad.yaml")


def test_recipe_round_trip_keeps_every_quantization_option(tmp_path):
    text = BASE % (4, textwrap.dedent("""
        - method: mixed
          start_epoch: 2
          config: {layer_bits: {head: 8, 're:features\\..*': 4}, a_bits: 0, criterion: hessian, quantizer: pact}
        """))
    r = Recipe.loads(text)
    r.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == r
    assert r.stages[0].config.layer_bits == {"head": 8.0, "re:features\\..*": 4.0}
    for method in ("int8_pt2e", "qat", "binary", "ternary", "data_free"):
        one = recipe(f"[{{method: {method}}}]")
        assert Recipe.from_dict(one.to_dict()) == one
