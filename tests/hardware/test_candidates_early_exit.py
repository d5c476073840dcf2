"""Early-exit, pruned and quantized candidates in profile measurement and validation: exit heads' layers
are enumerated, each early-exit candidate gets a real exit distribution, and on a synthetic device
the prediction of its expected latency is exact."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from automl.compress.early_exit.model import EarlyExitModel, exit_indices
from automl.errors import ConfigError
from automl.compress.early_exit.method import deployed_pools
from automl.hardware.candidates import InvalidCandidate, build_candidate, space_layer_keys
from automl.hardware.layers import LayerKey, layer_cost
from automl.hardware.measure import make_entry, measure_early_exit
from automl.hardware.timing import Stats
from automl.hardware.predict import fit_handoff, reach_probabilities
from automl.hardware.profile import DeviceInfo, HardwareProfile, Protocol
from automl.hardware.validate import (calibrate, calibrate_handoff, exit_inputs, exit_thresholds, plan_exits,
                                      sample_candidates, validate_profile)
from automl.spaces import parse_space
from automl.tasks import get_task

DEVICE = DeviceInfo(cpu_model="Synthetic", threads=1, runtime="onnxruntime", precisions=("fp32",), batch=1,
                    l2_cache_kb=0)
OVERHEAD = 0.004
QUICK = Protocol(warmup=1, min_repeats=3, max_repeats=6, block=3, stable_rounds=1, chunk=4)


def synthetic_ms(key: LayerKey) -> float:
    return 2e-6 * layer_cost(key).macs + 1e-3


def whole(s: float, n: int) -> float:
    """One deployed graph on the synthetic device: effects on the sum, per layer and per call."""
    return 0.8 * s + 0.003 * n + 0.05


def profile_of(keys) -> HardwareProfile:
    prof = HardwareProfile(device=DEVICE, protocol=Protocol(overhead_ms=OVERHEAD))
    for k in keys:
        t = synthetic_ms(k) + OVERHEAD
        prof.entries[k] = make_entry(k, Stats(t, t, t, 100), OVERHEAD)
    return prof


def graph_ms(layers) -> float:
    return whole(sum(synthetic_ms(t.key) for t in layers), len(layers))


def exits_space(**compression):
    raw = {"version": 1, "task": "digits",
           "arch": {"family": "cnn", "width": {"choice": [8, 16]}, "depth": {"int": [2, 3]}, "kernel": 3,
                    "pooling": "max"},
           "train": {"epochs": 2},
           "compression": {"early_exit": {"method": {"choice": ["none", "exits"]},
                                          "exits": {"int": [1, 2], "when": {"early_exit.method": "exits"}},
                                          "head_pool": {"choice": [1, 2], "when": {"early_exit.method": "exits"}}},
                           **compression},
           "objectives": {"accuracy": "max", "latency_ms": "min"}}
    return parse_space(raw, "exits.yaml")


EE = {"arch.width": 8, "arch.depth": 3, "early_exit.method": "exits", "early_exit.exits": 1,
      "early_exit.head_pool": 2}


@pytest.fixture(scope="module")
def space():
    return exits_space()


def test_early_exit_candidate_is_priced_over_its_segment_graphs(space):
    cand = build_candidate(space, EE)
    plain = build_candidate(space, {k: v for k, v in EE.items() if not k.startswith("early_exit.")})
    assert isinstance(cand.model, EarlyExitModel) and cand.early_exit.exits == 1 and cand.notes["exit_after"] == [1]
    assert len(cand.segments) == len(cand.segment_layers) == 2
    keys = {t.key for t in cand.layers}
    # the exit head after block 1 (16 channels on a 2x2 map) pools to its 2x2 grid: nothing to pool, a Linear
    # of 16 x 2 x 2 features; the final head is the plain model's
    head = [t.key for t in cand.segment_layers[0]][-1]
    assert head.op == "linear" and head["in_features"] == 16 * 2 * 2 and head["out_features"] == 10
    assert {t.key for t in plain.layers} <= keys and head not in {t.key for t in plain.layers}
    assert [t.key for t in cand.backbone().layers] == [t.key for t in plain.layers]


def test_exit_heads_pool_to_their_grid_as_the_deployed_avgpool(space):
    cand = build_candidate(space, {**EE, "early_exit.exits": 2})   # exits after blocks 0 (4x4 maps) and 1
    first = [t.key for t in cand.segment_layers[0]]
    pool = next(k for k in first if k.op == "avgpool")
    assert (pool["h"], pool["kernel"], pool["stride"], pool["padding"]) == (4, 2, 2, 0)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():   # the swapped pool computes what AdaptiveAvgPool2d to the grid computes
        h = cand.model.segments[0](x)
        assert torch.allclose(cand.model.exit_heads[0].net[0](h), nn.AdaptiveAvgPool2d(2)(h))


def test_grid_that_does_not_divide_the_map_is_refused():
    x = torch.randn(2, 1, 8, 8)
    blocks = [nn.Sequential(nn.Conv2d(1, 4, 3)), nn.Sequential(nn.Conv2d(4, 4, 3))]   # 8 -> 6 -> 4
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    ee = EarlyExitModel(blocks, head, exits=[0], example=x, head_pool=4).eval()
    with pytest.raises(ConfigError, match="6x6 map to a 4x4 grid") as err:
        deployed_pools(ee, x)
    assert err.value.key == "early_exit.head_pool"


def test_space_keys_include_exit_heads_and_skip_refused_configs(space):
    torch.manual_seed(0)
    keys, counts = space_layer_keys(space, samples=6)
    linears = {k["in_features"] for k in keys if k.op == "linear"}
    # final heads read 8 / 16 / 32 channels after a global pool; exit heads with a 2x2 grid read 4x as many
    assert {8 * 4, 16 * 4} & linears and {8, 16, 32} & linears
    assert any(k.op == "avgpool" for k in keys)
    # depth 2 has 2 blocks: at most one early exit, so 'exits: 2' configs are refused and counted
    assert counts["invalid"] > 0 and counts["keys"] == len(keys)
    with pytest.raises(InvalidCandidate, match="at most 1 early exits") as err:
        build_candidate(space, {**EE, "arch.depth": 2, "early_exit.exits": 2})
    assert err.value.key == "early_exit.exits"
    drawn = sample_candidates(space, 12, seed=0, runtime="onnxruntime", batch=1)
    assert len(drawn) == 12 and {c.early_exit is not None for c in drawn} == {True, False}


def test_thinned_early_exit_heads_read_the_kept_channels():
    space = exits_space(pruning={"method": "structured", "ratio": 0.5, "round_to": 1})
    cand = build_candidate(space, {**EE, "arch.width": 16, "pruning.method": "structured", "pruning.ratio": 0.5,
                                   "pruning.round_to": 1})
    convs = [t.key for t in cand.layers if t.key.op == "conv"]
    assert [(k["in_ch"], k["out_ch"]) for k in convs][:2] == [(1, 8), (8, 16)]   # 16 -> 8, 32 -> 16 channels
    head = [t.key for t in cand.segment_layers[0]][-1]
    assert head["in_features"] == 16 * 2 * 2 and cand.notes["thinned_ratio"] == 0.5


@pytest.mark.parametrize("method, options, precision", [
    ("int8_ptq", {"mode": "dynamic"}, "int8_dynamic"),
    ("int8_pt2e", {}, "int8_static"),
    ("qat", {"w_bits": 8, "a_bits": 8}, "int8_static"),
    ("qat", {"w_bits": 4, "a_bits": 8}, "fp32"),
    ("data_free", {"bits": 8}, "int8_static"),
    ("data_free", {"bits": 4}, "fp32"),
    ("mixed", {"target_bits": 4.0}, "fp32"),
    ("binary", {}, "fp32"),
    ("kmeans", {}, "fp32"),
])
def test_every_quantization_method_has_a_deployed_precision(method, options, precision):
    space = exits_space()
    config = {"arch.width": 8, "arch.depth": 2, "quantization.method": method,
              **{f"quantization.{k}": v for k, v in options.items()}}
    cand = build_candidate(space, config)
    assert cand.precision == precision
    assert ("simulated" in cand.notes.get("quantization", "")) == (precision == "fp32")
    assert build_candidate(space, config, runtime="onnxruntime_int8").precision == "int8_static"


def test_exit_thresholds_by_hand():
    conf = torch.tensor([[0.9, 0.5, 0.7, 0.2], [0.3, 0.8, 0.6, 0.1]])
    assert exit_thresholds(conf, [2, 1]) == pytest.approx([0.6, 0.45])
    final = torch.ones(1, 4)
    assert exit_indices(torch.cat([conf, final]), [0.6, 0.45, -1.0]).tolist() == [0, 1, 0, 2]
    assert exit_thresholds(conf, [0, 4]) == pytest.approx([1.0, 0.05])      # none at exit 0, all at exit 1
    assert exit_thresholds(conf, [4, 3]) == pytest.approx([0.1, 1.0])       # all leave at once


def test_plan_exits_realises_random_shares(space):
    task = get_task("digits")
    cand = build_candidate(space, {**EE, "early_exit.exits": 2})
    inputs = exit_inputs(task, batch=4, n=30)
    assert inputs.shape[0] == 28   # whole batches
    shares = set()
    for seed in range(4):
        plan = plan_exits(cand, inputs, seed)
        assert len(plan.thresholds) == len(plan.shares) == 2 and sum(plan.shares) <= 1
        taken = cand.model.infer(inputs, list(plan.thresholds), plan.criterion)[1]
        counts = np.bincount(taken.numpy(), minlength=3)
        assert tuple(counts[:2] / 28) == pytest.approx(plan.shares)
        shares.add(plan.shares)
    assert len(shares) == 4


def synthetic_measure(override=None):
    """Whole graphs on the synthetic device; an early-exit candidate costs each segment graph weighed by
    P(reach) under its plan's shares (or ``override``, returned as the runner's shares)."""
    def measure(cands):
        out = []
        for c in cands:
            if c.exit_plan is None:
                out.append(graph_ms(c.layers))
                continue
            shares = override(c) if override else c.exit_plan.shares
            ms = sum(p * graph_ms(layers) for p, layers in zip(reach_probabilities(shares), c.segment_layers))
            out.append((ms, 1.0, shares) if override else ms)
        return out
    return measure


@pytest.fixture(scope="module")
def calibrated(space):
    torch.manual_seed(0)
    prof = profile_of(space_layer_keys(space, samples=8)[0])
    seen = []

    def measure(cands):   # calibration measures single graphs: early-exit candidates' backbones
        seen.extend(c.notes.get("early_exit") for c in cands)
        assert not any(isinstance(c.model, EarlyExitModel) or c.exit_plan for c in cands)
        return synthetic_measure()(cands)
    calibrate(prof, space, per_precision=6, measure=measure, progress=False)
    corr = prof.corrections["fp32"]
    assert (corr.a, corr.b, corr.c) == pytest.approx((0.8, 0.003, 0.05), abs=1e-9)
    assert "backbone only (exit heads removed)" in seen
    return prof


def test_validation_predicts_early_exit_candidates_exactly(space, calibrated, tmp_path):
    figures = validate_profile(calibrated, space, tmp_path, samples=10, measure=synthetic_measure(), progress=False,
                               save_profile=False, exit_inputs_n=16)
    rows = json.loads((tmp_path / "validation.json").read_text())["candidates"]
    exits = [r for r in rows if r["early_exit"]]
    assert 0 < len(exits) < len(rows) and figures["early_exit"]["samples"] == len(exits)
    assert max(abs(r["error"]) for r in rows) < 1e-9 and figures["within_5pct"] == 1.0
    assert figures["early_exit"]["within_5pct"] == 1.0 and figures["kendall_tau"] == pytest.approx(1.0)
    for r in exits:
        assert len(r["exit_shares"]) == len(r["exit_thresholds"]) == len(r["segment_ms"]) - 1
        assert r["exit_reach"] == pytest.approx(reach_probabilities(r["exit_shares"])) and r["exit_inputs"] == 16
        assert r["predicted_ms"] <= sum(r["segment_ms"]) + 1e-12
    assert any(sum(r["exit_shares"]) > 0 for r in exits), "some inputs must really leave early"
    assert all(isinstance(w["early_exit"], bool) for w in figures["worst"])


def test_validation_uses_the_shares_the_runner_produced(space, calibrated, tmp_path):
    # the deployed runner's decisions win over the plan's: here everything leaves at the first exit
    first = lambda c: (1.0,) + (0.0,) * (len(c.exit_plan.shares) - 1)  # noqa: E731
    validate_profile(calibrated, space, tmp_path, samples=6, measure=synthetic_measure(first), progress=False,
                     save_profile=False, exit_inputs_n=8)
    rows = json.loads((tmp_path / "validation.json").read_text())["candidates"]
    exits = [r for r in rows if r["early_exit"]]
    assert exits and all(r["exit_shares"][0] == 1.0 for r in exits)
    assert all(r["predicted_ms"] == pytest.approx(r["segment_ms"][0]) for r in exits)
    assert max(abs(r["error"]) for r in rows) < 1e-9


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_measure_early_exit_runs_the_deployed_runner(space, runtime):
    torch.manual_seed(0)
    cand = build_candidate(space, EE)
    cand.exit_plan = plan_exits(cand, exit_inputs(get_task("digits"), batch=1, n=6), seed=1)
    stats = measure_early_exit(cand, runtime=runtime, threads=1, protocol=QUICK)
    assert stats.median_ms > 0 and stats.runs >= 6 * QUICK.min_repeats
    # thresholds sit midway between confidences, so the deployed graphs take the exits PyTorch takes
    assert stats.exit_shares == pytest.approx(cand.exit_plan.shares)


def test_unreachable_mac_target_is_a_refused_config_not_a_crash():
    """A MAC reduction the architecture cannot reach fails that trial; the profiler skips the config."""
    space = exits_space(pruning={"method": "structured", "mac_reduction": 50.0})
    with pytest.raises(InvalidCandidate, match="MAC target is out of reach"):
        build_candidate(space, {**EE, "early_exit.method": "none", "pruning.method": "structured",
                                "pruning.mac_reduction": 50.0})


H_FIXED, H_PER_KB = 0.004, 0.0015   # the synthetic device's segment hand-over: ms, ms per KB of features


def handoff_kb(cand) -> list:
    h, out = cand.example, []
    with torch.no_grad():
        for segment in cand.model.segments[:-1]:
            h = segment.eval()(h)
            out.append(h.numel() * 4 / 1024)
    return out


def handing_over_measure(cands):
    """The synthetic device, where each segment but the last also pays a hand-over (when reached)."""
    out = []
    for c, base in zip(cands, synthetic_measure()(cands)):
        if c.exit_plan is not None:
            reach = reach_probabilities(c.exit_plan.shares)
            base += sum(r * (H_FIXED + H_PER_KB * kb) for r, kb in zip(reach, handoff_kb(c)))
        out.append(base)
    return out


def test_handoff_fit_by_hand():
    residual = [2 * 0.004 + 0.0015 * 30, 0.004 + 0.0015 * 8, 3 * 0.004 + 0.0015 * 100]
    assert fit_handoff(residual, [2, 1, 3], [30, 8, 100], [0.5, 0.2, 0.9]) == pytest.approx((0.004, 0.0015))
    assert fit_handoff([-0.01], [1], [4], [0.1]) == (0.0, 0.0)   # never a negative cost
    with pytest.raises(ConfigError, match="at least one hand-over"):
        fit_handoff([0.01], [0], [4], [0.1])


def test_handoff_calibrated_then_early_exit_predicted_exactly(space, calibrated, tmp_path):
    import copy

    prof = copy.deepcopy(calibrated)
    calibrate_handoff(prof, space, models=4, measure=handing_over_measure, progress=False)
    corr = prof.corrections["fp32"]
    assert (corr.handoff_ms, corr.handoff_ms_per_kb) == pytest.approx((H_FIXED, H_PER_KB), rel=1e-6)
    assert corr.handoff_models == 4 and (corr.a, corr.c) == pytest.approx((0.8, 0.05))
    assert sum(1 for r in prof.calibration if r.get("early_exit")) == 4
    validate_profile(prof, space, tmp_path, samples=10, measure=handing_over_measure, progress=False,
                     save_profile=False, exit_inputs_n=16)
    rows = json.loads((tmp_path / "validation.json").read_text())["candidates"]
    assert any(r["early_exit"] for r in rows) and max(abs(r["error"]) for r in rows) < 1e-9
    # a profile without the fit under-prices the same early-exit models
    validate_profile(calibrated, space, tmp_path, samples=10, measure=handing_over_measure, progress=False,
                     save_profile=False, exit_inputs_n=16)
    rows = json.loads((tmp_path / "validation.json").read_text())["candidates"]
    assert all(r["error"] < -1e-6 for r in rows if r["early_exit"])
    # a space without early exit leaves the profile alone
    plain = parse_space({"version": 1, "task": "digits", "arch": {"family": "cnn", "width": 8, "depth": 2},
                         "objectives": {"accuracy": "max"}}, "plain.yaml")
    assert calibrate_handoff(copy.deepcopy(calibrated), plain, measure=None).corrections == calibrated.corrections
