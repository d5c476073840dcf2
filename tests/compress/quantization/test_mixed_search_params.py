"""Per-layer weight and activation bits of `mixed` as search parameters: parsing, regrouping into the
recipe, the wrapped layers' bit-widths, an applied sampled recipe and Optuna define-by-run."""

import optuna
import pytest
import torch

from automl.cli import main
from automl.compress import ApplyContext
from automl.compress.quantization import qat_methods
from automl.compress.quantization.qat import qat_layers
from automl.errors import ConfigError, UnknownNameError
from automl.io import parse_yaml
from automl.recipe import Recipe, apply_recipe, recipe_from_config
from automl.recipe.apply import train_with_stages
from automl.spaces import define_by_run, load_space, parse_space, sample_config
from automl.spaces.conditions import Condition
from automl.spaces.domains import Choice, Fixed, IntRange
from repo_paths import REPO

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE_FILE = REPO / "search_spaces" / "digits_cnn_mixed_bits.yaml"
PATTERN = r"re:features\.[3-9].*"  # holds dots and a backslash


def space(quantization: str, arch: str = "{family: cnn, width: 8, depth: {int: [2, 3]}}"):
    text = f"""version: 1
task: digits
arch: {arch}
train: {{epochs: 4}}
compression:
  quantization: {quantization}
objectives: {{accuracy: max}}
"""
    return parse_space(parse_yaml(text, "t.yaml"), "t.yaml")


MIXED = (r"""
    method: {choice: [qat, mixed]}
    layer_bits:
      when: {quantization.method: mixed}
      features.0: {int: [2, 8]}
      're:features\.[3-9].*': {choice: [4, 8], when: {arch.depth: 3}}
      head: 8
    layer_a_bits: {features.0: {choice: [0, 4, 8]}}""")


# --- parsing ---------------------------------------------------------------------------------

def test_each_entry_is_a_parameter_with_the_shared_and_its_own_when():
    s = space(MIXED)
    is_mixed = Condition("quantization.method", "eq", "mixed")
    params = {p.name: p for p in s.params}
    assert [n for n in s.names() if ".layer" in n] == [
        "quantization.layer_bits.features.0", f"quantization.layer_bits.{PATTERN}",
        "quantization.layer_bits.head", "quantization.layer_a_bits.features.0"]
    assert params["quantization.layer_bits.features.0"].domain == IntRange(2, 8)
    assert params["quantization.layer_bits.features.0"].conditions == (is_mixed,)
    assert params[f"quantization.layer_bits.{PATTERN}"].domain == Choice((4, 8))
    assert params[f"quantization.layer_bits.{PATTERN}"].conditions == (is_mixed, Condition("arch.depth", "eq", 3))
    assert params["quantization.layer_bits.head"].domain == Fixed(8)  # a plain value is fixed
    assert params["quantization.layer_a_bits.features.0"].conditions == ()


def test_a_fixed_mapping_stays_one_parameter():
    s = space("{method: mixed, layer_bits: {fixed: {head: 4, 're:features.*': 8}}}")
    assert s.param("quantization.layer_bits").domain == Fixed({"head": 4, "re:features.*": 8})
    assert not [n for n in s.names() if n.startswith("quantization.layer_bits.")]


def test_conditions_may_name_an_earlier_entry():
    s = space("{method: mixed, layer_bits: {head: {choice: [4, 8]}}, "
              "layer_a_bits: {head: {choice: [4, 8], when: {quantization.layer_bits.head: 8}}}}")
    for seed in range(20):
        c = sample_config(s, seed)
        assert ("quantization.layer_a_bits.head" in c) == (c["quantization.layer_bits.head"] == 8)


@pytest.mark.parametrize("quantization, key, fragment", [
    ("{method: mixed, layer_bits: {features.0: {int: [2, 9]}}}", "layer_bits.features.0.int", "out of range [2, 8]"),
    ("{method: mixed, layer_a_bits: {'re:features\\.4': {choice: [0, 9]}}}", "layer_a_bits.re:features\\.4.choice.1",
     "out of range [0, 8]"),
    ("{method: mixed, layer_bits: {head: 1}}", "layer_bits.head", "out of range [2, 8]"),
    ("{method: mixed, layer_bits: {head: {choice: [four]}}}", "layer_bits.head.choice.0", "expected a number"),
    ("{method: mixed, layer_bits: {head: {choice: [4], step: 2}}}", "layer_bits.head", "'log' and 'step' apply"),
    ("{method: mixed, layer_bits: {head: {big: 4}}}", "layer_bits.head.big", "unknown key"),
    ("{method: mixed, layer_bits: {'a/b': 4}}", "layer_bits.a/b", "free of '/'"),
    ("{method: mixed, layer_bits: {'re:(': 4}}", "layer_bits.re:(", "invalid regular expression"),
    ("{method: mixed, layer_bits: {4: 8}}", "layer_bits.4", "expected a string"),
    ("{method: mixed, layer_bits: {when: {quantization.method: mixed}}}", "layer_bits", "the mapping has no entries"),
    ("{method: mixed, layer_bits: {head: {int: [2, 8], when: {arch.dpth: 3}}}}", "layer_bits.head.when.arch.dpth",
     "not defined before this one"),
    ("{method: mixed, layer_bits: {when: {quantization.layer_bits.head: 4}, head: 4}}",
     "layer_bits.when.quantization.layer_bits.head", "not defined before this one"),
    ("{method: mixed, a_bits: {head: {int: [2, 4]}}}", "a_bits.head", "unknown key"),  # not a mapping option
])
def test_entry_errors_name_file_and_key(quantization, key, fragment):
    with pytest.raises(ConfigError) as err:
        space(quantization)
    assert err.value.file == "t.yaml"
    assert err.value.key == f"compression.quantization.{key}"
    assert fragment in str(err.value)


