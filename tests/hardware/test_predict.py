"""The predictor: interpolation, the whole-model correction on a synthetic device, validation figures,
early-exit expected cost."""
import json

import numpy as np
import pytest
import torch

from automl.errors import ConfigError
from automl.hardware.candidates import space_layer_keys
from automl.hardware.layers import LayerKey, layer_cost, modelled_energy_mj, weight_bytes
from automl.hardware.measure import make_entry
from automl.hardware.timing import Stats
from automl.hardware.predict import (CACHE_SHARES, cold_share, expected_cost, fit_correction, interpolate, predict_keys,
                                     price_layer, reach_probabilities)
from automl.hardware.profile import Correction, DeviceInfo, HardwareProfile, Protocol
from automl.hardware.validate import calibrate, validate_profile, validation_figures
from automl.spaces import parse_space

# a small L2 so that the larger candidates' weights do not fit in it together
DEVICE = DeviceInfo(cpu_model="Synthetic", threads=1, runtime="onnxruntime", precisions=("fp32",), batch=1,
                    l2_cache_kb=128)
OVERHEAD = 0.004   # per-call time of an empty model on the synthetic device (ms)
EFFECTIVE_L2_KB = 96   # what the weights may fill of the 128 KB L2 (one of the shares the fit tries)


def synthetic_ms(key: LayerKey) -> float:
    """The synthetic device: a layer costs 2 ns per MAC plus 1 us."""
    return 2e-6 * layer_cost(key).macs + 1e-3


def synthetic_cold_ms(key: LayerKey) -> float:
    """... and 1 ns more per weight byte when its weights come from L3."""
    return synthetic_ms(key) + 1e-6 * weight_bytes(key)


def profile_of(keys, fn=synthetic_ms, cold_fn=synthetic_cold_ms) -> HardwareProfile:
    prof = HardwareProfile(device=DEVICE, protocol=Protocol(overhead_ms=OVERHEAD))
    for k in keys:   # measured alone = the layer + the empty-model overhead, which make_entry subtracts
        t, c = fn(k) + OVERHEAD, cold_fn(k) + OVERHEAD
        cold = Stats(c, c, c, 100) if weight_bytes(k) >= prof.protocol.cold_min_kb * 1024 else None
        prof.entries[k] = make_entry(k, Stats(t, t, t, 100), OVERHEAD, cold=cold)
    return prof


def conv(in_ch, out_ch):
    return LayerKey.make("conv", in_ch=in_ch, out_ch=out_ch, h=4, w=4, kernel=3, stride=1, padding=1, groups=1,
                         bn=True, act="relu")


def test_interpolate_1d_and_extrapolate():
    pts = [((8,), 1.0), ((16,), 2.0), ((32,), 3.0)]
    assert interpolate(pts, (16,)) == (2.0, "exact")
    assert interpolate(pts, (12,)) == (1.5, "interpolated")
    assert interpolate(pts, (24,)) == (2.5, "interpolated")
    assert interpolate(pts, (4,)) == (0.5, "extrapolated")        # linear from 8 and 16
    assert interpolate(pts, (48,)) == (4.0, "extrapolated")       # linear from 16 and 32
    assert interpolate([((8,), 2.0)], (4,)) == (1.0, "extrapolated")   # one point: proportional
    # a line through (8, 1) and (16, 10) would go negative at 2: proportional to the nearest instead
    assert interpolate([((8,), 1.0), ((16,), 10.0)], (2,)) == (0.25, "extrapolated")


def test_interpolate_bilinear_is_exact_for_bilinear_costs():
    f = lambda i, o: 1e-4 * i * o + 1e-3 * i + 2e-3 * o + 0.01  # noqa: E731  (conv time ~ in x out)
    pts = [((i, o), f(i, o)) for i in (8, 16, 32) for o in (16, 32, 64)]
    for q in [(12, 20), (8, 40), (30, 17), (16, 64)]:
        value, how = interpolate(pts, q)
        assert value == pytest.approx(f(*q)) and how in ("exact", "interpolated")


def test_price_layer_interpolates_between_measured_channel_counts():
    cost = lambda k: 1e-3 * k["in_ch"] * k["out_ch"]  # noqa: E731
    cold = lambda k: cost(k) + 1e-6 * weight_bytes(k)  # noqa: E731   (1 ns per weight byte from L3)
    corners = [conv(i, o) for i in (8, 64) for o in (16, 128)]
    prof = profile_of(corners, fn=cost, cold_fn=cold)
    assert [prof.entries[k].cold_ms is not None for k in corners] == [False, True, True, True]  # 32 KB or more
    price = price_layer(prof, conv(36, 72))
    assert price.how == "interpolated" and price.latency_ms == pytest.approx(1e-3 * 36 * 72)
    # the cold time is interpolated alike, a corner not timed cold counting as warm
    assert price.cold_ms == pytest.approx(sum(prof.entries[k].cold_or_warm_ms for k in corners) / 4)
    assert price.energy_mj == pytest.approx(modelled_energy_mj(conv(36, 72)), rel=0.05)
    assert price_layer(prof, conv(64, 128)).how == "exact"
    assert price_layer(prof, conv(4, 32)).how == "extrapolated"


