"""Sensitivity analysis: one layer pruned at a time, exact rows, bit-exact restore, ratios, files, CLI."""
import csv

import pytest
import torch
import torch.nn as nn
import yaml

from automl.cli import main
from automl.compress.pruning import sensitivity as sens
from automl.errors import ConfigError
from automl.recipe import Recipe


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)            # 36 weights, 4 filters of 9
        self.fc = nn.Linear(6, 4)                 # 24 weights, 4 rows of 6

    def forward(self, x):
        return self.fc(x)


def _tiny():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():   # no exact zeros, distinct magnitudes; conv filter i has L1 norm growing with i
        model.conv.weight.copy_(torch.arange(1, 37, dtype=torch.float32).view(4, 1, 3, 3) / 10)
        model.fc.weight.copy_(torch.randn(4, 6).abs() + 0.1)
    return model


def _zeros(model):
    return sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# analyze ----------------------------------------------------------------------------------------------
def test_analyze_rows_drop_and_bit_exact_restore():
    model = _tiny().train()
    before = _snapshot(model)
    seen = []

    def evaluate(m):        # accuracy falls by 0.01 per zeroed weight: drop == pruned / 100
        seen.append((m.training, m.conv.weight.detach().clone()))
        return 1.0 - _zeros(m) / 100

    rows = sens.analyze(model, evaluate, ["conv", "re:f.*"], [0.5, 0.25, 0.75], ("element", "filter"))
    assert len(rows) == 2 * 3 * 2 and len(seen) == 1 + 12          # baseline + one evaluation per row
    assert [(r["layer"], r["granularity"], r["level"]) for r in rows[:6]] == [
        ("conv", g, lv) for g in ("element", "filter") for lv in (0.25, 0.5, 0.75)]
    by = {(r["layer"], r["granularity"], r["level"]): r for r in rows}
    # element: round(level * n) weights; filter: round(level * 4) whole filters/rows
    assert by["conv", "element", 0.5]["pruned"] == 18 and by["fc", "element", 0.25]["pruned"] == 6
    assert by["conv", "filter", 0.75]["pruned"] == 27 and by["fc", "filter", 0.5]["pruned"] == 12
    for r in rows:
        assert r["drop"] == pytest.approx(r["pruned"] / 100)
        assert r["accuracy"] == pytest.approx(1.0 - r["pruned"] / 100)
        assert r["params"] == (36 if r["layer"] == "conv" else 24)
    # the smallest-L1 filters (0 and 1) go at 0.5; elementwise the 18 smallest |w| go
    conv_filter_half = seen[1 + 4][1]
    assert conv_filter_half[:2].abs().sum() == 0 and (conv_filter_half[2:] != 0).all()
    conv_elem_half = seen[1 + 1][1].flatten()
    assert (conv_elem_half[:18] == 0).all() and (conv_elem_half[18:] != 0).all()
    assert not any(training for training, _ in seen)
    assert model.training and _same(before, model.state_dict())


def test_analyze_restores_when_evaluate_raises():
    model = _tiny().eval()
    before = _snapshot(model)
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 0.9

    with pytest.raises(RuntimeError):
        sens.analyze(model, evaluate, None, [0.5])
    assert _same(before, model.state_dict()) and not model.training


def test_analyze_uses_given_baseline_and_all_layers_by_default():
    model = _tiny()
    rows = sens.analyze(model, lambda m: 0.5, levels=[0.5], granularities=["element"], baseline=0.8)
    assert [r["layer"] for r in rows] == ["conv", "fc"]
    assert all(r["drop"] == pytest.approx(0.3) for r in rows)
    assert sens.baseline_of(rows) == pytest.approx(0.8)


@pytest.mark.parametrize("levels", [[0.0], [1.0], [-0.1, 0.5], [True], []])
def test_bad_levels(levels):
    with pytest.raises(ConfigError, match="levels"):
        sens.analyze(_tiny(), lambda m: 1.0, None, levels)


def test_bad_granularity_and_layer():
    with pytest.raises(ConfigError, match="did you mean 'filter'"):
        sens.analyze(_tiny(), lambda m: 1.0, None, [0.5], ["filters"])
    with pytest.raises(ConfigError, match="nearest layer names: conv"):
        sens.analyze(_tiny(), lambda m: 1.0, ["conv1"], [0.5])


