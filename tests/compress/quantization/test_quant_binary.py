"""Binary (BWN) and ternary (TWN) weights: exact small cases and straight-through training modules."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.compress.quantization.binary import (BinaryWeight, TernaryWeight, binarize, binary_weights,
                                                 ternarize, ternary_weights)
from automl.errors import ConfigError


def test_binary_exact_per_output_channel():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.0], [-0.5, 0.5, -0.5, 0.5]])
    signs, alpha = binary_weights(w)
    assert signs.tolist() == [[1, -1, 1, 1], [-1, 1, -1, 1]]  # sign(0) = +1
    assert alpha.tolist() == [1.5, 0.5]
    assert binarize(w).tolist() == [[1.5, -1.5, 1.5, 1.5], [-0.5, 0.5, -0.5, 0.5]]


def test_binary_per_tensor_and_conv_shapes():
    w = torch.tensor([[1.0, -3.0], [2.0, -2.0]])
    signs, alpha = binary_weights(w, per_channel=False)
    assert alpha.item() == 2.0 and binarize(w, per_channel=False).tolist() == [[2.0, -2.0], [2.0, -2.0]]
    conv = torch.randn(5, 3, 3, 3)
    _, alpha = binary_weights(conv)
    assert alpha.shape == (5,) and binarize(conv).shape == conv.shape
    assert torch.allclose(binarize(conv).abs().amax(dim=(1, 2, 3)), conv.abs().mean(dim=(1, 2, 3)))


def test_binary_scale_is_l2_optimal_for_the_signs():
    torch.manual_seed(0)
    w = torch.randn(3, 40)
    signs, alpha = binary_weights(w)
    best = ((signs * alpha[:, None] - w) ** 2).sum()
    for factor in (0.8, 0.95, 1.05, 1.2):
        assert best < ((signs * alpha[:, None] * factor - w) ** 2).sum()


def test_ternary_exact():
    w = torch.tensor([[1.0, -0.1, 0.2, -2.0, 0.0]])  # mean|w| = 0.66, delta = 0.462
    codes, alpha = ternary_weights(w)
    assert codes.tolist() == [[1, 0, 0, -1, 0]] and alpha.tolist() == [1.5]
    assert ternarize(w).tolist() == [[1.5, 0.0, 0.0, -1.5, 0.0]]


def test_ternary_per_channel_threshold_and_zero_rows():
    w = torch.tensor([[0.0, 0.0, 0.0], [3.0, -1.2, 0.3], [-0.2, 0.2, 0.2]])
    codes, alpha = ternary_weights(w)
    assert codes.tolist() == [[0, 0, 0], [1, -1, 0], [-1, 1, 1]]  # deltas 0, 1.05, 0.14
    assert alpha.tolist() == pytest.approx([0.0, 2.1, 0.2])
    codes, alpha = ternary_weights(w, threshold=0.0, per_channel=False)  # every non-zero kept
    assert codes.abs().sum().item() == 6 and alpha.item() == pytest.approx(5.1 / 6)


@pytest.mark.parametrize("threshold", [-0.1, 2.0, "0.7", True])
def test_ternary_threshold_is_validated(threshold):
    with pytest.raises(ConfigError) as err:
        TernaryWeight(threshold=threshold)
    assert err.value.key == "threshold"


@pytest.mark.parametrize("module, fn", [(BinaryWeight(), binarize), (TernaryWeight(), ternarize)])
def test_modules_match_the_functions_and_pass_gradients_straight_through(module, fn):
    torch.manual_seed(1)
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    out = module(w)
    assert torch.equal(out.detach(), fn(w.detach()))
    upstream = torch.randn_like(w)
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)
    scale, zp = module.qparams()
    assert scale.shape == (4,) and torch.all(zp == 0)


def test_binary_weight_training_learns_a_separable_problem():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x @ torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0]) > 0).long()  # a binary direction
    layer, quant = nn.Linear(8, 2), BinaryWeight()
    opt = torch.optim.Adam(layer.parameters(), 0.05)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(F.linear(x, quant(layer.weight), layer.bias), y).backward()
        opt.step()
    acc = (F.linear(x, binarize(layer.weight.detach()), layer.bias).argmax(1) == y).float().mean()
    assert acc > 0.9