def test_fit_correction_recovers_known_effects():
    rng = np.random.default_rng(0)
    sums, n = rng.uniform(0.01, 0.5, 20), rng.integers(3, 12, 20)
    corr = fit_correction(sums, n, 0.8 * sums + 0.003 * n + 0.05)
    assert (corr.a, corr.b, corr.c) == pytest.approx((0.8, 0.003, 0.05), abs=1e-9)
    assert corr.models == 20 and corr.rmspe == pytest.approx(0.0, abs=1e-9)
    few = fit_correction([0.1, 0.2], [3, 4], [0.15, 0.25])   # < 3 models: the constant only
    assert (few.a, few.b, few.c) == pytest.approx((1.0, 0.0, 0.05))
    with pytest.raises(ConfigError, match="positive and finite"):
        fit_correction([0.1], [1], [0.0])


def small_space():
    raw = {"version": 1, "task": "digits",
           "arch": {"family": "cnn", "width": {"choice": [8, 32]}, "depth": {"int": [1, 3]},
                    "kernel": {"choice": [3, 5]}, "pooling": {"choice": ["max", "stride"]}},
           "train": {"epochs": 2}, "objectives": {"accuracy": "max", "latency_ms": "min"}}
    return parse_space(raw, "small.yaml")


@pytest.fixture(scope="module")
def space_and_keys():
    torch.manual_seed(0)
    space = small_space()
    return space, space_layer_keys(space, samples=4)[0]


@pytest.mark.parametrize("whole", [
    lambda s, n, cold: s + 0.05,                                  # the layers plus a constant per-model overhead
    lambda s, n, cold: 0.8 * s + 0.003 * n + 0.05,                # plus effects per layer and on the sum
    lambda s, n, cold: 0.9 * s + 0.002 * n + 0.05 + 0.7 * cold,   # plus weights streamed from L3
])
def test_synthetic_device_correction_and_validation(whole, space_and_keys, tmp_path):
    space, keys = space_and_keys
    prof = profile_of(keys)
    prof.source = str(tmp_path / "synthetic.yaml")

    def measure(cands):   # whole models on the synthetic device
        out = []
        for c in cands:
            ks = [t.key for t in c.layers]
            excess = sum(prof.entries[k].cold_or_warm_ms - prof.entries[k].latency_ms for k in ks)
            share = cold_share(sum(weight_bytes(k) for k in ks), EFFECTIVE_L2_KB)
            out.append(whole(sum(synthetic_ms(k) for k in ks), len(ks), share * excess))
        return out
    calibrate(prof, space, per_precision=12, measure=measure, progress=False)
    corr = prof.corrections["fp32"]
    base = whole(0.0, 0, 0.0)
    expect = whole(1.0, 0, 0.0) - base, whole(0.0, 1, 0.0) - base, base, whole(0.0, 0, 1.0) - base
    assert (corr.a, corr.b, corr.c) == pytest.approx(expect[:3], abs=1e-6)
    if expect[3]:   # few calibration models exceed the capacity: another capacity with another d may fit them too
        assert corr.d > 0 and corr.cache_kb in [int(DEVICE.l2_cache_kb * s) for s in CACHE_SHARES]
    else:
        assert corr.d == 0 and corr.cache_kb == 0   # no cold term where it does not fit better
    figures = validate_profile(prof, space, tmp_path / "val", samples=12, measure=measure, progress=False)
    report = json.loads((tmp_path / "val" / "validation.json").read_text())
    errors = [abs(r["error"]) for r in report["candidates"]]
    assert max(errors) < 0.01 and figures["within_5pct"] == 1.0 and figures["kendall_tau"] == pytest.approx(1.0)
    assert (tmp_path / "val" / "validation.png").stat().st_size > 0
    stored = HardwareProfile.load(tmp_path / "synthetic.yaml")
    assert stored.validation["within_10pct"] == 1.0 and stored.corrections["fp32"] == corr


def test_cold_share():
    assert cold_share(64 * 1024, 128) == 0.0            # the weights fit in the effective capacity
    assert cold_share(512 * 1024, 128) == 0.75          # a cyclic sweep over 4x the capacity misses 3/4
    assert cold_share(512 * 1024, 0) == 0.0             # no capacity known: no cold term
    small, big = conv(8, 16), conv(64, 64)              # 4.7 KB and 148 KB of fp32 weights
    prof = profile_of([small, big])
    assert prof.entries[small].cold_ms is None and prof.entries[big].cold_ms > prof.entries[big].latency_ms
    # a model of 2 big layers (296 KB) on an effective 128 KB: 1 - 128/296 of their cold excess is added
    prof.corrections["fp32"] = Correction(a=1.0, c=0.0, d=1.0, cache_kb=128)
    pred = predict_keys(prof, [big, big, small])
    excess = 2 * (synthetic_cold_ms(big) - synthetic_ms(big))
    share = 1 - 128 * 1024 / (2 * weight_bytes(big) + weight_bytes(small))
    assert pred.cold_share == pytest.approx(share) and pred.cold_excess_ms == pytest.approx(excess)
    assert pred.latency_ms == pytest.approx(2 * synthetic_ms(big) + synthetic_ms(small) + share * excess)