def test_filter_mask_keeps_one_structure():
    w = torch.arange(1, 9, dtype=torch.float32).view(2, 4)
    assert sens.keep_mask(w, "filter", 0.9).tolist() == [[False] * 4, [True] * 4]
    assert int(sens.keep_mask(w, "element", 0.5).sum()) == 4


# ratios -----------------------------------------------------------------------------------------------
def _row(layer, level, acc, base=0.97, g="element", params=10):
    return {"layer": layer, "granularity": g, "level": level, "accuracy": acc, "drop": base - acc,
            "params": params, "pruned": int(level * params)}


ROWS = [_row("a", 0.2, 0.97), _row("a", 0.4, 0.96), _row("a", 0.6, 0.90),      # 0.97 - 0.96 is 0.0100...09
        _row("b", 0.2, 0.95), _row("b", 0.4, 0.90),                              # nothing tolerated
        _row("c", 0.2, 0.97), _row("c", 0.4, 0.94), _row("c", 0.6, 0.965),      # noisy: 0.6 within, 0.4 not
        _row("a", 0.2, 0.50, g="filter"), _row("b", 0.2, 0.97, g="filter")]


def test_ratios_from_sensitivity():
    assert sens.ratios_from_sensitivity(ROWS, 0.01) == {"a": 0.4, "b": 0.0, "c": 0.6}
    assert sens.ratios_from_sensitivity(ROWS, 0.0) == {"a": 0.2, "b": 0.0, "c": 0.2}
    assert sens.ratios_from_sensitivity(ROWS, 0.1) == {"a": 0.6, "b": 0.4, "c": 0.6}
    assert sens.ratios_from_sensitivity(ROWS, 0.01, "filter") == {"a": 0.0, "b": 0.2}
    with pytest.raises(ConfigError, match="no points at this granularity.*use one of: element$"):
        sens.ratios_from_sensitivity(ROWS[:8], 0.01, "filter")
    with pytest.raises(ConfigError, match="max_drop"):
        sens.ratios_from_sensitivity(ROWS, -0.01)


def test_rank_layers_most_sensitive_first():
    ranked = sens.rank_layers(ROWS)
    assert [name for name, _, _ in ranked] == ["b", "a", "c"]
    assert ranked[0][1] == pytest.approx((0.02 + 0.07) / 2) and ranked[0][2] == 10


# files ------------------------------------------------------------------------------------------------
def test_csv_round_trip_and_png(tmp_path):
    sens.write_csv(tmp_path / "s.csv", ROWS)
    with open(tmp_path / "s.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == list(sens.COLUMNS)
    back = sens.read_csv(tmp_path / "s.csv")
    assert len(back) == len(ROWS)
    for a, b in zip(back, ROWS):
        assert a["layer"] == b["layer"] and a["granularity"] == b["granularity"] and a["params"] == b["params"]
        assert a["level"] == b["level"] and a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)
    sens.plot_sensitivity(tmp_path / "s.png", ROWS)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.png"]    # no temp files left


# recipes and the CLI ------------------------------------------------------------------------------------
RECIPE = """version: 1
task: digits
arch: {family: cnn, width: 8, depth: 1}
train: {epochs: 2, lr: 0.02}
stages: %s
"""
MAGNITUDE = "[{method: magnitude, start_epoch: 1, config: {ratio: 0.5, finetune_epochs: 1}}]"


def _recipe_file(tmp_path, stages=MAGNITUDE, name="r.yaml"):
    path = tmp_path / name
    path.write_text(RECIPE % stages)
    return path


def test_per_layer_target_checks_the_recipe():
    assert sens.per_layer_target(Recipe.loads(RECIPE % MAGNITUDE), ["filter", "element"]) == (0, "element")
    with pytest.raises(ConfigError, match="no pruning stage"):
        sens.per_layer_target(Recipe.loads(RECIPE % "[]"), ["element"])
    with pytest.raises(ConfigError, match="holds threshold values, not shares"):
        sens.per_layer_target(Recipe.loads(RECIPE % "[{method: threshold}]"), ["element"])
    with pytest.raises(ConfigError, match="add element to --granularity"):
        sens.per_layer_target(Recipe.loads(RECIPE % MAGNITUDE), ["filter"])


