"""Regularization penalties: exact values on tiny tensors, gradients, a training effect, layer errors."""
import math

import pytest
import torch
import torch.nn as nn

from automl.compress.regularization.penalties import (Regularizer, RegularizerConfig, bn_scale_l1, group_lasso,
                                                      group_norms, group_variance, l1_penalty, select_batchnorms)
from automl.errors import UnknownNameError
from automl.validate import Where

# float(penalty) on a graph-carrying tensor is what these checks want
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def conv_weight():
    # shape (out=2, in=1, kh=1, kw=2): filter 0 = [1, 2], filter 1 = [3, 4]
    return torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])


def test_l1_is_sum_of_abs():
    assert float(l1_penalty(torch.tensor([-1.0, 2.0, -3.0, 4.0]))) == 10.0


@pytest.mark.parametrize("groups, expected", [
    ("filter", math.sqrt(2) * (math.sqrt(5) + 5)),       # two groups of 2 elements
    ("row", math.sqrt(2) * (math.sqrt(5) + 5)),          # rows of the (2, 2) view = filters
    ("channel", 2 * math.sqrt(30)),                      # one input channel, 4 elements
    ("column", math.sqrt(2) * (math.sqrt(10) + math.sqrt(20))),  # columns [1, 3] and [2, 4]
])
def test_group_lasso_conv_by_hand(groups, expected):
    assert float(group_lasso(conv_weight(), groups)) == pytest.approx(expected, rel=1e-6)


def test_group_lasso_linear_uses_sqrt_group_size_scaling():
    w = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    norms, size = group_norms(w, "filter")
    assert norms.tolist() == [3.0, 0.0] and size == 3
    assert float(group_lasso(w, "filter")) == pytest.approx(math.sqrt(3) * 3.0)
    # linear channel == column: columns [1,0], [2,0], [2,0], 2 elements each
    assert float(group_lasso(w, "channel")) == pytest.approx(math.sqrt(2) * 5.0)
    assert float(group_lasso(w, "column")) == pytest.approx(math.sqrt(2) * 5.0)


def test_group_variance_is_population_variance_of_norms():
    assert float(group_variance(conv_weight(), "filter")) == pytest.approx(((5 - math.sqrt(5)) / 2) ** 2)
    assert float(group_variance(conv_weight(), "channel")) == 0.0  # a single group


def test_bad_groups_and_shapes_rejected():
    with pytest.raises(ValueError, match="groups must be one of"):
        group_lasso(conv_weight(), "kernel")
    with pytest.raises(ValueError, match=">= 2 dims"):
        group_lasso(torch.ones(3), "filter")


def test_l1_gradient_is_sign():
    w = torch.tensor([[-1.5, 0.5], [2.0, -0.1]], requires_grad=True)
    l1_penalty(w).backward()
    assert torch.equal(w.grad, torch.sign(w.detach()))


def test_group_lasso_gradient_is_analytic_and_finite_at_zero():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    group_lasso(w, "filter").backward()
    expected = torch.tensor([[math.sqrt(2) * 3 / 5, math.sqrt(2) * 4 / 5], [0.0, 0.0]])
    assert torch.allclose(w.grad, expected)


def test_negative_group_variance_step_spreads_norms():
    model = nn.Sequential(nn.Linear(4, 6))
    torch.nn.init.uniform_(model[0].weight, 0.5, 1.0)
    reg = Regularizer(RegularizerConfig(kind="group_variance", groups="filter", strength=1.0, layers=("0",)))
    before = float(group_variance(model[0].weight.detach(), "filter"))
    reg.penalty(model).backward()
    with torch.no_grad():
        model[0].weight -= 0.1 * model[0].weight.grad
    assert float(group_variance(model[0].weight.detach(), "filter")) > before


def bn_model():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2, 3),
                          nn.BatchNorm1d(3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -2.0]))
        model[5].weight.copy_(torch.tensor([0.5, -0.5, 3.0]))
    return model


