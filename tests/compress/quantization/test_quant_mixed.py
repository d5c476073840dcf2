"""Mixed precision: the bit allocator on exact cases, quantization sensitivity, Hutchinson traces."""
import itertools
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.compress.quantization.mixed import (allocate_bits, average_bits, hessian_sensitivity,
                                                hutchinson_trace, mixed_precision_bits, parameter_counts,
                                                quantization_sensitivity, quantize_weight)
from automl.errors import ConfigError
from automl.tasks import get_task


def test_allocator_meets_the_target_exactly_and_lowers_the_robust_layer():
    sens = {"a": {2: 10.0, 4: 1.0, 8: 0.0}, "b": {2: 5.0, 4: 0.5, 8: 0.0}}
    params = {"a": 100, "b": 100}
    for method in ("greedy", "exact"):
        bits = allocate_bits(sens, params, 6.0, method=method)
        assert bits == {"a": 8, "b": 4}
        assert average_bits(bits, params) == 6.0


def test_allocator_weighs_by_parameter_count():
    # Lowering the big layer saves most bits; the target 3.0 needs exactly 2 bits for 'big' when the
    # small ones stay at 8: (1000*2 + 100*8 + 100*8) / 1200 = 3.0.
    sens = {"big": {2: 1.0, 4: 0.2, 8: 0.0}, "s1": {2: 3.0, 4: 1.0, 8: 0.0}, "s2": {2: 4.0, 4: 1.5, 8: 0.0}}
    params = {"big": 1000, "s1": 100, "s2": 100}
    for method in ("greedy", "exact"):
        bits = allocate_bits(sens, params, 3.0, method=method)
        assert bits == {"big": 2, "s1": 8, "s2": 8}
        assert average_bits(bits, params) == 3.0


def test_allocator_edges():
    sens = {"a": {2: 2.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}
    params = {"a": 10, "b": 30}
    assert allocate_bits(sens, params, 8.0) == {"a": 8, "b": 8}
    assert allocate_bits(sens, params, 100.0) == {"a": 8, "b": 8}
    assert allocate_bits(sens, params, 3.5) == {"a": 2, "b": 4}  # the lowest reachable: (20 + 120) / 40
    with pytest.raises(ConfigError) as err:
        allocate_bits(sens, params, 3.0)
    assert err.value.key == "target_bits" and "3.5" in str(err.value)
    with pytest.raises(ConfigError) as err:
        allocate_bits(sens, {"a": 10}, 6.0)
    assert err.value.key == "params" and "'b'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        allocate_bits({"a": {1: 0.0}}, {"a": 1}, 6.0)
    assert err.value.key == "sensitivity.a"
    with pytest.raises(ConfigError):
        allocate_bits(sens, params, 6.0, method="ilp")


def test_allocator_takes_a_lower_width_that_does_not_hurt():
    sens = {"a": {2: 0.5, 4: -0.1, 8: 0.0}, "b": {2: 9.0, 4: 3.0, 8: 0.0}}  # 4 bits happens to help 'a'
    params = {"a": 50, "b": 50}
    for method in ("greedy", "exact"):
        assert allocate_bits(sens, params, 8.0, method=method) == {"a": 4, "b": 8}


def _brute_force(sens, params, target):
    names = list(sens)
    budget = target * sum(params.values())
    best = None
    for combo in itertools.product(*(sorted(sens[n]) for n in names)):
        if sum(params[n] * b for n, b in zip(names, combo)) <= budget + 1e-9:
            cost = sum(sens[n][b] for n, b in zip(names, combo))
            if best is None or cost < best[0] - 1e-12:
                best = (cost, combo)
    return best[0]


def test_exact_matches_brute_force_and_greedy_stays_within_budget():
    rng = random.Random(0)
    for case in range(40):
        names = [f"l{i}" for i in range(rng.randint(2, 5))]
        params = {n: rng.choice([10, 20, 50, 100, 300]) for n in names}
        sens = {}
        for n in names:  # decreasing damage with more bits, random shapes
            d2 = rng.uniform(1, 10)
            sens[n] = {2: d2, 4: d2 * rng.uniform(0.05, 0.5), 8: d2 * rng.uniform(0.0, 0.05)}
        target = rng.uniform(2.0, 8.0)
        exact = allocate_bits(sens, params, target, method="exact")
        greedy = allocate_bits(sens, params, target, method="greedy")
        cost = lambda bits: sum(sens[n][b] for n, b in bits.items())  # noqa: E731
        assert cost(exact) == pytest.approx(_brute_force(sens, params, target)), case
        for bits in (exact, greedy):
            assert average_bits(bits, params) <= target + 1e-9
        assert cost(greedy) >= cost(exact) - 1e-9
    # 'auto' falls back to greedy when the front is too large, still inside the budget
    bits = allocate_bits(sens, params, target, max_states=1)
    assert average_bits(bits, params) <= target + 1e-9


@pytest.fixture(scope="module")
def digits_model():
    task = get_task("digits")
    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 8, "depth": 2})
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for epoch in range(4):
        task.train_epoch(model, opt, task.train_loader(32, epoch))
    batches = [b for b, _ in zip(task.train_loader(128, 1), range(3))]
    return model.eval(), batches


