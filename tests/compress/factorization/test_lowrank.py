"""Low-rank factorization: exact at full rank, rank rules, MAC accounting, skips and errors."""
import pytest
import torch
import torch.nn as nn

from automl.compress.factorization.lowrank import (RankRule, factorize, rank_for_energy, spatial_svd_conv, svd_linear,
                                                   tucker2_conv)
from automl.errors import ConfigError, UnknownNameError
from automl.modelstats import count_macs, count_params


def known_matrix(singular_values, rows=12, cols=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.zeros(rows, cols, dtype=torch.float64)
    diagonal = range(len(singular_values))
    s[diagonal, diagonal] = torch.tensor(singular_values, dtype=torch.float64)
    return (u @ s @ v.T).float()


def test_rank_for_energy_on_known_singular_values():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # energy shares 16, 9, 4, 1 of 30
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 16 / 30) == 1
    assert rank_for_energy(s, 0.8) == 2
    assert rank_for_energy(s, 0.9) == 3
    assert rank_for_energy(s, 1.0) == 4


def test_svd_linear_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    x = torch.randn(16, 12)
    factored = svd_linear(layer, 7)
    assert torch.allclose(factored(x), layer(x), atol=1e-5)
    assert factored[1].bias is not None and factored[0].bias is None


def test_lower_rank_reduces_params_and_error_grows():
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    x = torch.randn(64, 40)
    errors = []
    for rank in (15, 10, 5):
        factored = svd_linear(layer, rank)
        assert count_params(factored) == rank * 70 + 30 < count_params(layer)
        errors.append(float((factored(x) - layer(x)).detach().norm()))
    assert errors[0] < errors[1] < errors[2]


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), ((1, 2), (2, 0), (2, 1))])
def test_spatial_svd_full_rank_is_exact(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 3), stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 3, 11, 9)
    factored = spatial_svd_conv(conv, min(3 * 3, 5 * 3))
    assert factored(x).shape == conv(x).shape
    assert torch.allclose(factored(x), conv(x), atol=1e-5)
    assert factored[0].kernel_size == (3, 1) and factored[1].kernel_size == (1, 3)


def test_tucker2_full_rank_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 9, 9)
    factored = tucker2_conv(conv, (6, 8))
    assert torch.allclose(factored(x), conv(x), atol=1e-5)
    assert [m.kernel_size for m in factored] == [(1, 1), (3, 3), (1, 1)]


def test_energy_rule_picks_the_rank_of_a_known_matrix():
    layer = nn.Linear(10, 12)
    with torch.no_grad():
        layer.weight.copy_(known_matrix([4.0, 3.0, 2.0, 1.0]))
    model = nn.Sequential(layer)
    new, report = factorize(model, rank_rule="energy:0.8")
    assert report[0].factorized and report[0].rank == 2
    new3, report3 = factorize(model, rank_rule="energy:0.9")
    assert report3[0].rank == 3
    full, _ = factorize(model, rank_rule="energy:1.0")  # rank 4 is exact for a rank-4 matrix
    x = torch.randn(5, 10)
    assert torch.allclose(full(x), model(x), atol=1e-5)


def small_cnn():
    return nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 4 * 4, 32),
                         nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("conv", ["spatial", "tucker2"])
def test_mac_rule_meets_the_target_and_report_matches_counts(conv):
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(2, 8, 8, 8)
    new, report = factorize(model, rank_rule="macs:0.5", conv=conv, example=x)
    assert all(r.factorized for r in report)
    for r in report:
        assert r.macs_after <= 0.5 * r.macs_before and r.params_after < r.params_before
    assert count_macs(new, x) == sum(r.macs_after for r in report)
    assert count_macs(model, x) == sum(r.macs_before for r in report)
    assert count_params(new) == sum(r.params_after for r in report)
    assert new(x).shape == model(x).shape
    assert isinstance(model[0], nn.Conv2d)  # the original is untouched


def test_layers_that_would_not_shrink_are_skipped_and_reported():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 64))
    new, report = factorize(model, rank_rule="rank:10")
    assert [r.factorized for r in report] == [False, False]
    assert "does not reduce MACs" in report[0].reason
    assert isinstance(new[0], nn.Linear) and report[0].macs_after == report[0].macs_before == 100
    new, report = factorize(model, rank_rule="rank:2")
    assert [r.factorized for r in report] == [True, True]
    assert isinstance(new[1], nn.Sequential) and report[1].macs_after == 2 * 74


def test_target_below_rank_one_is_skipped():
    new, report = factorize(nn.Sequential(nn.Linear(4, 4)), rank_rule="macs:0.1")
    assert not report[0].factorized and "below rank 1" in report[0].reason


def test_unsupported_layers_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    new, report = factorize(model, rank_rule="rank:1", example=torch.randn(1, 4, 6, 6))
    assert not report[0].factorized and "grouped" in report[0].reason
    assert isinstance(new[0], nn.Conv2d)
    _, report = factorize(nn.Sequential(nn.Conv1d(4, 4, 3)), rank_rule="rank:1")
    assert not report[0].factorized and "Conv1d" in report[0].reason


def test_conv_needs_an_example():
    with pytest.raises(ConfigError, match="example"):
        factorize(small_cnn(), rank_rule="rank:2")


def test_unknown_layer_lists_nearest_names():
    with pytest.raises(UnknownNameError, match="nearest layer names: .*2"):
        factorize(small_cnn(), layers=["20"], example=torch.randn(1, 8, 8, 8))


@pytest.mark.parametrize("rule", ["energy:1.5", "macs:1", "rank:0", "rank:2.5", "speed:2", "energy",
                                  "energy:abc"])
def test_bad_rank_rules_are_config_errors(rule):
    with pytest.raises(ConfigError, match="rank rule"):
        RankRule.parse(rule)


def test_rank_rule_forms():
    assert RankRule.parse("macs:0.25") == RankRule("macs", 0.25)
    assert RankRule.parse(("rank", 8)) == RankRule("rank", 8.0)
    with pytest.raises(ConfigError, match="scheme"):
        factorize(nn.Sequential(nn.Linear(4, 4)), conv="cp")