def test_entries_need_a_method_that_takes_the_option():
    # qat has no layer_bits: an entry that can only apply to qat is refused like any other option
    with pytest.raises(ConfigError, match="no method chosen in 'quantization.method' takes this option"):
        space("{method: qat, layer_bits: {head: 4}}")
    s = space("{method: {choice: [none, mixed]}, layer_bits: {when: {quantization.method: mixed}, head: 4}}")
    assert s.param("quantization.layer_bits.head").conditions == (Condition("quantization.method", "eq", "mixed"),)


# --- regrouping into the recipe --------------------------------------------------------------

def test_recipe_regroups_entries_whose_names_hold_dots():
    s = space(MIXED)
    config = {"arch.depth": 3, "train.epochs": 4, "quantization.method": "mixed",
              "quantization.layer_a_bits.features.0": 0, "quantization.layer_bits.head": 8,
              f"quantization.layer_bits.{PATTERN}": 4, "quantization.layer_bits.features.0": 6}
    (stage,) = recipe_from_config(s, config).stages
    assert stage.method == "mixed"
    assert stage.config.layer_bits == {"features.0": 6.0, PATTERN: 4.0, "head": 8.0}
    assert list(stage.config.layer_bits) == ["features.0", PATTERN, "head"]  # space order: the last pattern wins
    assert stage.config.layer_a_bits == {"features.0": 0.0}
    # entries of an option the chosen method does not take are dropped with the other options
    qat = recipe_from_config(s, {**config, "quantization.method": "qat"}).stages[0]
    assert qat.method == "qat" and not hasattr(qat.config, "layer_bits")


def test_recipe_round_trips_per_layer_activation_bits(tmp_path):
    s = space(MIXED)
    r = recipe_from_config(s, sample_config(s, seed=3) | {"quantization.method": "mixed"})
    r.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == r


@pytest.mark.parametrize("extra, fragment", [
    ({"quantization.layer_bits": {"head": 4}}, "given both whole and entry by entry"),
    ({"quantization.a_bits.head": 4}, "'a_bits' is not a mapping"),
    ({"quantization.layer_bits.head": 9}, "out of range [2, 8]"),
])
def test_recipe_rejects_bad_entries(extra, fragment):
    s = space("{method: mixed, layer_bits: {features.0: {int: [2, 8]}}}")
    with pytest.raises(ConfigError) as err:
        recipe_from_config(s, {"quantization.method": "mixed", "quantization.layer_bits.features.0": 4, **extra})
    assert fragment in str(err.value)


# --- Mixed with layer_a_bits -----------------------------------------------------------------

def train(task, config: str, epochs: int = 2):
    text = f"""version: 1
task: digits
arch: {{family: cnn, width: 8, depth: 2}}
train: {{epochs: {epochs}, lr: 0.01, batch_size: 32}}
stages: [{{method: mixed, start_epoch: 1, config: {config}}}]
"""
    r = Recipe.loads(text)
    return train_with_stages(r, task, ApplyContext(task=task, work_dir=".", epochs=epochs))


def spy_layers(monkeypatch) -> dict:
    seen = {}
    original = qat_methods.FakeQuantMethod._activate

    def spy(self, model, ctx):
        original(self, model, ctx)
        seen.update({n: (q.w_bits, q.a_bits, None if q.act_quant is None else q.act_quant.bits)
                     for n, q in qat_layers(model).items()})

    monkeypatch.setattr(qat_methods.FakeQuantMethod, "_activate", spy)
    return seen


def test_explicit_layer_bits_with_per_layer_activation_bits(task, monkeypatch):
    seen = spy_layers(monkeypatch)
    torch.manual_seed(0)
    config = ("{layer_bits: {'re:.*': 4, head: 8}, a_bits: 8, "
              "layer_a_bits: {'re:features.*': 6, 're:features\\.4': 4, features.0: 0, head: 5}}")
    _, (handler,) = train(task, config)
    # exact name beats patterns; the last listed pattern wins
    expected = {"features.0": (4, None), "features.4": (4, 4), "head": (8, 5)}
    assert handler.plan == expected
    assert seen == {"features.0": (4, None, None), "features.4": (4, 4, 4), "head": (8, 5, 5)}
    assert {n: (e.w_bits, e.a_bits) for n, e in handler.frozen.items()} == expected
    assert handler.frozen["features.4"].act.qmax - handler.frozen["features.4"].act.qmin == 15  # a 4-bit grid
    assert handler.stats["mixed_bits"] == "features.0:4,features.4:4,head:8"
    assert handler.stats["mixed_a_bits"] == "features.0:float,features.4:4,head:5"
    assert handler.label().endswith("a4-32 (simulated)")


