"""Allocation of structured pruning: uniform, global ranking, energy-aware ratios, channel rounding and
the bisection on a MAC-reduction target."""
import pytest
import torch

from automl.compress.pruning.allocation import (allocate, energy_ratios, global_keep, layer_macs, ratio_for_mac_target,
                                                round_keep, rounded_count, uniform_ratios)
from automl.compress.pruning.thinning import coupled_groups, group_channel_scores, thin
from automl.errors import ConfigError, UnknownNameError
from automl.modelstats import count_macs
from automl.tasks import get_task


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_uniform_ratios():
    assert uniform_ratios(["a", "b"], 0.25) == {"a": 0.25, "b": 0.25}
    with pytest.raises(ConfigError, match=r"ratio: a pruning level must be in \[0, 1\)"):
        uniform_ratios(["a"], 1.0)


def test_global_keep_is_scale_free_within_units():
    # b is a's scores times 10: after dividing by each unit's mean both rank the same
    keep = global_keep({"a": t(1, 2, 3, 4), "b": t(10, 20, 30, 40)}, 0.5)
    assert keep["a"].tolist() == [False, False, True, True]
    assert keep["b"].tolist() == [False, False, True, True]


def test_global_keep_ranks_across_units():
    # a is flat (all near its mean), b has two outliers far below its mean: b loses them first
    keep = global_keep({"a": t(5, 5, 5, 5), "b": t(0.1, 0.1, 10, 10)}, 0.25)
    assert keep["a"].all() and keep["b"].tolist() == [False, False, True, True]


def test_global_keep_keeps_one_per_unit_and_honours_minus_inf():
    keep = global_keep({"a": t(1, 1), "b": t(1, 1, 1)}, 0.9)
    assert int(keep["a"].sum()) == 1 and int(keep["b"].sum()) == 1
    keep = global_keep({"a": t(float("-inf"), 9, 8), "b": t(1, 2, 3)}, 1 / 6)
    assert keep["a"].tolist() == [False, True, True] and keep["b"].all()


def test_energy_ratios_closed_form():
    costs = {"a": 100.0, "b": 10.0, "c": 10.0}
    r = energy_ratios(costs, 0.3)
    k = 0.3 * 120 / ((100 ** 2 + 10 ** 2 + 10 ** 2) / 120)  # sum(k * share_i * cost_i) = 0.3 * total
    assert r["a"] == pytest.approx(k * 100 / 120) and r["b"] == pytest.approx(k * 10 / 120) == r["c"]
    assert sum(r[u] * costs[u] for u in costs) == pytest.approx(0.3 * 120)


def test_energy_prunes_the_costly_insensitive_layer_most():
    costs = {"conv_big_robust": 100.0, "conv_big_fragile": 100.0, "conv_small": 10.0}
    sensitivity = {"conv_big_robust": 0.01, "conv_big_fragile": 0.2, "conv_small": 0.01}
    r = energy_ratios(costs, 0.4, sensitivity)
    assert r["conv_big_robust"] > r["conv_small"] and r["conv_big_robust"] > r["conv_big_fragile"]
    assert r["conv_big_robust"] == pytest.approx(20 * r["conv_big_fragile"]) or r["conv_big_robust"] == 0.9
    assert sum(r[u] * costs[u] for u in costs) == pytest.approx(0.4 * 210)


def test_energy_caps_and_redistributes():
    costs = {"a": 100.0, "b": 100.0, "c": 1.0}
    r = energy_ratios(costs, 0.5, {"a": 0.001, "b": 1.0, "c": 1.0}, max_ratio=0.9)
    assert r["a"] == 0.9 and 0 < r["b"] < 0.9
    assert sum(r[u] * costs[u] for u in costs) == pytest.approx(0.5 * 201)
    assert energy_ratios(costs, 0.9, max_ratio=0.9) == pytest.approx({"a": 0.9, "b": 0.9, "c": 0.9})


