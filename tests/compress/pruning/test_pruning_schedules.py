"""Sparsity schedules: AGP and linear ramps by hand, frequency holds, one-shot, iterative levels."""
import pytest

from automl.compress.pruning.schedules import agp_sparsity, iterative_levels, linear_sparsity, one_shot
from automl.errors import ConfigError


def agp(step, **kw):
    return agp_sparsity(step, **{"initial": 0.0, "final": 0.8, "start": 0, "end": 10, **kw})


def test_agp_start_middle_end():
    assert agp(0) == 0.0
    assert agp(5) == pytest.approx(0.7)              # 0.8 - 0.8 * 0.5**3
    assert agp(10) == 0.8 and agp(25) == 0.8
    assert agp(7, start=2, end=12) == pytest.approx(0.7)
    assert agp(1, start=2, end=12) == 0.0            # before start: initial


def test_agp_with_initial():
    kw = dict(initial=0.2, final=0.6, start=0, end=4)
    assert agp_sparsity(1, **kw) == pytest.approx(0.43125)   # 0.6 - 0.4 * 0.75**3
    assert agp_sparsity(2, **kw) == pytest.approx(0.55)      # 0.6 - 0.4 * 0.5**3
    assert agp_sparsity(0, **kw) == pytest.approx(0.2)


def test_agp_frequency_holds_between_updates():
    values = [agp(s, frequency=5) for s in range(12)]
    assert values[:5] == [0.0] * 5
    assert values[5:10] == [pytest.approx(0.7)] * 5
    assert values[10:] == [0.8, 0.8]


def test_agp_is_monotone():
    values = [agp(s) for s in range(12)]
    assert values == sorted(values)


def test_linear():
    kw = dict(initial=0.2, final=0.6, start=0, end=4)
    assert [linear_sparsity(s, **kw) for s in range(6)] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.6])
    assert linear_sparsity(3, frequency=2, **kw) == pytest.approx(0.4)


def test_one_shot():
    assert [one_shot(s, final=0.5, at=2) for s in range(4)] == [0.0, 0.0, 0.5, 0.5]


def test_iterative_levels():
    assert iterative_levels(0.75, 2) == pytest.approx([0.5, 0.75])
    levels = iterative_levels(0.875, 3)
    assert levels == pytest.approx([0.5, 0.75, 0.875]) and levels[-1] == 0.875
    levels = iterative_levels(0.9, 5)
    remaining = [1.0] + [1 - s for s in levels]
    ratios = [b / a for a, b in zip(remaining, remaining[1:])]
    assert ratios == pytest.approx([0.1 ** 0.2] * 5) and levels[-1] == 0.9
    assert iterative_levels(0.3, 1) == [0.3]


@pytest.mark.parametrize("kw, match", [
    (dict(final=1.0), r"final sparsity must be in \[0, 1\)"),
    (dict(final=-0.1), "final sparsity"),
    (dict(initial=0.9), "initial sparsity exceeds final"),
    (dict(end=0), "end must come after start"),
    (dict(frequency=0), "frequency must be an integer >= 1"),
    (dict(start=1.5), "start must be an integer"),
])
def test_ramp_bad_arguments(kw, match):
    for fn in (agp_sparsity, linear_sparsity):
        with pytest.raises(ConfigError, match=match):
            fn(3, **{"initial": 0.0, "final": 0.8, "start": 0, "end": 10, **kw})


def test_other_bad_arguments():
    with pytest.raises(ConfigError, match="step must be an integer >= 0"):
        agp(-1)
    with pytest.raises(ConfigError, match="iterations must be an integer >= 1"):
        iterative_levels(0.5, 0)
    with pytest.raises(ConfigError, match="final sparsity"):
        iterative_levels(1.0, 3)
    with pytest.raises(ConfigError, match="at must be"):
        one_shot(0, final=0.5, at=-1)