def test_allocator_path_takes_layer_a_bits(task):
    torch.manual_seed(0)
    _, (handler,) = train(task, "{target_bits: 6, a_bits: 0, layer_a_bits: {head: 4}}")
    assert {n: a for n, (_, a) in handler.plan.items()} == {"features.0": None, "features.4": None, "head": 4}
    assert handler.label().endswith("a4-32 (simulated)")


def test_uniform_activation_bits_keep_the_short_label(task):
    torch.manual_seed(0)
    _, (handler,) = train(task, "{layer_bits: {'re:.*': 4}, a_bits: 4, layer_a_bits: {head: 4}}")
    assert handler.label() == "mixed w4.00a4 (simulated)"


@pytest.mark.parametrize("config, error, match", [
    ("{layer_a_bits: {head: 4.5}}", ConfigError, r"layer_a_bits\.head: layer bits must be whole numbers"),
    ("{layer_a_bits: {head: 1}}", ConfigError, r"layer_a_bits\.head: unsupported bit-width"),
    ("{layer_a_bits: {haed: 4}}", UnknownNameError, "nearest layer names: head"),
    ("{layer_bits: {head: 8}, layer_a_bits: {features.0: 4}}", ConfigError,
     r"layer_a_bits\.features\.0: layer_a_bits names no layer this stage quantizes.*quantized layers: head"),
    ("{layers: [head], layer_a_bits: {'re:features.*': 4}}", ConfigError, "names no layer this stage quantizes"),
])
def test_layer_a_bits_errors_at_prepare(task, config, error, match):
    with pytest.raises(error, match=match):
        train(task, config, epochs=1)


# --- the shipped space, applied ---------------------------------------------------------------

def test_shipped_space_checks_and_its_patterns_match(task, capsys):
    assert main(["check", str(SPACE_FILE)]) == 0
    out = capsys.readouterr().out
    assert "quantization.layer_a_bits.features.7: Choice(values=(4, 6, 8)) when arch.depth eq 3" in out
    s = load_space(SPACE_FILE)
    for seed in range(8):
        c = sample_config(s, seed)
        (stage,) = recipe_from_config(s, c).stages
        model = task.build_model("cnn", {k[5:]: v for k, v in c.items() if k.startswith("arch.")})
        convs = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert list(stage.config.layer_bits) == convs == list(stage.config.layer_a_bits)


def test_applied_sampled_recipe_has_the_sampled_bits(task, tmp_path):
    s = load_space(SPACE_FILE)
    config = sample_config(s, seed=1)
    assert config["arch.depth"] == 3  # the entries under `when: {arch.depth: 3}` are active
    config["train.epochs"] = 3  # quick: one float epoch, then quantized (finetune_epochs 2)
    recipe = recipe_from_config(s, config)
    assert recipe.stages[0].start_epoch == 1
    result = apply_recipe(recipe, tmp_path, task=task)
    layers = [k.removeprefix("quantization.layer_bits.") for k in config if k.startswith("quantization.layer_bits.")]
    w = {n: config[f"quantization.layer_bits.{n}"] for n in layers}
    a = {n: config[f"quantization.layer_a_bits.{n}"] or "float" for n in layers}
    assert result.metrics["mixed_bits"] == ",".join(f"{n}:{w[n]}" for n in layers)
    assert result.metrics["mixed_a_bits"] == ",".join(f"{n}:{a[n]}" for n in layers)
    assert "simulated" in result.metrics["precision"] and result.metrics["accuracy"] > 0.2


# --- Optuna define-by-run ---------------------------------------------------------------------

def test_optuna_define_by_run_names_round_trip():
    s = space(MIXED)
    study = optuna.create_study(directions=["maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    run = define_by_run(s)
    for i in range(6):
        trial = study.ask()
        fixed = run(trial)
        config = {**trial.params, **fixed}  # what OptunaSearch hands the trainable
        active = [p.name for p in s.params if all(c.holds(config) for c in p.conditions)]
        assert sorted(config) == sorted(active)
        study.tell(trial, [float(i)])
        if config["quantization.method"] == "mixed":
            assert trial.params["quantization.layer_bits.features.0"] in range(2, 9)
            (stage,) = recipe_from_config(s, config).stages
            assert stage.config.layer_bits["features.0"] == config["quantization.layer_bits.features.0"]
            if config["arch.depth"] == 3:
                assert f"quantization.layer_bits.{PATTERN}" in study.trials[-1].params  # stored as given
                assert stage.config.layer_bits[PATTERN] == config[f"quantization.layer_bits.{PATTERN}"]
    assert {t.params["quantization.method"] for t in study.trials} == {"qat", "mixed"}