def test_cli_end_to_end(tmp_path, capsys):
    recipe, out, new = _recipe_file(tmp_path), tmp_path / "out", tmp_path / "new.yaml"
    rc = main(["sensitivity", str(recipe), "--out", str(out), "--levels", "0.6,0.2", "--max-drop", "0.02",
               "--write-recipe", str(new)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "layers by sensitivity" in printed and "features.0" in printed
    rows = sens.read_csv(out / "sensitivity.csv")
    assert len(rows) == 2 * 2 * 2
    assert {(r["layer"], r["granularity"], r["level"]) for r in rows} == {
        (n, g, lv) for n in ("features.0", "head") for g in ("element", "filter") for lv in (0.2, 0.6)}
    assert (out / "sensitivity.png").stat().st_size > 1000
    saved = yaml.safe_load((out / "ratios.yaml").read_text())
    assert saved["version"] == 1 and saved["max_drop"] == 0.02 and saved["levels"] == [0.2, 0.6]
    assert saved["ratios"]["element"] == sens.ratios_from_sensitivity(rows, 0.02)   # csv rounding: same result
    loaded = Recipe.load(new)
    stage = loaded.stages[0]
    assert stage.method == "magnitude" and stage.config.ratio == 0.5 and stage.start_epoch == 1
    assert stage.config.per_layer == saved["ratios"]["element"]
    assert set(stage.config.per_layer) == {"features.0", "head"}
    assert loaded.metrics == {} and loaded.provenance["per_layer_from"]["max_drop"] == 0.02
    # the handler accepts the written per_layer
    from automl.tasks import get_task

    handler = stage.handler()
    handler.prepare(get_task("digits").build_model(loaded.family, loaded.arch), ctx=None)
    assert handler.final_levels == stage.config.per_layer


@pytest.mark.parametrize("extra,key,hint", [
    (["--levels", "0,0.5"], "--levels", "strictly between 0 and 1"),
    (["--levels", "0.1,x"], "--levels", "comma-separated"),
    (["--granularity", "element", "kernal"], "--granularity", "valid names: element, filter"),
    (["--layers", "feature.0"], "--layers", "nearest layer names: features.0"),
    (["--max-drop", "1.5"], "--max-drop", "[0, 1)"),
    (["--write-recipe", "SELF"], "--write-recipe", "overwrite the input recipe"),
])
def test_cli_bad_options_exit_2_before_training(tmp_path, capsys, extra, key, hint):
    recipe, out = _recipe_file(tmp_path), tmp_path / "out"
    extra = [str(recipe) if e == "SELF" else e for e in extra]
    rc = main(["sensitivity", str(recipe), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and key in err and hint in err and "Traceback" not in err
    assert not out.exists()


def test_cli_write_recipe_needs_a_pruning_stage(tmp_path, capsys):
    recipe = _recipe_file(tmp_path, stages="[]")
    rc = main(["sensitivity", str(recipe), "--out", str(tmp_path / "out"), "--write-recipe", str(tmp_path / "n.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "no pruning stage" in err and "--write-recipe" in err
    assert not (tmp_path / "out").exists()


def test_python_api_runs_what_the_cli_runs(tmp_path):
    from automl.recipe.sensitivity import run_sensitivity

    lines = []
    result = run_sensitivity(Recipe.loads(RECIPE % MAGNITUDE), tmp_path / "out", levels=[0.5], granularities=["element"],
                             write_recipe=tmp_path / "new.yaml", log=lines.append)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"sensitivity.csv", "sensitivity.png", "ratios.yaml"}
    assert set(result.ratios["element"]) == {"features.0", "head"} and result.granularity == "element"
    assert Recipe.load(tmp_path / "new.yaml").stages[result.written_stage].config.per_layer == result.ratios["element"]
    assert any("dense val accuracy" in line for line in lines)
    with pytest.raises(ConfigError) as err:   # API errors name the API's own argument
        run_sensitivity(Recipe.loads(RECIPE % MAGNITUDE), tmp_path / "bad", levels=[1.5])
    assert err.value.key == "levels" and not (tmp_path / "bad").exists()