def test_prediction_energy_is_sum_of_modelled_entries():
    ks = [conv(8, 16), conv(16, 16), LayerKey.make("gap", channels=16, h=4, w=4)]
    pred = predict_keys(profile_of(ks), ks)
    assert pred.n_layers == 3 and pred.sum_ms == pytest.approx(sum(synthetic_ms(k) for k in ks))
    assert pred.latency_ms == pytest.approx(pred.sum_ms)   # no correction fitted yet: identity
    assert pred.energy_mj == pytest.approx(sum(modelled_energy_mj(k) for k in ks), rel=1e-5)


def test_validation_figures_by_hand():
    f = validation_figures([1.0, 2.15, 2.9, 4.5], [1.0, 2.0, 3.0, 4.0])
    assert f["within_10pct"] == 0.75 and f["within_5pct"] == 0.5
    assert f["kendall_tau"] == pytest.approx(1.0)
    assert f["rmspe"] == pytest.approx(np.sqrt((0 + 0.075 ** 2 + (0.1 / 3) ** 2 + 0.125 ** 2) / 4))
    assert f["max_abs_error"] == pytest.approx(0.125)
    assert validation_figures([2.0, 1.0], [1.0, 2.0])["kendall_tau"] == pytest.approx(-1.0)


def test_early_exit_expected_cost():
    assert expected_cost([1.0, 2.0, 3.0], [1.0, 0.5, 0.25]) == pytest.approx(1 + 1 + 0.75)
    assert reach_probabilities([0.5, 0.25]) == [1.0, 0.5, 0.25]
    assert expected_cost([1.0, 2.0, 3.0], reach_probabilities([0.5, 0.25])) == pytest.approx(2.75)
    with pytest.raises(ConfigError, match="one reach probability per segment"):
        expected_cost([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError, match="cannot grow"):
        expected_cost([1.0, 2.0], [0.5, 0.8])
    with pytest.raises(ConfigError, match="sum to at most 1"):
        reach_probabilities([0.7, 0.6])


def test_early_exit_model_is_priced_as_the_expected_cost_over_segments():
    from automl.compress.early_exit.model import EarlyExitModel
    from automl.hardware.layers import trace_layers
    from automl.hardware.predict import predict_early_exit
    from automl.tasks import get_task

    task = get_task("digits")
    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 16, "depth": 3})
    ee = EarlyExitModel.from_model(model, exits=[0, 1], example=task.example_input(2)).eval()
    ee.joint_output = False
    example = task.example_input(1)
    segments, h = [], example
    with torch.no_grad():
        for seg, head in zip(ee.segments, ee.exit_heads):
            segments.append(trace_layers(torch.nn.Sequential(seg, head), h))
            h = seg(h)
    keys = [t.key for layers in segments for t in layers]
    prof = profile_of(keys)
    pred = predict_early_exit(prof, ee, example, [0.5, 0.3])
    seg_ms = [sum(synthetic_ms(t.key) for t in layers) for layers in segments]
    assert pred.reach == (1.0, 0.5, 0.2)
    assert pred.latency_ms == pytest.approx(seg_ms[0] + 0.5 * seg_ms[1] + 0.2 * seg_ms[2])
    assert predict_early_exit(prof, ee, example, [0.0, 0.0]).latency_ms == pytest.approx(sum(seg_ms))
    with pytest.raises(ConfigError, match="2 early exits but 1 exit shares"):
        predict_early_exit(prof, ee, example, [0.5])


def test_simulated_low_bit_model_is_priced_as_its_float_equivalent(tmp_path):
    from automl.hardware.layers import trace_layers
    from automl.hardware.predict import predict_model
    from automl.recipe import Recipe, apply_recipe

    recipe = Recipe.loads("""
version: 1
task: digits
arch: {family: cnn, width: 8, depth: 2}
train: {epochs: 1, batch_size: 128}
stages:
- {method: qat, config: {w_bits: 4, a_bits: 4, finetune_epochs: 1}}
""")
    result = apply_recipe(recipe, tmp_path)
    assert "simulated" in result.artifact.precision
    example = torch.zeros(1, 1, 8, 8)
    from automl.tasks import get_task

    float_model = get_task("digits").build_model("cnn", {"width": 8, "depth": 2})  # same layer shapes
    keys = [t.key for t in trace_layers(float_model, example)]
    prof = profile_of(keys)
    with pytest.raises(ConfigError):
        predict_model(prof, result.model, example)   # the fake-quantizers are ops no profile holds
    priced = predict_model(prof, result.model, example, free_input_quant=True)
    assert priced.latency_ms == pytest.approx(predict_keys(prof, keys).latency_ms)
