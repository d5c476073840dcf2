"""The modelled BitFusion-like accelerator: bit-brick scaling, memory-bound layers, energy by hand, the
modelled profile (YAML round trip, CLI) and pricing quantized candidates layer by layer."""
from pathlib import Path

import pytest
import torch

from automl.cli import main
from automl.compress import ApplyContext
from automl.errors import ConfigError, ProfileError
from automl.hardware import energy
from automl.hardware.accelerator import (NATIVE_PRECISIONS, AcceleratorConfig, bricks_per_mac,
                                         build_modelled_profile, dram_bytes, float_precision, fused_bits, layer_model,
                                         mac_pj)
from automl.hardware.layers import LayerKey, bit_pair, trace_layers
from automl.hardware.predict import assign_precisions, predict_model, price_layer
from automl.hardware.profile import HardwareProfile
from automl.io import dump_yaml, load_yaml, parse_yaml
from automl.recipe import Recipe
from automl.recipe.apply import train_with_stages
from automl.runtime import Artifact, QuantInfo
from automl.search.costing import Costing, load_costing, profile_report, restore_costing, save_costing
from automl.spaces import parse_space
from repo_paths import REPO

CFG = AcceleratorConfig()
SPACE = """
version: 1
task: digits
arch: {family: cnn, width: {choice: [8, 16]}, depth: 2}
train: {epochs: 1}
compression:
  quantization: {method: {choice: [mixed, qat]}, finetune_epochs: 1}
objectives: {accuracy: max, latency_ms: min, energy_mj: min}
budget: {trials: 2, concurrency: 1, grace_epochs: 1, seed: 0}
"""
RECIPE = """version: 1
task: digits
arch: {family: cnn, width: 8, depth: 2}
train: {epochs: 1, lr: 0.01, batch_size: 32}
stages: [%s]
"""


def conv(precision="w8a8", **kw):
    base = dict(in_ch=256, out_ch=64, h=16, w=16, kernel=3, stride=1, padding=1, groups=1, bn=True, act="relu")
    return LayerKey.make("conv", precision, **{**base, **kw})


def linear(precision="w8a8", i=1024, o=256):
    return LayerKey.make("linear", precision, in_features=i, out_features=o, bn=False, act="none")


def make_space(text=SPACE):
    return parse_space(parse_yaml(text, "tiny.yaml"), "tiny.yaml")


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf") / "bf.yaml"
    build_modelled_profile(make_space(), samples=4).save(path)
    return path


def trained(task, stage: str):
    torch.manual_seed(0)
    model, handlers = train_with_stages(Recipe.loads(RECIPE % stage), task, ApplyContext(task=task, work_dir=".",
                                                                                         epochs=1))
    if not handlers:
        return model, ({}, Artifact(Path("model.onnx")))
    return model, (dict(handlers[0].stats), Artifact(Path("model.onnx"), precision=handlers[0].label(),
                                                     quant=handlers[0].quant_info()))


def test_precision_strings_and_fused_widths():
    assert bit_pair("w4a8") == (4, 8) and bit_pair("w16a2") == (16, 2) and bit_pair("fp32") is None
    assert bit_pair("w0a8") is None and bit_pair("w17a8") is None
    for bad in ("w0a8", "w4a17", "int4", "w4"):
        with pytest.raises(ConfigError, match="unknown precision"):
            LayerKey.make("gap", bad, channels=4, h=2, w=2)
    assert [fused_bits(b) for b in (1, 2, 3, 4, 5, 7, 8, 9, 16)] == [2, 2, 4, 4, 8, 8, 8, 16, 16]
    with pytest.raises(ConfigError, match="no fused mode"):
        fused_bits(17)
    assert [bricks_per_mac(*p) for p in [(2, 2), (4, 4), (8, 8), (2, 8), (8, 4), (16, 16), (3, 5)]] == \
        [1, 4, 16, 4, 8, 64, 8]
    assert len(NATIVE_PRECISIONS) == 16 and "w2a8" in NATIVE_PRECISIONS


