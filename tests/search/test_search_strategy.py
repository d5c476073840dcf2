"""budget.strategy: joint, sequential (architectures first, then compression of the best), random."""
import pytest

from automl.errors import AutoMLError, ConfigError
from automl.io import parse_yaml
from automl.recipe import recipe_from_config
from automl.search.strategy import (SEQUENTIAL_PARAM, architecture_space, best_architectures, compression_phase,
                                    compression_space, phase_of, phases)
from automl.spaces import parse_space
from automl.spaces.adapter import sample_config

SPACE = """
version: 1
task: digits
arch:
  family: cnn
  width: {choice: [8, 16]}
  depth: {int: [1, 2]}
train:
  epochs: 2
  lr: {float: [3e-3, 1e-2], log: true}
compression:
  pruning:
    method: {choice: [none, magnitude]}
    ratio: {float: [0.3, 0.6], when: {pruning.method: magnitude}}
    finetune_epochs: 1
  quantization:
    method: {choice: [none, int8_ptq]}
objectives: {accuracy: max, latency_ms: min, size_kb: min}
budget: {trials: 6, concurrency: 2, grace_epochs: 1, seed: 1, strategy: sequential}
"""


def _space(**budget):
    raw = parse_yaml(SPACE, "s.yaml")
    raw["budget"] = {**raw["budget"], **budget}
    return parse_space(raw, "s.yaml")


def _row(tid, acc, lat, width, depth=1, status="completed", **extra):
    return {"trial_id": tid, "status": status, "feasible": True,
            "metrics": {"accuracy": acc, "latency_ms": lat, "size_kb": 10.0 * width},
            "config": {"arch.width": width, "arch.depth": depth, "train.epochs": 2, "train.lr": 0.005,
                       "pruning.method": "none", "quantization.method": "none", **extra}}


def test_architecture_phase_never_compresses():
    space = architecture_space(_space())
    for seed in range(20):
        config = sample_config(space, seed)
        assert config["pruning.method"] == "none" and config["quantization.method"] == "none"
        assert "pruning.ratio" not in config
        assert recipe_from_config(space, config).stages == ()


def test_best_architectures_are_the_front_most_accurate_first():
    rows = [_row("a", 0.90, 1.0, 8), _row("b", 0.95, 2.0, 16), _row("c", 0.85, 3.0, 16, depth=2),
            _row("d", 0.97, 5.0, 16, depth=2), _row("e", 0.99, 9.0, 16, status="early_stopped")]
    picked = best_architectures(rows, _space())
    assert [r["trial_id"] for r in picked] == ["d", "b", "a"]  # c is dominated, e did not finish
    assert [r["trial_id"] for r in best_architectures(rows, _space(), limit=1)] == ["d"]


def test_compression_phase_ties_architecture_to_a_picked_trial():
    picked = [_row("a", 0.9, 1.0, 8), _row("b", 0.95, 2.0, 16, depth=2)]
    space = compression_space(_space(), picked)
    seen = set()
    for seed in range(30):
        config = sample_config(space, seed)
        source = next(r for r in picked if r["trial_id"] == config[SEQUENTIAL_PARAM])
        assert config["arch.width"] == source["config"]["arch.width"]
        assert config["arch.depth"] == source["config"]["arch.depth"]
        seen.add((config[SEQUENTIAL_PARAM], config["pruning.method"], config["quantization.method"]))
        recipe = recipe_from_config(space, config)
        assert recipe.arch == {"width": source["config"]["arch.width"], "depth": source["config"]["arch.depth"]}
    assert len({s[0] for s in seen}) == 2 and len({s[1:] for s in seen}) > 1  # compression varies


def test_phases_follow_the_journal():
    space = _space()
    first = phases(space, [])
    assert [(p.name, p.trials) for p in first] == [("architecture", 3), ("compression", 3)]
    done = [_row(t, 0.9, 1.0 + i, 8) for i, t in enumerate("abc")]
    left = phases(space, done)
    assert [p.name for p in left] == ["compression"] and left[0].finished == []
    phase = compression_phase(space, left[0], done)
    assert phase.space.param(SEQUENTIAL_PARAM).domain.values == ("a",)  # b and c dominated (slower, same acc)
    resumed = phases(space, done + [_row("x", 0.9, 1.0, 8, **{SEQUENTIAL_PARAM: "a"})])
    assert phase_of(resumed[0].finished[0]) == "compression"
    assert [p.name for p in phases(_space(strategy="joint"), done)] == ["joint"]


def test_compression_phase_without_a_finished_architecture_says_so():
    space = _space()
    failed = [_row("a", 0.9, 1.0, 8, status="error")]
    with pytest.raises(AutoMLError, match="none of the 1 architecture trials"):
        compression_phase(space, phases(space, failed)[-1], failed)


@pytest.mark.parametrize("budget, key", [({"strategy": "random", "sampler": "tpe"}, "sampler"),
                                         ({"strategy": "sequential", "trials": 1}, "trials"),
                                         ({"strategy": "greedy"}, "strategy")])
def test_bad_strategy_settings_are_refused(budget, key):
    with pytest.raises(ConfigError, match=key):
        _space(**budget)


def test_random_strategy_samples_uniformly():
    import optuna

    from automl.search.controller import make_sampler

    assert isinstance(make_sampler(_space(strategy="random").budget, 0), optuna.samplers.RandomSampler)


@pytest.mark.slow
@pytest.mark.ray
def test_sequential_search_compresses_the_best_architectures(tmp_path):
    from automl.search import run_search

    outcome = run_search(_space(trials=4), tmp_path / "run")
    first = [r for r in outcome.rows if phase_of(r) == "architecture"]
    second = [r for r in outcome.rows if phase_of(r) == "compression"]
    assert len(first) == 2 and len(second) == 2
    assert all(r["config"]["pruning.method"] == "none" and r["config"]["quantization.method"] == "none"
               for r in first)
    by_id = {r["trial_id"]: r for r in first}
    for row in second:
        source = by_id[row["config"][SEQUENTIAL_PARAM]]
        assert source["status"] == "completed"
        assert {k: row["config"][k] for k in ("arch.width", "arch.depth", "train.lr")} == \
            {k: source["config"][k] for k in ("arch.width", "arch.depth", "train.lr")}
    assert (outcome.run_dir / "trials.csv").read_text().count(SEQUENTIAL_PARAM) == 1  # one column
