"""Hardware-aware search: trial costs predicted from a profile, profile/space mismatch, missing ops,
--measure-front's predicted-vs-measured table, and unchanged outputs without a profile."""
import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from automl.errors import ConfigError, ProfileError
from automl.hardware.candidates import space_layer_keys
from automl.hardware.layers import layer_cost, trace_layers
from automl.hardware.measure import build_profile
from automl.hardware.timing import Stats
from automl.hardware.predict import predict_model
from automl.hardware.profile import Correction, DeviceInfo, HardwareProfile, Protocol
from automl.io import parse_yaml
from automl.runtime import Artifact, QuantInfo
from automl.hardware.pricing import profile_precision
from automl.search.costing import Costing, load_costing, profile_report, restore_costing, save_costing
from automl.search.frontcheck import compare, measure_front
from automl.search.outputs import write_outputs
from automl.spaces import parse_space
from automl.tasks import get_task

SPACE = """
version: 1
task: digits
arch: {family: cnn, width: {choice: [8, 16]}, depth: 2}
train: {epochs: 1}
compression:
  quantization: {method: {choice: [none, int8_ptq]}}
objectives: {accuracy: max, latency_ms: min, energy_mj: min}
budget: {trials: 3, concurrency: 2, grace_epochs: 1, seed: 0}
"""
QUICK = Protocol(warmup=2, min_repeats=20, max_repeats=40, block=10, retries=0)


def make_space(text=SPACE, source="tiny.yaml"):
    return parse_space(parse_yaml(text, source), source)


def fake_chunk(chunk):
    """A synthetic device: 2 us per layer plus 10 ps per MAC, 1 us per-call overhead."""
    return ({k: Stats(0.003 + 1e-8 * layer_cost(k).macs * k.batch, 0.003, 0.004, 100) for k in chunk},
            Stats(0.001, 0.001, 0.001, 100))


def make_profile(space, path, *, precisions=("fp32", "int8_static"), drop_op=None, **device):
    keys, _ = space_layer_keys(space, samples=4)
    keys = [k for k in keys if k.precision in precisions and k.op != drop_op]
    info = DeviceInfo(**{"cpu_model": "Test CPU", "threads": 1, "runtime": "onnxruntime", "batch": 1,
                         "precisions": tuple(precisions), **device})
    prof = build_profile(keys, path, device=info, protocol=QUICK, measure_chunk=fake_chunk, progress=False,
                         space={"source": space.source, "hash": space.hash})
    prof.corrections = {p: Correction(a=1.1, b=0.0005, c=0.01, models=6, rmspe=0.04) for p in precisions}
    prof.validation = {"samples": 20, "within_10pct": 0.95, "kendall_tau": 0.91, "rmspe": 0.05, "date": "today"}
    prof.status = "complete"
    prof.save(path)
    return prof


@pytest.fixture(scope="module")
def space():
    return make_space()


