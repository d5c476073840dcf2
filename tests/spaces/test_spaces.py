"""Domains, `when` conditions, random sampling and the Optuna define-by-run adapter."""
import math
import pickle

import numpy as np
import optuna
import pytest

from automl.errors import ConfigError
from automl.spaces import define_by_run, load_default_space, parse_space, resolve, sample_config
from automl.spaces.conditions import Condition, parse_when
from automl.spaces.domains import Choice, Fixed, FloatRange, IntRange, parse_domain
from automl.validate import Where

optuna.logging.set_verbosity(optuna.logging.WARNING)

SEEDS = range(60)


def space(arch=None, train=None, compression=None):
    return parse_space({
        "version": 1, "task": "digits",
        "arch": {"family": "cnn", **(arch or {})},
        "train": {"epochs": 6, **(train or {})},
        "compression": compression or {},
        "objectives": {"accuracy": "max", "size_kb": "min"},
    }, "test.yaml")


@pytest.fixture(scope="module")
def default_space():
    return load_default_space()


# --- domains ---------------------------------------------------------------------------------

def test_parse_domain_kinds():
    w = Where("f.yaml", "arch.x")
    assert parse_domain(7, w) == (Fixed(7), None)
    assert parse_domain({"fixed": [1, 2]}, w) == (Fixed([1, 2]), None)
    assert parse_domain({"choice": ["a", "b"]}, w) == (Choice(("a", "b")), None)
    assert parse_domain({"int": [1, 9], "step": 2}, w) == (IntRange(1, 9, 2, False), None)
    assert parse_domain({"float": [1, 5]}, w) == (FloatRange(1.0, 5.0, False, None), None)
    dom, when = parse_domain({"float": [1e-4, 1e-1], "log": True, "when": {"a": 1}}, w)
    assert dom == FloatRange(1e-4, 1e-1, True, None) and when == {"a": 1}


@pytest.mark.parametrize("raw, fragment", [
    ({"choice": [1, 2], "int": [1, 2]}, "exactly one of choice / int / float / fixed"),
    ({"choice": []}, "a choice needs a non-empty list"),
    ({"choice": [1, 1]}, "choices repeat a value"),
    ({"choice": [1, 2], "log": True}, "'log' and 'step' apply to int and float ranges"),
    ({"int": [1, 5], "step": 0}, "step must be positive"),
    ({"float": [0.0, math.inf]}, "float bounds must be finite"),
    ({"int": [5, 1]}, "int range needs low < high"),
    ({"int": [True, 3]}, "expected an integer"),
    ({"float": [1, 2], "log": "yes"}, "expected a boolean"),
])
def test_parse_domain_rejects(raw, fragment):
    with pytest.raises(ConfigError) as info:
        parse_domain(raw, Where("f.yaml", "arch.x"))
    assert fragment in str(info.value)
    assert str(info.value).startswith("f.yaml: arch.x")
    assert "Fix: " in str(info.value)


def test_int_range_with_one_value_is_allowed():
    dom, _ = parse_domain({"int": [3, 3]}, Where())
    rng = np.random.default_rng(0)
    assert {dom.sample(rng) for _ in range(10)} == {3}


def test_float_samples_within_bounds():
    dom = FloatRange(0.25, 0.75)
    rng = np.random.default_rng(1)
    values = [dom.sample(rng) for _ in range(2000)]
    assert all(0.25 <= v <= 0.75 for v in values)
    assert min(values) < 0.27 and max(values) > 0.73  # the whole range is used


def test_log_float_is_log_uniform():
    dom = FloatRange(1e-4, 1e-1, log=True)
    rng = np.random.default_rng(2)
    values = np.array([dom.sample(rng) for _ in range(3000)])
    assert ((values >= 1e-4) & (values <= 1e-1)).all()
    # Each decade holds about a third of the samples (a uniform draw would put 0.9% below 1e-3).
    share_low = float((values < 1e-3).mean())
    share_mid = float(((values >= 1e-3) & (values < 1e-2)).mean())
    assert 0.28 < share_low < 0.39
    assert 0.28 < share_mid < 0.39


def test_log_int_within_bounds_and_skewed():
    dom = IntRange(1, 1000, log=True)
    rng = np.random.default_rng(3)
    values = [dom.sample(rng) for _ in range(2000)]
    assert all(isinstance(v, int) and 1 <= v <= 1000 for v in values)
    assert 0.25 < np.mean(np.array(values) < 10) < 0.42


def test_int_step_grid():
    dom, _ = parse_domain({"int": [2, 10], "step": 4}, Where())
    rng = np.random.default_rng(4)
    values = {dom.sample(rng) for _ in range(300)}
    assert values == {2, 6, 10}


def test_int_step_not_dividing_range_stays_below_high():
    dom = IntRange(0, 10, step=4)
    rng = np.random.default_rng(5)
    assert {dom.sample(rng) for _ in range(300)} == {0, 4, 8}