def test_bit_bricks_scale_compute_bound_layers():
    """256 input channels fill the 16 rows at every width: w4a4 is 4x and w2a2 16x faster than w8a8."""
    m8, m4, m2 = (layer_model(conv(p), CFG) for p in ("w8a8", "w4a4", "w2a2"))
    # 16*16 outputs x 9 taps x ceil(64/32) column tiles x ceil(256 * bricks / (16 rows * 16 bricks))
    assert (m8.compute_cycles, m4.compute_cycles, m2.compute_cycles) == (73_728, 18_432, 4_608)
    assert all(m.bound == "compute" for m in (m8, m4, m2))
    assert m8.latency_ms == pytest.approx(73_728 / 500e3)
    assert m8.latency_ms / m4.latency_ms == pytest.approx(4.0) and m8.latency_ms / m2.latency_ms == pytest.approx(16.0)
    # 16-bit operands by temporal fusion: 4x the 8-bit cycles; 3-bit / 5-bit run as 4-bit / 8-bit
    assert layer_model(conv("w16a16"), CFG).compute_cycles == 4 * 73_728
    assert layer_model(conv("w3a5"), CFG).compute_cycles == layer_model(conv("w4a8"), CFG).compute_cycles
    # a narrow layer leaves rows idle: 32 input channels fill the rows at w4a4, so w2a2 gains nothing more
    narrow = [layer_model(conv(p, in_ch=32, h=8, w=8), CFG).compute_cycles for p in ("w8a8", "w4a4", "w2a2")]
    assert narrow == [64 * 9 * 2 * 2, 64 * 9 * 2, 64 * 9 * 2]
    # fewer input channels than rows (the first layer): im2col, the 3x3 window joins the reduction
    assert layer_model(conv(in_ch=1, out_ch=8, h=8, w=8), CFG).compute_cycles == 64 * 1 * 1