@pytest.fixture(scope="module")
def profile_path(space, tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "cpu.yaml"
    make_profile(space, path)
    return path


def model_and_example(width=8):
    torch.manual_seed(0)
    task = get_task("digits")
    return task.build_model("cnn", {"width": width, "depth": 2}).eval(), task.example_input(1)


INT8 = Artifact(Path("model.onnx"), precision="int8_static", quant=QuantInfo("int8_static", w_bits=8, a_bits=8))
FP32 = Artifact(Path("model.onnx"))
MEASURED = {"accuracy": 0.9, "latency_ms": 0.05, "latency_p10_ms": 0.04, "latency_p90_ms": 0.06, "size_kb": 3.0}


def test_trial_metrics_are_predicted(space, profile_path):
    costing = load_costing(profile_path, space)
    model, x = model_and_example()
    out = costing.trial_metrics(MEASURED, model, INT8, x, space.source)
    expected = predict_model(costing.profile, model, x, "int8_static")
    assert out["latency_ms"] == pytest.approx(expected.latency_ms) and out["latency_ms"] != MEASURED["latency_ms"]
    sum_ms = sum(costing.profile.entries[t.key].latency_ms for t in trace_layers(model, x, "int8_static"))
    assert out["latency_ms"] == pytest.approx(1.1 * sum_ms + 0.0005 * expected.n_layers + 0.01)
    assert out["energy_mj"] == pytest.approx(expected.energy_mj) and out["energy_mj"] > 0
    assert out["energy_source"] == "modelled" and out["predicted_precision"] == "int8_static"
    assert out["accuracy"] == 0.9 and out["size_kb"] == 3.0
    assert not any(k.startswith("measured_") or k.startswith("latency_p") for k in out)
    kept = Costing(costing.profile, costing.source, measure_trials=True).trial_metrics(MEASURED, model, FP32, x)
    assert kept["measured_latency_ms"] == 0.05 and kept["measured_latency_p90_ms"] == 0.06
    assert kept["latency_ms"] == pytest.approx(predict_model(costing.profile, model, x, "fp32").latency_ms)


def test_profiles_price_what_the_method_says_it_deployed():
    assert [profile_precision(QuantInfo(p)) for p in ("fp32", "int8_dynamic", "int8_static")] == \
        ["fp32", "int8_dynamic", "int8_static"]
    assert profile_precision(QuantInfo(simulated=True, layer_w_bits={"head": 4})) == "fp32"
    with pytest.raises(ProfileError, match="cannot price an fp8 model.*--no-profile"):
        profile_precision(QuantInfo("fp8"))


@pytest.mark.parametrize("device, words", [
    ({"threads": 2}, r"device\.threads: the profile does not match.*device\.threads is 2 in the profile but "
                     r"the space deploys with deploy\.threads: 1.*--threads 1"),
    ({"batch": 4}, r"device\.batch: .*batch is 4 .*deploy\.batch: 1.*--batch 1"),
    ({"runtime": "torch", "threads": 2}, r"device\.threads, device\.runtime: .*runtime is 'torch'.*"
                                         r"--threads 1 --runtime onnxruntime"),
])
def test_profile_mismatch_is_a_config_error(space, tmp_path, device, words):
    path = tmp_path / "other.yaml"
    make_profile(space, path, precisions=("fp32",), **device)
    with pytest.raises(ConfigError, match=words) as info:
        load_costing(path, space)
    assert str(path) in str(info.value) and "automl profile measure --space tiny.yaml" in str(info.value)


def test_partial_profile_and_flags_without_profile(space, profile_path, tmp_path):
    prof = HardwareProfile.load(profile_path)
    prof.status = "partial"
    prof.save(tmp_path / "partial.yaml")
    with pytest.raises(ProfileError, match="status: the profile is partial.*finish it: automl profile measure"):
        load_costing(tmp_path / "partial.yaml", space)
    with pytest.raises(ConfigError, match="--measure-front: .*needs a hardware profile"):
        load_costing(None, space, measure_front=True)
    with pytest.raises(ConfigError, match="objectives.energy_mj: metric 'energy_mj' is reported only by a search "
                                          "with a hardware profile.*--profile"):
        load_costing(None, space)
    with pytest.raises(ConfigError, match="constraints.measured_latency_ms: .*--measure-trials"):
        load_costing(profile_path, make_space(SPACE + "constraints: {measured_latency_ms: {max: 1.0}}\n"))


def test_cli_refuses_a_mismatched_profile_before_starting(space, tmp_path, capsys):
    from automl.cli import main

    (tmp_path / "tiny.yaml").write_text(SPACE)
    make_profile(space, tmp_path / "t2.yaml", precisions=("fp32",), threads=2)
    out = tmp_path / "run"
    code = main(["search", "--space", str(tmp_path / "tiny.yaml"), "--profile", str(tmp_path / "t2.yaml"),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "device.threads" in err and "--threads 1" in err and not out.exists()
    assert main(["search", "--space", str(tmp_path / "tiny.yaml"), "--measure-trials", "--out", str(out)]) == 2
    assert "--measure-trials" in capsys.readouterr().err and not out.exists()


def test_missing_op_names_the_op_and_the_reprofile_command(space, tmp_path):
    import traceback

    from automl.search.triallog import error_from_traceback

    costing = load_costing(make_profile(space, tmp_path / "nopool.yaml", drop_op="maxpool"), space)
    model, x = model_and_example()
    with pytest.raises(ProfileError) as info:
        costing.trial_metrics(MEASURED, model, FP32, x, space.source)
    text = str(info.value)
    assert "no entry for maxpool (channels 8, h 8, w 8, kernel 2, stride 2, padding 0) at fp32" in text
    assert f"automl profile measure --space tiny.yaml --device cpu --threads 1 --runtime onnxruntime --out " \
           f"{tmp_path / 'nopool.yaml'}" in text
    # what trials.csv shows for a trial that raised it inside a Ray worker (Tune's error.txt)
    written = "Failure # 1 (occurred at now)\nray::ImplicitFunc.train() (pid=1, ip=x)\n" + "".join(
        traceback.format_exception(info.value))
    assert error_from_traceback(written) == " ".join(line.strip() for line in text.splitlines() if line.strip())


def _rows(space):
    base = {"accuracy": 0.9, "test_accuracy": 0.88, "size_kb": 2.0, "precision": "fp32"}
    return [
        {"trial_id": "t1", "status": "completed", "feasible": True, "error": None, "config": {
            "arch.width": 8, "arch.depth": 1, "train.epochs": 1, "quantization.method": "none"},
         "metrics": {**base, "latency_ms": 0.02, "energy_mj": 0.001, "energy_source": "modelled"}},
        {"trial_id": "t2", "status": "completed", "feasible": True, "error": None, "config": {
            "arch.width": 16, "arch.depth": 1, "train.epochs": 1, "quantization.method": "none"},
         "metrics": {**base, "accuracy": 0.95, "latency_ms": 0.04, "energy_mj": 0.003, "energy_source": "modelled"}},
        {"trial_id": "t3", "status": "error", "feasible": False, "error": "the profile has no entry for conv",
         "config": {"arch.width": 16, "arch.depth": 1, "train.epochs": 1, "quantization.method": "int8_ptq"},
         "metrics": {}},
    ]


def test_measure_front_writes_predicted_vs_measured(space, profile_path, tmp_path):
    costing = load_costing(profile_path, space, measure_front=True)
    info = profile_report(costing, space)
    rows = _rows(space)
    write_outputs(tmp_path, space, rows, wall_time_s=1.0, versions={}, profile=info)
    applied = []

    def fake_apply(recipe, work_dir, task=None):
        applied.append((recipe.provenance["trial_id"], work_dir.name))
        return SimpleNamespace(artifact=SimpleNamespace(path=work_dir / "model.onnx"),
                               metrics={"precision": "fp32", "latency_ms": 0.03, "accuracy": 0.9})
    measured = {"t1": 0.021, "t2": 0.05}   # +4.8% and -20% errors
    check = measure_front(tmp_path, space, [r for r in rows if r["status"] == "completed"], costing,
                          apply_fn=fake_apply, log=lambda m: None,
                          time_fn=lambda paths, x, prof: [measured[p.parent.name] for p in paths])
    assert applied == [("t1", "t1"), ("t2", "t2")]
    assert [r["error"] for r in check["rows"]] == pytest.approx([0.02 / 0.021 - 1, 0.04 / 0.05 - 1])
    assert check["within_10pct"] == 0.5 and check["points"] == 2 and check["same_cpu"] is False
    report = write_outputs(tmp_path, space, rows, wall_time_s=1.0, versions={}, profile=info, front_check=check)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["front_check"]["within_10pct"] == 0.5 and report["front_check"]["points"] == 2
    assert saved["profile"]["path"] == str(profile_path) and saved["profile"]["device"]["cpu_model"] == "Test CPU"
    assert saved["profile"]["validation"]["within_10pct"] == 0.95 and saved["profile"]["energy_source"] == "modelled"
    assert saved["measurement"]["latency"].startswith("predicted from the hardware profile")
    md = (tmp_path / "report.md").read_text()
    assert "## Predicted vs measured (Pareto front)" in md and "| t2 | fp32 | 0.04 | 0.05 | -20.0% |" in md
    assert "Within +-10%: 50.0% of 2 points; mean error -12.4%" in md and "another CPU" in md
    assert "## Hardware profile" in md and "95.0% within +-10%" in md and "energy_mj: predicted" in md
    assert compare([])["points"] == 0


def test_without_profile_outputs_are_unchanged(space, tmp_path):
    rows = [dict(r, metrics={k: v for k, v in r["metrics"].items() if k not in ("energy_mj", "energy_source")})
            for r in _rows(space)]
    plain = make_space(SPACE.replace("energy_mj: min", "size_kb: min"))
    report = write_outputs(tmp_path, plain, rows, wall_time_s=1.0, versions={})
    header = next(csv.reader((tmp_path / "trials.csv").open()))
    assert header == ["trial_id", "status", "feasible", "error", "traceback", "accuracy", "latency_ms", "size_kb",
                      "test_accuracy", "precision"] + plain.names()
    assert set(report) == {"space_source", "space_hash", "task", "objectives", "constraints", "trials",
                           "status_counts", "wall_time_s", "front", "best", "versions", "measurement", "search",
                           "hypervolume", "hypervolume_by_trial"}
    md = (tmp_path / "report.md").read_text()
    assert "Hardware profile" not in md and "runs of the deployed ONNX model" in md
    assert "SLOWER" not in md


def test_report_names_front_points_slower_than_their_float_form(space, tmp_path):
    rows = _rows(space)
    rows[0]["metrics"].update(precision="int8_static", speedup_vs_float=0.7, warning="SLOWER than its float form")
    rows[1]["metrics"].update(precision="int8_static", speedup_vs_float=1.8)
    write_outputs(tmp_path, space, rows, wall_time_s=1.0, versions={})
    md = (tmp_path / "report.md").read_text()
    assert "SLOWER than its own fp32 form" in md and "t1 (0.70x)" in md and "t2 (" not in md


def test_run_dir_keeps_the_costing_for_resume(space, profile_path, tmp_path):
    costing = load_costing(profile_path, space, measure_trials=True)
    save_costing(tmp_path, costing)
    back = restore_costing(tmp_path)
    assert back.source == str(profile_path) and back.measure_trials and not back.measure_front
    assert back.profile.entries == costing.profile.entries and back.profile.source == str(profile_path)
    assert restore_costing(tmp_path / "none") is None


@pytest.mark.slow
@pytest.mark.ray
def test_profiled_search_end_to_end(space, tmp_path):
    """3 trials on an fp32-only profile: fp32 trials report predicted costs, int8 trials fail with the
    missing-entry error in trials.csv, and the front is re-applied and measured."""
    from automl.search import run_search

    path = tmp_path / "fp32.yaml"
    make_profile(space, path, precisions=("fp32",))
    try:
        outcome = run_search(space, tmp_path / "run", profile=path, measure_trials=True, measure_front=True)
    finally:
        import ray

        ray.shutdown()
    run = outcome.run_dir
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert len(rows) == 3
    done = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] == "error"]
    assert done and failed, "seed 0 samples both fp32 and int8 trials"
    assert all(r["quantization.method"] == "none" for r in done)
    assert all(r["quantization.method"] == "int8_ptq" for r in failed)
    for r in done:
        assert float(r["latency_ms"]) > 0 and float(r["energy_mj"]) > 0 and float(r["measured_latency_ms"]) > 0
        assert r["energy_source"] == "modelled" and r["predicted_precision"] == "fp32"
    for r in failed:
        assert "no entry for conv" in r["error"] and "int8_static" in r["error"]
        assert f"automl profile measure --space tiny.yaml --device cpu --threads 1 --runtime onnxruntime " \
               f"--out {path}" in r["error"]
    assert "latency_p10_ms" not in rows[0] and "measured_latency_p10_ms" in rows[0]
    report = json.loads((run / "report.json").read_text())
    check = report["front_check"]
    assert check["points"] == len(report["front"]) >= 1
    timing = report["timing"]  # the front check is timed apart from the controller's overhead
    assert 0 < timing["front_check_s"] < timing["after_last_trial_s"]
    assert timing["overhead_s"] == pytest.approx(timing["wall_s"] - timing["trials_s"] - timing["front_check_s"],
                                                 abs=0.02)
    for point in check["rows"]:
        assert point["measured_ms"] > 0 and math.isfinite(point["error"])
    assert report["profile"]["path"] == str(path)
    assert (run / "profile.yaml").is_file() and (run / "search_options.yaml").is_file()
    assert "## Predicted vs measured" in (run / "report.md").read_text()


def test_thinned_candidate_has_the_shapes_structured_pruning_produces(tmp_path):
    """Candidates (what profiles are measured and validated on) keep a multiple of round_to channels
    per group, as the structured method does: 24 -> 14 kept -> 16, 48 -> 29 kept -> 32."""
    from automl.compress.pruning.shapes import thinned_count
    from automl.hardware.candidates import build_candidate
    from automl.recipe import apply_recipe, recipe_from_config

    assert [thinned_count(c, r, q) for c, r, q in [(24, 0.4, 8), (48, 0.4, 8), (16, 0.5, 16), (16, 0.5, 1),
                                                   (8, 0.95, 1)]] == [16, 32, 16, 8, 1]
    text = ("version: 1\ntask: digits\narch: {family: cnn, width: 24, depth: 2}\ntrain: {epochs: 2}\n"
            "compression:\n  pruning: {method: structured, ratio: 0.4, finetune_epochs: 1, round_to: 8}\n"
            "objectives: {accuracy: max, latency_ms: min}\n")
    pruned = make_space(text)
    config = {p.name: p.domain.value for p in pruned.params}
    shapes = lambda layers: [(t.key["in_ch"], t.key["out_ch"]) for t in layers if t.key.op == "conv"]  # noqa
    candidate = build_candidate(pruned, config)
    torch.manual_seed(0)
    result = apply_recipe(recipe_from_config(pruned, config), tmp_path, task=get_task("digits"))
    real = trace_layers(result.model, get_task("digits").example_input(1))
    assert shapes(candidate.layers) == shapes(real) == [(1, 16), (16, 32)]


def test_received_run_dir_cannot_point_resume_at_other_files(space, profile_path, tmp_path):
    """search_options.yaml names no path that is read: a copy outside the run directory, a symlink
    and a malformed options file are refused; the secret's content never reaches a message."""
    from automl.errors import RunDirError
    from automl.search.costing import OPTIONS_FILE, PROFILE_COPY

    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    run = tmp_path / "run"
    run.mkdir()
    save_costing(run, load_costing(profile_path, space))
    options = run / OPTIONS_FILE
    options.write_text(options.read_text().replace(f"profile_copy: {PROFILE_COPY}", "profile_copy: ../secret.txt"))
    assert restore_costing(run).source == str(profile_path)  # the stored path is not followed
    (run / PROFILE_COPY).unlink()
    (run / PROFILE_COPY).symlink_to(secret)
    with pytest.raises(RunDirError) as info:
        restore_costing(run)
    assert "plain file inside the run directory" in str(info.value) and "TOP-SECRET" not in str(info.value)
    options.write_text("- a list\n")
    with pytest.raises(RunDirError, match="not a search options file"):
        restore_costing(run)


def _cli(*argv):
    from automl.cli import main

    return main(list(argv))


def test_profile_validate_refuses_before_measuring(space, tmp_path, capsys):
    """Another thread count, fewer samples than the stored figures, an --out that is a file: exit 2
    and the profile's stored figures untouched."""
    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(SPACE)
    other = tmp_path / "threads2.yaml"
    make_profile(space, other, threads=2)
    before = other.read_text()
    assert _cli("profile", "validate", "--profile", str(other), "--space", str(space_file), "--samples", "1") == 2
    assert "device.threads is 2 in the profile" in capsys.readouterr().err and other.read_text() == before
    good = tmp_path / "good.yaml"
    make_profile(space, good)
    before = good.read_text()
    assert _cli("profile", "validate", "--profile", str(good), "--space", str(space_file), "--samples", "1") == 2
    err = capsys.readouterr().err
    assert "from 20 samples" in err and "--replace-figures" in err and good.read_text() == before
    (tmp_path / "taken").write_text("mine")
    assert _cli("profile", "validate", "--profile", str(good), "--space", str(space_file), "--samples", "30",
                "--out", str(tmp_path / "taken")) == 2
    assert "is an existing file" in capsys.readouterr().err and (tmp_path / "taken").read_text() == "mine"


def test_profile_model_keeps_an_existing_file(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert _cli("profile", "model", "--accelerator", "bitfusion", "--out", str(mine)) == 2
    assert "exists; it would be overwritten" in capsys.readouterr().err and mine.read_text() == "mine"
    assert _cli("profile", "model", "--accelerator", "bitfusion", "--out", str(mine / "p.yaml")) == 2
    assert "is a file" in capsys.readouterr().err


def test_early_exit_trials_are_priced_by_their_typed_exit_shares(space, profile_path):
    """The exit shares reach the profile as numbers on the deployed artifact, not as text in metrics."""
    from automl.compress.early_exit.model import EarlyExitConfig, early_exit_from_config

    costing = load_costing(profile_path, space)
    model, x = model_and_example()
    exits = early_exit_from_config(EarlyExitConfig(exits=1), model, x).eval()
    priced = {share: costing.trial_metrics(MEASURED, exits, Artifact(Path("m.json"), exit_shares=(share,)), x)
              for share in (0.0, 0.6)}
    assert priced[0.6]["predicted_exit_reach"] == "1.000,0.400"
    assert priced[0.6]["latency_ms"] < priced[0.0]["latency_ms"]
    assert "predicted_exit_reach" not in costing.trial_metrics(MEASURED, model, FP32, x)