@pytest.mark.parametrize("step, grid", [(0.3, {0.0, 0.3, 0.6, 0.9}), (0.6, {0.0, 0.6}),
                                        (0.25, {0.0, 0.25, 0.5, 0.75, 1.0})])
def test_float_step_grid_stays_on_grid(step, grid):
    # Like Optuna: low, low + step, ... up to high; high itself only when it lies on the grid.
    dom = FloatRange(0.0, 1.0, step=step)
    rng = np.random.default_rng(6)
    values = {round(dom.sample(rng), 9) for _ in range(400)}
    assert values == grid


def test_choice_samples_every_value():
    dom = Choice(("max", "avg", "stride"))
    rng = np.random.default_rng(7)
    assert {dom.sample(rng) for _ in range(200)} == {"max", "avg", "stride"}


# --- conditions ------------------------------------------------------------------------------

@pytest.mark.parametrize("op, operand, value, expected", [
    ("eq", "magnitude", "magnitude", True), ("eq", "magnitude", "none", False),
    ("ne", "none", "magnitude", True), ("ne", "none", "none", False),
    ("in", (8, 16), 16, True), ("in", (8, 16), 32, False),
    ("not_in", (8, 16), 32, True), ("not_in", (8, 16), 8, False),
    ("gt", 2, 3, True), ("gt", 2, 2, False),
    ("ge", 2, 2, True), ("ge", 2, 1, False),
    ("lt", 0.5, 0.4, True), ("lt", 0.5, 0.5, False),
    ("le", 0.5, 0.5, True), ("le", 0.5, 0.6, False),
    ("gt", 2, "abc", False),  # incomparable types never hold
])
def test_condition_operators(op, operand, value, expected):
    assert Condition("p", op, operand).holds({"p": value}) is expected


@pytest.mark.parametrize("op", ["eq", "ne", "in", "not_in", "gt", "ge", "lt", "le"])
def test_condition_on_inactive_param_is_false(op):
    operand = (1, 2) if op in ("in", "not_in") else 1
    assert Condition("p", op, operand).holds({"q": 1}) is False


def test_parse_when_forms():
    conds = parse_when({"a": "x", "b": {"in": [1, 2]}, "c": {"ge": 0.5}}, Where("f", "k.when"), ["a", "b", "c"])
    assert conds == (Condition("a", "eq", "x"), Condition("b", "in", (1, 2)), Condition("c", "ge", 0.5))
    assert parse_when(None, Where(), []) == ()