def test_memory_bound_layer():
    """A batch-1 fully connected layer reads each weight once: DRAM-bound, so 4x fewer bricks gain ~2x."""
    m8 = layer_model(linear("w8a8"), CFG)
    # 1024*256 one-byte weights + 256 32-bit biases + 1024 input bytes + 256 output bytes
    assert dram_bytes(linear("w8a8"), CFG) == 262_144 + 1024 + 1024 + 256
    assert (m8.compute_cycles, m8.memory_cycles) == (8 * 64, -(-264_448 // 24))
    assert m8.bound == "memory" and m8.latency_ms == pytest.approx(11_019 / 500e3)
    m4 = layer_model(linear("w4a4"), CFG)
    assert m4.memory_cycles == -(-(131_072 + 1024 + 512 + 128) // 24) and m4.bound == "memory"
    assert m8.latency_ms / m4.latency_ms == pytest.approx(1.99, abs=0.01)
    # weights (147.7 KB) and input (64 KB) both exceed half their buffers: the input is re-read per weight tile
    assert dram_bytes(conv("w8a8"), CFG) == 147_712 + 65_536 * 5 + 16_384


def test_energy_by_hand():
    key = linear("w4a8", i=32, o=16)
    m = layer_model(key, CFG)
    assert mac_pj(4, 8, CFG) == pytest.approx(energy.mac_pj((4, 8))) == pytest.approx(0.2)
    assert m.compute_pj == pytest.approx(512 * 0.2)
    # DRAM: 512 4-bit weights + 16 32-bit biases = 320 B, 32 input bytes, 16 output bytes
    assert m.dram_bytes == 368 and m.dram_pj == pytest.approx(368 * 8 * 20.0)
    # SRAM bits: weight reads 512*4, input reads 512*8/16 columns, 16 outputs x 1 pass x 2 x 32, DRAM fills 368*8
    assert m.sram_bits == 2048 + 256 + 1024 + 2944 and m.sram_pj == pytest.approx(6272 * 5.0 / 32)
    assert m.energy_mj == pytest.approx((102.4 + 980.0 + 58_880.0) * 1e-9)
    assert (m.compute_cycles, m.memory_cycles, m.bound) == (1, 16, "memory")
    assert m.latency_ms == pytest.approx(16 / 500e3)


def test_no_float_kernel_and_float_layers():
    with pytest.raises(ProfileError, match=r"no kernel for linear .* at fp32.*Fix: price the layer at an integer"):
        layer_model(linear("fp32"), CFG)
    assert float_precision(CFG, 4, None) == "w4a16" and float_precision(CFG, None, None) == "w16a16"
    strict = AcceleratorConfig(float_bits=0)
    assert float_precision(strict, 4, 8) == "w4a8"
    with pytest.raises(ProfileError, match="accelerator.float_bits: layer 'head' computes in float"):
        float_precision(strict, 4, None, where="layer 'head'")


def test_profile_yaml_round_trip(profile_path, tmp_path):
    prof = HardwareProfile.load(profile_path)
    assert prof.modelled and prof.device.kind == "accelerator" and prof.device.runtime == "bitfusion_model"
    assert prof.accelerator == CFG and prof.status == "complete" and prof.space["source"] == "tiny.yaml"
    assert prof.entries and all(e.energy_source == "modelled" and k.precision == "w8a8"
                                for k, e in prof.entries.items())
    prof.save(tmp_path / "again.yaml")
    back = HardwareProfile.load(tmp_path / "again.yaml")
    assert back.entries == prof.entries and back.accelerator == prof.accelerator and back.device == prof.device
    key = next(k for k in prof.entries if k.op == "conv")
    assert price_layer(prof, key).how == "exact"
    other = price_layer(prof, key.replace(precision="w2a4", out_ch=48))   # neither stored: the model prices it
    assert other.how == "modelled" and other.energy_source == "modelled"
    assert other.latency_ms == layer_model(key.replace(precision="w2a4", out_ch=48), CFG).latency_ms
    assert "automl profile model --accelerator bitfusion --space tiny.yaml --batch 1" in prof.reprofile_command()

    def broken(change):
        data = load_yaml(profile_path)
        change(data)
        (tmp_path / "bad.yaml").write_text(dump_yaml(data))
        return tmp_path / "bad.yaml"
    with pytest.raises(ProfileError, match="device: a modelled accelerator profile needs"):
        HardwareProfile.load(broken(lambda d: d.pop("accelerator")))
    with pytest.raises(ProfileError, match="entries.0: an accelerator profile holds modelled integer-pair"):
        HardwareProfile.load(broken(lambda d: d["entries"][0].update(precision="fp32")))
    with pytest.raises(ProfileError, match="accelerator.cols: out of range"):
        HardwareProfile.load(broken(lambda d: d["accelerator"].update(cols=0)))


def test_mixed_precision_model_priced_layer_by_layer(profile_path, task):
    model, (stats, artifact) = trained(task, "{method: mixed, start_epoch: 0, config: {layer_bits: "
                                          "{'re:features.*': 3, features.4: 5, head: 8}, finetune_epochs: 1}}")
    prof = HardwareProfile.load(profile_path)
    x = task.example_input(1)
    out = Costing(prof, str(profile_path)).trial_metrics({"accuracy": 0.5, "latency_ms": 9.0, **stats}, model, artifact, x)
    assert out["predicted_layer_bits"] == "features.0:w3a8,features.4:w5a8,head:w8a8"
    assert out["predicted_precision"] == "w3a8+w5a8+w8a8"
    assert out["energy_source"] == "modelled" and out["latency_source"] == "modelled"
    # by hand: every layer from the model at its own bits; pools and the GAP at the next layer's bits
    layers = trace_layers(model, x, free_input_quant=True)
    assert [t.input_bits for t in layers if t.key.op in ("conv", "linear")] == [8, 8, 8]
    keys = [t.key for t in assign_precisions(layers, {"features.0.layer": "w3a8", "features.4.layer": "w5a8",
                                                       "head.layer": "w8a8"})]
    assert [k.precision for k in keys] == ["w3a8", "w5a8", "w5a8", "w8a8", "w8a8"]   # conv, pool, conv, gap, fc
    assert out["latency_ms"] == pytest.approx(sum(layer_model(k, CFG).latency_ms for k in keys), rel=1e-5)
    assert out["energy_mj"] == pytest.approx(sum(layer_model(k, CFG).energy_mj for k in keys), rel=1e-5)
    # this tiny model is bound by 8-bit activation traffic: fewer weight bits save energy, not time
    uniform = predict_model(prof, model, x, "w8a8")
    assert out["energy_mj"] < uniform.energy_mj and out["latency_ms"] <= uniform.latency_ms
    assert uniform.latency_source == "modelled"


def test_qat_binary_and_float_candidates(profile_path, task):
    prof = HardwareProfile.load(profile_path)
    costing, x = Costing(prof, str(profile_path)), task.example_input(1)
    cases = [("{method: qat, start_epoch: 0, config: {w_bits: 4, a_bits: 4, finetune_epochs: 1}}",
              "features.0:w8a8,features.4:w4a4,head:w8a8"),          # first / last kept at int8
             ("{method: binary, start_epoch: 0, config: {finetune_epochs: 1}}",
              "features.0:w16a16,features.4:w1a16,head:w16a16"),     # first / last float, float inputs
             ("", "features.0:w16a16,features.4:w16a16,head:w16a16")]
    for stage, bits in cases:
        model, (stats, artifact) = trained(task, stage)
        assert costing.trial_metrics(stats, model, artifact, x)["predicted_layer_bits"] == bits, stage
    model, _ = trained(task, "")
    int8 = Artifact(Path("model.onnx"), precision="int8_static", quant=QuantInfo("int8_static", w_bits=8, a_bits=8))
    assert costing.trial_metrics({}, model, int8, x)["predicted_precision"] == "w8a8"
    strict = HardwareProfile.load(profile_path)
    strict.accelerator = AcceleratorConfig(float_bits=0)
    with pytest.raises(ProfileError, match="layer 'features.0' \\(deployed as 'fp32'\\) computes in float"):
        Costing(strict, "strict.yaml").trial_metrics({}, model, Artifact(Path("model.onnx")), x)


def test_costing_checks_and_report(profile_path, tmp_path):
    space = make_space(SPACE + "deploy: {runtime: onnxruntime, threads: 2, batch: 1}\n")
    costing = load_costing(profile_path, space)        # threads and runtime are the CPU's: not compared
    save_costing(tmp_path, costing)                    # the run directory's copy keeps the model
    assert restore_costing(tmp_path).profile.accelerator == CFG
    report = profile_report(costing, space)
    assert report["latency_source"] == "modelled" and report["energy_source"] == "modelled"
    assert report["metric_sources"]["latency_ms"].startswith("MODELLED, not measured")
    assert report["metric_sources"]["energy_mj"].startswith("MODELLED, not measured")
    with pytest.raises(ProfileError, match=r"device\.batch is 1 in the profile.*automl profile model "
                                           r"--accelerator bitfusion --space tiny.yaml --batch 4"):
        load_costing(profile_path, make_space(SPACE + "deploy: {batch: 4}\n"))
    with pytest.raises(ConfigError, match="--measure-front times the Pareto front on this CPU"):
        load_costing(profile_path, space, measure_front=True)


def test_cli_profile_model(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(SPACE)
    out = tmp_path / "p.yaml"
    assert main(["profile", "model", "--accelerator", "bitfusion", "--space", str(tmp_path / "tiny.yaml"),
                 "--samples", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layer shapes at w8a8" in text and "MODELLED" in text
    prof = HardwareProfile.load(out)
    assert prof.modelled and prof.entries and prof.device.batch == 1
    assert main(["profile", "model", "--accelerator", "bitfuzion", "--out", str(tmp_path / "x.yaml")]) == 2
    assert main(["profile", "model", "--accelerator", "bitfusion", "--reference", "fp32",
                 "--space", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "y.yaml")]) == 2
    err = capsys.readouterr().err
    assert "--accelerator: unknown accelerator" in err and "did you mean 'bitfusion'" in err
    assert "reference: the reference precision is an integer pair" in err
    assert not (tmp_path / "x.yaml").exists()


def test_shipped_profile_matches_the_model():

    from automl.hardware.accelerator import model_entry

    prof = HardwareProfile.load(REPO / "hardware_profiles" / "bitfusion_modelled.yaml")
    assert prof.modelled and prof.status == "complete" and prof.accelerator == CFG and len(prof.entries) >= 50
    assert all(model_entry(k, CFG) == e for k, e in prof.entries.items())


def test_modelled_profile_cannot_be_validated_and_reports_say_modelled(tmp_path):

    from automl.hardware.validate import validate_profile
    from automl.search.outputs import _profile_markdown
    from automl.spaces import load_default_space

    profile = HardwareProfile.load(REPO / "hardware_profiles" / "bitfusion_modelled.yaml")
    with pytest.raises(ConfigError, match="modelled profile has no device"):
        validate_profile(profile, load_default_space(), tmp_path, samples=2, progress=False)
    info = {"device": {"runtime": "bitfusion_model"}, "validation": {}, "path": "p.yaml", "entries": 3,
            "latency_source": "modelled", "metric_sources": {"latency_ms": "MODELLED"}}
    text = "\n".join(_profile_markdown(info))
    assert "MODELLED, not measured" in text and "validation: none recorded" not in text
