"""Pruning criteria: exact scores on tiny tensors, ranking rules and the activation hook."""
import pytest
import torch
import torch.nn as nn

from automl.compress.pruning.criteria import (
    CRITERIA, ActivationStats, apoz, bn_scale, fpgm, l1_norm, l2_norm, lp_norm, mean_activation,
    random_scores, rank_to_keep, taylor,
)
from automl.errors import ConfigError, UnknownNameError


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_registry_names_and_needs():
    assert CRITERIA.names() == sorted(["l1", "l2", "apoz", "mean_activation", "taylor", "random",
                                       "bn_scale", "fpgm", "obd", "similarity"])
    assert CRITERIA.get("l1") is l1_norm and CRITERIA.get("random") is random_scores
    assert CRITERIA.get("taylor").needs == "groups+grads" and CRITERIA.get("obd").needs == "groups+grads"
    assert CRITERIA.get("apoz").needs == "activations"
    assert CRITERIA.get("similarity").needs == "incoming+outgoing"
    with pytest.raises(UnknownNameError, match="did you mean 'l1'"):
        CRITERIA.get("l1_")


def test_lp_norms():
    assert l1_norm(t([[1, -2], [3, 0]])).tolist() == [3.0, 3.0]
    assert l2_norm(t([[3, -4], [0, -1]])).tolist() == [5.0, 1.0]
    assert lp_norm(t([[3, -4]]), p=2).tolist() == [5.0]
    with pytest.raises(ConfigError, match="p > 0"):
        lp_norm(t([[1.0]]), p=0)
    with pytest.raises(ConfigError, match="2-D tensor"):
        l1_norm(t([1, 2]))


def test_apoz_and_mean_activation():
    # (N=2, C=2, 2): channel 0 is [0,1 | 0,0] (3 zeros of 4), channel 1 is [2,3 | 0,4] (1 zero).
    acts = t([[[0, 1], [2, 3]], [[0, 0], [0, 4]]])
    assert apoz(acts).tolist() == [0.25, 0.75]
    assert mean_activation(acts).tolist() == [0.25, 2.25]
    with pytest.raises(ConfigError, match="channel dimension"):
        apoz(t([1, 0]))


def test_taylor_is_abs_of_sum():
    w, g = t([[1, 2], [3, -1], [2, 0]]), t([[1, 1], [2, 6], [-3, 5]])
    assert taylor(w, g).tolist() == [3.0, 0.0, 6.0]   # 1+2; 6-6 cancels; |-6|
    with pytest.raises(ConfigError, match="grouped the same way"):
        taylor(w, t([[1, 1]]))


def test_fpgm_median_filter_lowest():
    # filter 2 is the mean of filters 0 and 1: distance sums 2+1, 2+1, 1+1.
    scores = fpgm(t([[0, 0], [2, 0], [1, 0]]))
    assert scores.tolist() == [3.0, 3.0, 2.0]
    assert rank_to_keep(scores, 1 / 3).tolist() == [True, True, False]


def test_random_reproducible_and_private():
    torch.manual_seed(123)
    before = torch.rand(1)
    a, b, c = random_scores(5, seed=7), random_scores(5, seed=7), random_scores(5, seed=8)
    torch.manual_seed(123)
    assert torch.rand(1).item() == before.item()       # global RNG untouched
    assert a.shape == (5,) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ConfigError, match="positive structure count"):
        random_scores(0, seed=1)


def test_bn_scale_abs():
    assert bn_scale(t([-2, 0.5, 0])).tolist() == [2.0, 0.5, 0.0]
    with pytest.raises(ConfigError, match="1-D BatchNorm"):
        bn_scale(t([[1.0]]))


def test_rank_to_keep_counts_and_ties():
    assert rank_to_keep(t([3, 1, 2, 4]), 0.5).tolist() == [True, False, False, True]
    assert rank_to_keep(t([1, 1, 1, 1]), 0.5).tolist() == [False, False, True, True]  # ties by index
    assert rank_to_keep(t([5, 1, 1, 1]), 0.25).tolist() == [True, False, True, True]
    assert rank_to_keep(t([3, 1, 2]), 0.0).tolist() == [True, True, True]
    assert int(rank_to_keep(torch.arange(10.0), 0.3).sum()) == 7


def test_rank_to_keep_keeps_one():
    assert rank_to_keep(t([1, 2]), 0.9).tolist() == [False, True]
    assert rank_to_keep(t([1]), 0.6).tolist() == [True]


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "0.5", True])
def test_rank_to_keep_bad_ratio(ratio):
    with pytest.raises(ConfigError, match=r"prune ratio must be in \[0, 1\)"):
        rank_to_keep(t([1, 2]), ratio)


def test_rank_to_keep_bad_scores():
    with pytest.raises(ConfigError, match="NaN"):
        rank_to_keep(t([1, float("nan")]), 0.5)
    with pytest.raises(ConfigError, match="1-D"):
        rank_to_keep(t([[1, 2]]), 0.5)


def _conv_relu():
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(t([1, -1]).view(2, 1, 1, 1))   # channel 0 = x, channel 1 = -x
        conv.bias.zero_()
    return nn.Sequential(conv, nn.ReLU())


def test_activation_stats_hook():
    model, stats = _conv_relu(), ActivationStats()
    with pytest.raises(ConfigError, match="no activations recorded"):
        stats.apoz()
    handle = stats.attach(model[1])
    model(t([[1, -2], [3, 0]]).view(1, 1, 2, 2))   # ch0 [1,0,3,0], ch1 [0,2,0,0]
    assert stats.apoz().tolist() == [0.5, 0.75]
    assert stats.mean_activation().tolist() == [1.0, 0.5]
    model(torch.ones(1, 1, 2, 2))                    # ch0 [1,1,1,1], ch1 [0,0,0,0]
    assert stats.apoz().tolist() == [0.25, 0.875]
    assert stats.mean_activation().tolist() == [1.0, 0.25]
    assert stats.scores("apoz").tolist() == [0.75, 0.125]
    handle.remove()
    model(torch.ones(1, 1, 2, 2))
    assert stats.count.tolist() == [8.0, 8.0]        # detached: nothing more counted
    with pytest.raises(ConfigError, match="apoz"):
        stats.scores("l1")


def test_activation_stats_relu_on_conv_output():
    model, stats = _conv_relu(), ActivationStats()
    stats.attach(model[0], relu=True)
    x = t([[1, -2], [3, 0]]).view(1, 1, 2, 2)
    model(x)
    assert stats.apoz().tolist() == [0.5, 0.75]
    assert torch.equal(stats.scores("apoz"), apoz(model(x)))