def test_bn_scale_l1_two_layers():
    model = bn_model()
    assert float(bn_scale_l1(model)) == pytest.approx(7.0)
    assert float(bn_scale_l1([model[1]])) == pytest.approx(3.0)
    assert float(bn_scale_l1(nn.Sequential(nn.BatchNorm1d(2, affine=False)))) == 0.0
    reg = Regularizer(RegularizerConfig(kind="bn_scale_l1", strength=0.1))
    penalty = reg.penalty(model)
    assert float(penalty) == pytest.approx(0.7)
    penalty.backward()
    assert model[1].weight.grad.tolist() == pytest.approx([0.1, -0.1])
    assert model[0].weight.grad is None  # only gammas are penalised
    only_last = Regularizer(RegularizerConfig(kind="bn_scale_l1", strength=1.0, layers=("5",)))
    assert float(only_last.penalty(model)) == pytest.approx(4.0)
    assert list(select_batchnorms(model, ["re:.*"])) == ["1", "5"]


def test_regularizer_sums_layers_and_scales_by_strength():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
    lasso = Regularizer(RegularizerConfig(kind="group_lasso", groups="filter", strength=0.5))
    assert float(lasso.penalty(model)) == pytest.approx(0.5 * math.sqrt(2) * (5.0 + math.sqrt(2)))
    l1 = Regularizer(RegularizerConfig(kind="l1", strength=2.0, layers=("2",)))
    assert float(l1.penalty(model)) == pytest.approx(4.0)


def test_report_counts_groups_below_threshold():
    model = nn.Sequential(nn.Linear(2, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-4, 0.0], [1.0, 0.0]]))
    reg = Regularizer(RegularizerConfig(kind="group_lasso", groups="filter", threshold=1e-3))
    report = reg.report(model)["0"]
    assert report["groups"] == 4.0 and report["below_threshold"] == 0.5
    assert report["norm_max"] == pytest.approx(5.0) and report["norm_min"] == 0.0
    assert report["norm_mean"] == pytest.approx((5.0 + 1e-4 + 1.0) / 4)
    bn = Regularizer(RegularizerConfig(kind="bn_scale_l1", threshold=0.6)).report(bn_model())
    assert bn["5"]["below_threshold"] == pytest.approx(2 / 3) and bn["1"]["below_threshold"] == 0.0


def _train_hidden_norms(strength: float) -> torch.Tensor:
    """Full-batch SGD on y = x0 - x1 with 16 hidden units; returns the hidden units' row norms."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] - x[:, 1]).unsqueeze(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    reg = Regularizer(RegularizerConfig(kind="group_lasso", groups="filter", strength=strength, layers=("0",)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if strength:
            loss = loss + reg.penalty(model)
        loss.backward()
        opt.step()
    return group_norms(model[0].weight.detach(), "filter")[0]


def test_strong_group_lasso_drives_filters_to_zero():
    plain, lasso = _train_hidden_norms(0.0), _train_hidden_norms(0.05)
    dead_plain = int((plain < 0.05).sum())
    dead_lasso = int((lasso < 0.05).sum())
    assert dead_plain == 0
    assert dead_lasso >= 10  # most hidden units switched off as whole rows ...
    assert float(lasso.max()) > 0.1  # ... while the few the target needs survive
    assert float(lasso.sum()) < 0.5 * float(plain.sum())


def test_pattern_matching_nothing_lists_nearest_names():
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 2, 3))
    model.add_module("bn1", nn.BatchNorm2d(2))
    model.add_module("fc", nn.Linear(2, 2))
    reg = Regularizer(RegularizerConfig(kind="l1", layers=("conv",)))
    with pytest.raises(UnknownNameError, match="conv1"):
        reg.penalty(model)
    with pytest.raises(UnknownNameError) as err:
        reg.select(model, Where("r.yaml", "schedule.0.layers"))
    assert err.value.file == "r.yaml" and err.value.key == "schedule.0.layers" and err.value.value == "conv"
    bn = Regularizer(RegularizerConfig(kind="bn_scale_l1", layers=("conv1",)))
    with pytest.raises(UnknownNameError, match="no BatchNorm layer") as err:
        bn.penalty(model)
    assert "bn1" in err.value.fix