@pytest.mark.parametrize("raw, fragment", [
    ({"a": {"eq": 1, "ne": 2}}, "write one operator per parameter"),
    ({"a": {"eq": [1, 2]}}, "'eq' compares with one scalar value"),
    ({"a": {"lt": True}}, "'lt' needs a number"),
    ({"a": {"not_in": "x"}}, "'not_in' needs a list"),
    ({"z": 1}, "not defined before this one"),
    ("a", "expected a mapping"),
])
def test_parse_when_rejects(raw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_when(raw, Where("f", "k.when"), ["a"])


def test_sample_config_respects_when(default_space):
    seen = {"magnitude": 0, "none": 0, "int8_ptq": 0}
    for seed in SEEDS:
        cfg = sample_config(default_space, seed)
        assert ("pruning.ratio" in cfg) == (cfg["pruning.method"] == "magnitude")
        assert ("quantization.mode" in cfg) == (cfg["quantization.method"] == "int8_ptq")
        if "pruning.ratio" in cfg:
            assert 0.3 <= cfg["pruning.ratio"] <= 0.95
        seen[cfg["pruning.method"]] += 1
        if cfg["quantization.method"] == "int8_ptq":
            seen["int8_ptq"] += 1
            assert cfg["quantization.mode"] in ("static", "dynamic")
    assert all(count > 0 for count in seen.values()), seen  # both branches happen


def test_sample_config_values_within_default_bounds(default_space):
    for seed in SEEDS:
        cfg = sample_config(default_space, seed)
        assert cfg["arch.width"] in (8, 16, 32, 64)
        assert cfg["arch.depth"] in (1, 2, 3, 4) and isinstance(cfg["arch.depth"], int)
        assert cfg["arch.kernel"] in (3, 5)
        assert cfg["arch.pooling"] in ("max", "avg", "stride")
        assert 1e-3 <= cfg["train.lr"] <= 1e-2
        assert cfg["train.epochs"] == 12 and cfg["train.batch_size"] == 32
        assert cfg["pruning.finetune_epochs"] == 4


def test_sample_config_is_deterministic_per_seed(default_space):
    assert sample_config(default_space, 5) == sample_config(default_space, 5)
    assert len({repr(sample_config(default_space, s)) for s in range(10)}) > 1


def test_chained_conditions():
    s = space(compression={"pruning": {
        "method": {"choice": ["none", "magnitude"]},
        "ratio": {"float": [0.1, 0.9], "when": {"pruning.method": "magnitude"}},
        # depends on a conditional parameter: inactive whenever ratio is inactive
        "scope": {"choice": ["global", "layer"], "when": {"pruning.ratio": {"gt": 0.5}}},
    }})
    states = set()
    for seed in range(200):
        cfg = sample_config(s, seed)
        if cfg["pruning.method"] == "none":
            assert "pruning.ratio" not in cfg and "pruning.scope" not in cfg
            states.add("none")
        elif cfg["pruning.ratio"] > 0.5:
            assert cfg["pruning.scope"] in ("global", "layer")
            states.add("scoped")
        else:
            assert "pruning.scope" not in cfg
            states.add("unscoped")
    assert states == {"none", "scoped", "unscoped"}


def test_conditions_on_arch_params():
    s = space(arch={"depth": {"int": [1, 4]},
                    "pooling": {"choice": ["max", "avg", "none"]},
                    "kernel": {"choice": [3, 5],
                               "when": {"arch.depth": {"ge": 3}, "arch.pooling": {"in": ["max", "avg"]}}}})
    for seed in SEEDS:
        cfg = sample_config(s, seed)
        active = cfg["arch.depth"] >= 3 and cfg["arch.pooling"] in ("max", "avg")
        assert ("arch.kernel" in cfg) == active


def test_resolve_walks_in_order_with_a_custom_pick(default_space):
    calls = []

    def pick(p):
        calls.append(p.name)
        return p.domain.examples()[-1]  # the last choice / the high bound

    cfg = resolve(default_space, pick)
    assert calls == list(cfg)
    assert cfg["pruning.method"] == "magnitude" and cfg["pruning.ratio"] == 0.95
    assert cfg["quantization.method"] == "int8_ptq" and cfg["quantization.mode"] == "dynamic"


# --- Optuna define-by-run --------------------------------------------------------------------

def test_define_by_run_with_a_real_optuna_trial(default_space):
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    fn = define_by_run(default_space)
    pruned = unpruned = 0
    for _ in range(25):
        trial = study.ask()
        fixed = fn(trial)
        assert fixed == {"train.epochs": 12, "train.batch_size": 32, "pruning.finetune_epochs": 4}
        params = trial.params
        assert not set(fixed) & set(params)  # Optuna only holds the searched values
        assert {"arch.width", "arch.depth", "arch.kernel", "arch.pooling", "train.lr",
                "pruning.method", "quantization.method"} <= set(params)
        assert ("pruning.ratio" in params) == (params["pruning.method"] == "magnitude")
        assert ("quantization.mode" in params) == (params["quantization.method"] == "int8_ptq")
        assert params["arch.width"] in (8, 16, 32, 64)
        assert 1 <= params["arch.depth"] <= 4
        assert 1e-3 <= params["train.lr"] <= 1e-2
        if "pruning.ratio" in params:
            assert 0.3 <= params["pruning.ratio"] <= 0.95
            pruned += 1
        else:
            unpruned += 1
        study.tell(trial, [0.9, 1.0, 10.0])
    assert pruned and unpruned


def test_define_by_run_distributions(default_space):
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    define_by_run(default_space)(trial)
    dist = trial.distributions
    assert isinstance(dist["train.lr"], optuna.distributions.FloatDistribution)
    assert dist["train.lr"].log and (dist["train.lr"].low, dist["train.lr"].high) == (1e-3, 1e-2)
    assert isinstance(dist["arch.depth"], optuna.distributions.IntDistribution)
    assert (dist["arch.depth"].low, dist["arch.depth"].high) == (1, 4)
    assert isinstance(dist["arch.pooling"], optuna.distributions.CategoricalDistribution)
    assert tuple(dist["arch.pooling"].choices) == ("max", "avg", "stride")


def test_define_by_run_with_fixed_trial_and_conditions():
    s = space(arch={"width": {"choice": [8, 16]}, "kernel": {"choice": [3, 5], "when": {"arch.width": 16}}},
              train={"lr": 0.005})
    fn = define_by_run(s)
    trial = optuna.trial.FixedTrial({"arch.width": 8})
    assert fn(trial) == {"train.epochs": 6, "train.lr": 0.005}
    trial = optuna.trial.FixedTrial({"arch.width": 16, "arch.kernel": 5})
    fn(trial)
    assert trial.params == {"arch.width": 16, "arch.kernel": 5}


def test_define_by_run_pickles(default_space):
    fn = pickle.loads(pickle.dumps(define_by_run(default_space)))
    trial = optuna.create_study(directions=["maximize"]).ask()
    assert fn(trial)["train.epochs"] == 12