def test_quantization_sensitivity_grows_as_bits_shrink_and_leaves_the_model_unchanged(digits_model):
    model, batches = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = quantization_sensitivity(model, batches, candidates=(2, 4, 8))
    assert list(sens) == ["features.0", "features.4", "head"]
    for name, per_bits in sens.items():
        assert per_bits[2] > per_bits[8] and per_bits[2] > 0, name
        assert abs(per_bits[8]) < 0.05, name
    acc = quantization_sensitivity(model, batches, ["head"], (2, 8), metric="accuracy")
    assert acc["head"][2] >= acc["head"][8]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError) as err:
        quantization_sensitivity(model, batches, metric="kl")
    assert err.value.key == "metric"


def test_hutchinson_trace_exact_for_a_diagonal_hessian():
    # loss = mean((X w - y)^2) with orthogonal columns: H = 2 X^T X / N = diag(2/3, 8/3, 6); v^T H v = Tr(H)
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    x, y = torch.diag(torch.tensor([1.0, 2.0, 3.0])), torch.zeros(3)
    mse = lambda out, target: F.mse_loss(out.squeeze(1), target)  # noqa: E731
    traces = hutchinson_trace(model, [(x, y)], samples=3, loss_fn=mse)
    assert traces == {"0": pytest.approx(2 * 14 / 3, rel=1e-6)}


def test_hutchinson_trace_converges_on_a_full_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    x, y = torch.randn(32, 4), torch.randn(32)
    mse = lambda out, target: F.mse_loss(out.squeeze(1), target)  # noqa: E731
    exact = float(2 * (x ** 2).sum() / 32)
    estimate = hutchinson_trace(model, [(x, y)], samples=400, loss_fn=mse)["0"]
    assert estimate == pytest.approx(exact, rel=0.1)


def test_hessian_sensitivity_formula_and_end_to_end_plan(digits_model):
    model, batches = digits_model
    traces = hutchinson_trace(model, batches, samples=32)
    assert set(traces) == {"features.0", "features.4", "head"} and all(t > 0 for t in traces.values())
    sens = hessian_sensitivity(model, traces, (2, 4))
    w = model.get_submodule("head").weight.detach()
    expected = traces["head"] / w.numel() * float(((quantize_weight(w, 2) - w) ** 2).sum())
    assert sens["head"][2] == pytest.approx(expected) and sens["head"][2] > sens["head"][4]
    params = parameter_counts(model)
    for criterion in ("quantization", "hessian"):
        plan = mixed_precision_bits(model, batches, 5.0, criterion=criterion, samples=2)
        assert set(plan) == set(params) and average_bits(plan, params) <= 5.0
    with pytest.raises(ConfigError) as err:
        mixed_precision_bits(model, batches, 5.0, criterion="fisher")
    assert err.value.key == "criterion"
