"""Pareto front on exact small cases."""
import math

import pytest

from automl.search.pareto import dominates, pareto_front

ACC_LAT = {"accuracy": "max", "latency_ms": "min"}


def rows(*pairs):
    return [{"accuracy": a, "latency_ms": l} for a, l in pairs]


def test_two_objectives_known_front():
    data = rows(
        (0.90, 5.0),   # 0 front
        (0.95, 8.0),   # 1 front
        (0.85, 6.0),   # 2 dominated by 0
        (0.80, 2.0),   # 3 front (fastest)
        (0.95, 9.0),   # 4 dominated by 1 (same acc, slower)
        (0.97, 20.0),  # 5 front (most accurate)
        (0.70, 2.5),   # 6 dominated by 3
    )
    assert pareto_front(data, ACC_LAT) == [0, 1, 3, 5]


def test_direction_matters():
    data = rows((0.9, 5.0), (0.8, 2.0), (0.7, 1.0))
    assert pareto_front(data, {"accuracy": "max", "latency_ms": "min"}) == [0, 1, 2]
    assert pareto_front(data, {"accuracy": "max", "latency_ms": "max"}) == [0]
    assert pareto_front(data, {"accuracy": "min", "latency_ms": "min"}) == [2]


def test_identical_points_are_all_kept():
    data = rows((0.9, 5.0), (0.9, 5.0), (0.8, 6.0))
    assert pareto_front(data, ACC_LAT) == [0, 1]


def test_equal_in_one_better_in_other_dominates():
    assert pareto_front(rows((0.9, 5.0), (0.9, 4.0)), ACC_LAT) == [1]
    assert pareto_front(rows((0.8, 4.0), (0.9, 4.0)), ACC_LAT) == [1]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "fast", True])
def test_non_finite_rows_are_dropped(bad):
    data = [{"accuracy": 0.99, "latency_ms": bad},     # would dominate everything if kept
            {"accuracy": 0.9, "latency_ms": 5.0},
            {"accuracy": 0.8, "latency_ms": 3.0}]
    assert pareto_front(data, ACC_LAT) == [1, 2]


def test_missing_key_row_is_dropped():
    data = [{"accuracy": 0.99}, {"accuracy": 0.9, "latency_ms": 5.0}, {"latency_ms": 0.1}]
    assert pareto_front(data, ACC_LAT) == [1]


def test_nan_in_the_max_objective_is_dropped():
    data = [{"accuracy": math.nan, "latency_ms": 0.1}, {"accuracy": 0.5, "latency_ms": 1.0}]
    assert pareto_front(data, ACC_LAT) == [1]


def test_all_nan_gives_empty_front():
    data = rows((math.nan, 1.0), (0.5, math.nan), (math.nan, math.nan))
    assert pareto_front(data, ACC_LAT) == []


def test_empty_and_single_row():
    assert pareto_front([], ACC_LAT) == []
    assert pareto_front(rows((0.5, 10.0)), ACC_LAT) == [0]


def test_ints_and_extra_keys_are_fine():
    data = [{"accuracy": 1, "latency_ms": 3, "note": "x"}, {"accuracy": 0, "latency_ms": 1, "other": math.nan}]
    assert pareto_front(data, ACC_LAT) == [0, 1]


def test_three_objectives():
    objectives = {"accuracy": "max", "latency_ms": "min", "size_kb": "min"}
    data = [
        {"accuracy": 0.9, "latency_ms": 5, "size_kb": 100},   # 0 front
        {"accuracy": 0.9, "latency_ms": 5, "size_kb": 50},    # 1 front, dominates 0
        {"accuracy": 0.8, "latency_ms": 1, "size_kb": 200},   # 2 front (fastest)
        {"accuracy": 0.7, "latency_ms": 6, "size_kb": 10},    # 3 front (smallest)
        {"accuracy": 0.7, "latency_ms": 6, "size_kb": 20},    # 4 dominated by 3
        {"accuracy": 0.95, "latency_ms": 9, "size_kb": 300},  # 5 front (most accurate)
    ]
    assert pareto_front(data, objectives) == [1, 2, 3, 5]


def test_single_objective_keeps_only_the_best_ties():
    data = rows((0.8, 1.0), (0.9, 2.0), (0.9, 3.0))
    assert pareto_front(data, {"accuracy": "max"}) == [1, 2]


@pytest.mark.parametrize("mode", ["maximize", "MAX", "", None])
def test_bad_mode_raises(mode):
    with pytest.raises(ValueError, match="objective mode must be 'max' or 'min'"):
        pareto_front(rows((0.5, 1.0)), {"accuracy": mode})


@pytest.mark.parametrize("a, b, expected", [
    ([1, 1], [0, 0], True),
    ([1, 0], [0, 0], True),
    ([0, 0], [0, 0], False),   # equal points do not dominate
    ([1, 0], [0, 1], False),   # a trade-off
    ([0, 0], [1, 0], False),
    ([-1.0, 2.0], [-1.0, 1.5], True),
    ([3], [2], True),
    ([2, 2, 2], [2, 2, 3], False),
])
def test_dominates(a, b, expected):
    assert dominates(a, b) is expected


def test_hypervolume_of_known_boxes():
    from automl.search.pareto import hypervolume

    assert hypervolume([(0.5, 0.5)], (1.0, 1.0)) == pytest.approx(0.25)
    assert hypervolume([(0.0, 0.5), (0.5, 0.0)], (1.0, 1.0)) == pytest.approx(0.75)
    assert hypervolume([(0.5, 0.5, 0.5)], (1.0, 1.0, 1.0)) == pytest.approx(0.125)
    assert hypervolume([(2.0, 0.0)], (1.0, 1.0)) == 0.0  # beyond the reference: counts nothing


def test_scaled_hypervolumes_grow_with_the_front_only():
    from automl.search.pareto import REFERENCE, scaled_hypervolumes

    rows = [{"acc": 0.9, "lat": 2.0}, {"acc": 0.8, "lat": 3.0}, {"acc": 1.0, "lat": 1.0}, {"acc": 0.5, "lat": 4.0}]
    volumes = scaled_hypervolumes(rows, {"acc": "max", "lat": "min"})
    assert volumes[1] == volumes[0]  # dominated: no gain
    assert volumes[2] == pytest.approx(REFERENCE ** 2)  # the ideal point (best in both)
    assert volumes[3] == volumes[2] and scaled_hypervolumes([], {"acc": "max"}) == []