def test_energy_errors():
    with pytest.raises(ConfigError, match=r"\[0, 0.9\]"):
        energy_ratios({"a": 1.0}, 0.95)
    with pytest.raises(UnknownNameError, match="did you mean 'conv1'"):
        energy_ratios({"conv1": 1.0}, 0.5, {"conv_1": 0.1})
    with pytest.raises(ConfigError, match="positive total"):
        energy_ratios({"a": 0.0}, 0.5)
    with pytest.raises(ConfigError, match="needs a cost for every unit"):
        allocate({"a": t(1, 2)}, 0.5, "energy")
    with pytest.raises(UnknownNameError, match="unknown allocation"):
        allocate({"a": t(1, 2)}, 0.5, "greedy")


def test_allocate_with_fixed_units():
    scores = {"a": t(4, 3, 2, 1), "b": t(1, 2, 3, 4)}
    keep = allocate(scores, 0.5, "uniform", fixed={"a": 0.25})
    assert keep["a"].tolist() == [True, True, True, False] and keep["b"].tolist() == [False, False, True, True]
    keep = allocate(scores, 0.25, "energy", costs={"a": 1.0, "b": 1.0}, fixed={"b": 0.0})
    assert keep["b"].all() and int((~keep["a"]).sum()) == 1


@pytest.mark.parametrize("kept, total, round_to, expected", [
    (23, 32, 16, 16), (24, 32, 16, 32), (45, 64, 16, 48), (3, 64, 16, 16), (5, 10, 8, 8), (9, 10, 8, 10),
    (7, 12, 16, 12), (23, 32, 1, 23)])
def test_rounded_count(kept, total, round_to, expected):
    assert rounded_count(kept, total, round_to) == expected


def test_round_keep_takes_best_and_never_revives():
    scores = {"a": torch.arange(32, dtype=torch.float32)}
    keep = round_keep(scores, {"a": torch.arange(32) >= 9}, 16)   # 23 kept -> 16: the 16 best
    assert keep["a"].tolist() == [False] * 16 + [True] * 16
    scores = {"a": torch.cat([torch.full((16,), float("-inf")), torch.ones(16)])}
    keep = round_keep(scores, {"a": torch.ones(32, dtype=torch.bool)}, 16)  # capped at the 16 still alive
    assert keep["a"].tolist() == [False] * 16 + [True] * 16


def test_layer_macs_sum_to_count_macs():
    task = get_task("digits")
    model = task.build_model("resnet", {"width": 4, "stages": 2, "blocks": 1, "se": True})
    example = task.example_input(1)
    macs = layer_macs(model, example)
    assert sum(macs.values()) == count_macs(model, example)
    assert macs["stem.conv"] == 4 * 1 * 9 * 64 and macs["head"] == 8 * 10


def test_bisection_on_a_smooth_model():
    level, factor = ratio_for_mac_target(None, None, 2.0, lambda r: 1000.0 * (1 - r) ** 2, base_macs=1000, tol=1e-3)
    assert level == pytest.approx(1 - 2 ** -0.5, abs=1e-3) and factor == pytest.approx(2.0, rel=1e-3)


def test_bisection_hits_2x_on_a_thinned_cnn():
    torch.manual_seed(0)
    task = get_task("digits")
    model, example = task.build_model("cnn", {"width": 32, "depth": 3}), task.example_input(1)
    groups = coupled_groups(model, example)
    scores = {g.root: group_channel_scores(g, "l1") for g in groups}

    def prune(level):
        keep = allocate(scores, level, "uniform")
        return thin(model, example, {u: k for u, k in keep.items()})

    level, factor = ratio_for_mac_target(model, example, 2.0, prune)
    assert factor == pytest.approx(2.0, rel=0.02)
    assert count_macs(model, example) / count_macs(prune(level), example) == pytest.approx(factor)


def test_bisection_errors():
    with pytest.raises(ConfigError, match="out of reach"):
        ratio_for_mac_target(None, None, 10.0, lambda r: 1000.0 * (1 - r / 2), base_macs=1000)
    with pytest.raises(ConfigError, match="factor above 1"):
        ratio_for_mac_target(None, None, 1.0, lambda r: 1.0, base_macs=1)
