"""A compression search over a user's trained model: spaces with model:, the accuracy budget, the
baseline measured once, and a small real search from a checkpoint through the Python API and the CLI."""
import csv
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import automl
from automl.cli import main
from automl.errors import ConfigError
from automl.io import parse_yaml
from automl.spaces import parse_space
from automl.spaces.user import user_space
from repo_paths import BYOM_MODELS

BUILDER = f"{BYOM_MODELS}:build"
SPACE = f"""
version: 1
task: digits
model: {{builder: "{BUILDER}"}}
train: {{epochs: 1, lr: 0.001, batch_size: 64}}
compression:
  pruning:
    method: {{choice: [none, structured]}}
    mac_reduction: {{fixed: 1.5, when: {{pruning.method: structured}}}}
    round_to: {{fixed: 4, when: {{pruning.method: structured}}}}
    finetune_epochs: 1
  quantization:
    method: {{choice: [none, int8_ptq]}}
objectives: {{accuracy: max, latency_ms: min, size_kb: min}}
constraints: {{accuracy_drop: {{max: 0.05}}}}
budget: {{trials: 3, concurrency: 2, seed: 1}}
"""


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    from automl.arch.user import build_user_model, parse_model_source
    from automl.validate import Where

    torch.manual_seed(0)
    model = build_user_model(parse_model_source({"builder": BUILDER}, Where()))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(4):
        task.train_epoch(model, optimizer, task.train_loader(batch_size=32, seed=epoch))
    path = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_a_space_over_a_user_model_has_no_arch_params_and_records_the_checkpoint(trained, tmp_path):
    _, path = trained
    (tmp_path / "s.yaml").write_text(SPACE)
    space = user_space(space=tmp_path / "s.yaml", checkpoint=str(path), max_drop=0.01, epochs=0)
    assert space.model.checkpoint == str(path) and space.family == ""
    assert not any(n.startswith("arch.") for n in space.names())
    assert space.constraints["accuracy_drop"] == {"max": 0.01} and space.epochs == 0
    assert space.raw["model"]["sha256"] and space.raw["model"]["checkpoint"] == str(path)


def test_baseline_metrics_need_a_user_model():
    text = SPACE.replace(f'model: {{builder: "{BUILDER}"}}', "arch: {family: cnn, width: 8}")
    with pytest.raises(ConfigError, match="constraints.accuracy_drop: 'accuracy_drop' compares each trial"):
        parse_space(parse_yaml(text, "s.yaml"), "s.yaml")


def test_cli_asks_for_data_and_for_a_model(capsys):
    assert main(["search", "--model", BUILDER]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["search", "--max-drop", "0.01"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["search", "--model", BUILDER, "--task", "digits", "--max-drop", "2"]) == 2
    assert "[0, 1)" in capsys.readouterr().err


def test_baseline_is_measured_once_per_run_directory(trained, tmp_path, monkeypatch, task):
    from automl.search import baseline

    _, path = trained
    space = parse_space(parse_yaml(SPACE, "s.yaml"), "s.yaml")
    calls = []
    real = baseline.apply_recipe
    monkeypatch.setattr(baseline, "apply_recipe", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = baseline.measure_baseline(space, task, tmp_path, log=lambda m: None)
    again = baseline.measure_baseline(space, task, tmp_path, log=lambda m: None)
    assert calls == [1] and first == again and first["precision"] == "fp32"
    rel = baseline.relative_metrics({"accuracy": first["accuracy"] - 0.02, "latency_ms": first["latency_ms"] / 2,
                                     "size_kb": first["size_kb"] / 4}, first)
    assert rel["accuracy_drop"] == pytest.approx(0.02) and rel["speedup"] == pytest.approx(2.0)
    assert rel["size_reduction"] == pytest.approx(4.0)


@pytest.fixture(scope="module")
def api_search(trained, task, tmp_path_factory):
    model, _ = trained
    train = DataLoader(TensorDataset(*task.splits["train"]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(*task.splits["val"]), batch_size=256)
    out = tmp_path_factory.mktemp("api") / "run"
    space = tmp_path_factory.mktemp("space") / "s.yaml"
    space.write_text(SPACE)
    outcome = automl.search_compression(model, train, val, out=out, space=space, max_drop=0.05)
    yield outcome, model, train, val
    import ray

    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_search_from_a_trained_model_object(api_search, task):
    outcome, model, train, val = api_search
    run = outcome.run_dir
    baseline = json.loads((run / "baseline.json").read_text())["metrics"]
    assert baseline["accuracy"] == pytest.approx(task.evaluate(model, task.val_loader()), abs=0.01)
    rows = list(csv.DictReader((run / "trials.csv").open()))
    done = [r for r in rows if r["status"] == "completed"]
    assert len(rows) == 3 and done
    for r in done:  # every trial is compared with the one baseline
        assert float(r["accuracy_drop"]) == pytest.approx(baseline["accuracy"] - float(r["accuracy"]), abs=1e-5)
        assert float(r["speedup"]) == pytest.approx(baseline["latency_ms"] / float(r["latency_ms"]), rel=1e-4)
    report = outcome.report
    assert report["baseline"]["accuracy"] == baseline["accuracy"]
    assert "within_budget" in report and "Against the uncompressed model" in (run / "report.md").read_text()
    entry = report["front"][0]
    result, metrics = automl.apply(run / entry["recipe"], run / "applied", model=model, train_loader=train,
                                   val_loader=val)
    assert abs(metrics["accuracy"] - entry["metrics"]["accuracy"]) <= 0.02
    loaded = automl.load(run / "applied", model=type(model)())
    x = task.example_input(4)
    torch.testing.assert_close(loaded(x), result.model.eval()(x))
    with pytest.raises(ConfigError, match=f"saved compressed model is a .*{type(model).__name__}; the model to "
                                          "load it into is a .*Linear") as info:
        automl.load(run / "applied", model=torch.nn.Linear(2, 2))
    assert f"pass a fresh instance of {info.value.value}" in str(info.value)


@pytest.mark.slow
@pytest.mark.ray
def test_cli_search_and_apply_from_a_checkpoint(api_search, trained, tmp_path, capsys):
    _, path = trained
    space = tmp_path / "s.yaml"
    space.write_text(SPACE.replace("trials: 3", "trials: 2"))
    out = tmp_path / "run"
    assert main(["search", "--space", str(space), "--checkpoint", str(path), "--epochs", "0", "--out", str(out)]) == 0
    recipes = sorted((out / "recipes").glob("*.yaml"))
    assert recipes and (out / "baseline.json").is_file()
    assert main(["apply", str(recipes[0]), "--out", str(tmp_path / "model")]) == 0
    assert "automl.load" in capsys.readouterr().out
    model = automl.load(tmp_path / "model")
    assert type(model).__name__ == "Tiny"


def test_profile_commands_take_a_user_model(tmp_path, capsys):
    assert main(["profile", "measure", "--model", BUILDER, "--out", str(tmp_path / "p.yaml")]) == 2
    assert "--data" in capsys.readouterr().err
    from automl.hardware.candidates import space_layer_keys

    space = user_space(builder=BUILDER, task="digits")
    keys, counts = space_layer_keys(space, samples=6)
    assert counts["invalid"] == 0 and {"conv", "cat", "linear"} <= {k.op for k in keys}
