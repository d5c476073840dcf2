"""Affine quantization math: ranges, scale/zero point, round trips, per-channel parameters."""
import pytest
import torch

from automl.compress.quantization import qmath
from automl.errors import ConfigError

ALL_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 32, 4.0, True, "8", None])
def test_unsupported_bits_raise_config_error_naming_bits(bits):
    with pytest.raises(ConfigError) as err:
        qmath.qparams(-1.0, 1.0, bits)
    assert err.value.key == "bits"
    assert "unsupported bit-width" in str(err.value) and "2, 3, 4, 5, 6, 7, 8, 16" in str(err.value)


def test_check_bits_names_the_given_key():
    with pytest.raises(ConfigError) as err:
        qmath.check_bits(1, key="layer_bits.conv1")
    assert err.value.key == "layer_bits.conv1"


@pytest.mark.parametrize("bits, signed, expected", [(8, True, (-128, 127)), (8, False, (0, 255)),
                                                     (4, True, (-8, 7)), (2, False, (0, 3)),
                                                     (16, True, (-32768, 32767))])
def test_qrange(bits, signed, expected):
    assert qmath.qrange(bits, signed) == expected


def test_symmetric_known_values():
    scale, zp = qmath.qparams(-1.0, 1.0, 8, symmetric=True, signed=True)
    assert scale.item() == pytest.approx(1 / 127) and zp.item() == 0
    scale, zp = qmath.qparams(-0.5, 2.0, 4, symmetric=True, signed=True)  # max|x| = 2 over 7 steps
    assert scale.item() == pytest.approx(2 / 7) and zp.item() == 0
    scale, zp = qmath.qparams(-1.0, 1.0, 8, symmetric=True, signed=False)  # uint8 centred at 128
    assert scale.item() == pytest.approx(1 / 127) and zp.item() == 128
    assert zp.dtype == torch.int32


def test_asymmetric_known_values():
    scale, zp = qmath.qparams(0.0, 2.55, 8, symmetric=False, signed=False)
    assert scale.item() == pytest.approx(0.01) and zp.item() == 0
    scale, zp = qmath.qparams(-1.0, 3.0, 8, symmetric=False, signed=False)
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == 64  # round(1 / (4/255)) = round(63.75)
    scale, zp = qmath.qparams(-1.0, 3.0, 8, symmetric=False, signed=True)
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == -64


def test_asymmetric_uses_the_grid_better_than_symmetric_on_a_skewed_range():
    x = torch.linspace(-0.1, 1.0, 1001)
    errors = {}
    for sym in (True, False):
        s, z = qmath.qparams(x.min(), x.max(), 4, symmetric=sym, signed=True)
        errors[sym] = (qmath.fake_quantize(x, s, z, 4, True) - x).abs().max().item()
        assert errors[sym] <= s.item() / 2 + 1e-6
    assert errors[False] < 0.6 * errors[True]


@pytest.mark.parametrize("lo, hi", [(2.0, 5.0), (-5.0, -2.0), (0.0, 0.0), (-3.0, 0.7)])
@pytest.mark.parametrize("symmetric, signed", [(True, True), (True, False), (False, True), (False, False)])
def test_range_always_includes_zero_and_zero_is_exact(lo, hi, symmetric, signed):
    scale, zp = qmath.qparams(lo, hi, 8, symmetric, signed)
    assert scale.item() > 0  # never 0, even for a constant zero tensor
    qmin, qmax = qmath.qrange(8, signed)
    assert qmin <= zp.item() <= qmax
    zero = torch.zeros(3)
    assert torch.equal(qmath.fake_quantize(zero, scale, zp, 8, signed), zero)


def test_constant_zero_tensor_gets_the_minimum_scale():
    scale, zp = qmath.qparams(0.0, 0.0, 4)
    assert scale.item() == pytest.approx(qmath.MIN_SCALE)
    assert torch.isfinite(qmath.quantize(torch.zeros(4), scale, zp, 4).float()).all()


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric, signed", [(True, True), (True, False), (False, True), (False, False)])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, signed):
    torch.manual_seed(bits)
    lo, hi = -1.3, 2.9
    x = torch.cat([torch.empty(4000).uniform_(lo, hi), torch.tensor([lo, hi, 0.0])])
    scale, zp = qmath.qparams(lo, hi, bits, symmetric, signed)
    q = qmath.quantize(x, scale, zp, bits, signed)
    qmin, qmax = qmath.qrange(bits, signed)
    assert q.dtype == torch.int32 and int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (qmath.dequantize(q, scale, zp) - x).abs().max().item()
    assert err <= scale.item() / 2 + 1e-6  # + float32 rounding of x itself (|x| < 3)
    assert torch.equal(qmath.fake_quantize(x, scale, zp, bits, signed), qmath.dequantize(q, scale, zp))


def test_more_bits_give_smaller_error():
    x = torch.linspace(-1, 1, 999)
    errs = [(qmath.fake_quantize_minmax(x, b) - x).abs().max().item() for b in (2, 4, 8, 16)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4


def test_out_of_range_values_saturate():
    scale, zp = qmath.qparams(-1.0, 1.0, 4)  # +-1 -> +-7 (narrow symmetric), the grid still has -8
    q = qmath.quantize(torch.tensor([-5.0, -1.0, 1.0, 5.0]), scale, zp, 4)
    assert q.tolist() == [-8, -7, 7, 7]


def test_per_channel_scales_follow_each_channel():
    w = torch.tensor([[0.5, -0.25], [-4.0, 2.0], [1.0, 1.0]])  # 3 output channels on axis 0
    lo, hi = qmath.minmax(w, axis=0)
    assert lo.tolist() == [-0.25, -4.0, 1.0] and hi.tolist() == [0.5, 2.0, 1.0]
    scale, zp = qmath.qparams(lo, hi, 8)
    assert scale.shape == (3,) and zp.shape == (3,)
    assert scale.tolist() == pytest.approx([0.5 / 127, 4.0 / 127, 1.0 / 127])
    q = qmath.quantize(w, scale, zp, 8, axis=0)
    assert q.tolist() == [[127, -64], [-127, 64], [127, 127]]  # -0.25 / (0.5/127) = -63.5 -> -64
    assert (qmath.dequantize(q, scale, zp, axis=0) - w).abs().max() <= scale.max() / 2


def test_per_channel_on_another_axis_and_bad_counts():
    x = torch.tensor([[1.0, 10.0], [-1.0, -10.0]])
    scale, zp = qmath.qparams(*qmath.minmax(x, axis=1), 8)
    assert scale.tolist() == pytest.approx([1 / 127, 10 / 127])
    assert qmath.quantize(x, scale, zp, 8, axis=1).tolist() == [[127, 127], [-127, -127]]
    with pytest.raises(ValueError, match="per-channel parameters"):
        qmath.quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32), 8, axis=1)


def test_per_channel_beats_per_tensor_when_channels_differ_in_scale():
    torch.manual_seed(0)
    w = torch.randn(8, 50) * torch.logspace(-2, 0, 8).unsqueeze(1)
    per_tensor = (qmath.fake_quantize_minmax(w, 4) - w).pow(2).mean()
    per_channel = (qmath.fake_quantize_minmax(w, 4, axis=0) - w).pow(2).mean()
    assert per_channel < 0.5 * per_tensor


def test_min_above_max_is_rejected():
    with pytest.raises(ValueError):
        qmath.qparams(torch.tensor([-1.0, -3.0]), torch.tensor([1.0, -4.0]), 8)
