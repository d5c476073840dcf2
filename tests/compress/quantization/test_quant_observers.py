"""Observers on known distributions: exact ranges, outlier clipping, per-channel ranges, the registry."""
import pytest
import torch

from automl.compress.quantization import qmath
from automl.compress.quantization.observers import OBSERVERS, SampleObserver, make_observer
from automl.errors import ConfigError, LifecycleError, UnknownNameError


@pytest.fixture(scope="module")
def outliers():
    """50k standard normal values plus ten outliers at +-40 (0.02%)."""
    torch.manual_seed(0)
    x = torch.randn(50_000)
    x[:5], x[5:10] = 40.0, -40.0
    return x[torch.randperm(x.numel())]


def test_registry_names_and_did_you_mean():
    assert OBSERVERS.names() == ["entropy", "minmax", "moving_average", "mse", "percentile"]
    with pytest.raises(UnknownNameError, match="did you mean 'minmax'"):
        make_observer("minmx")


def test_minmax_exact_over_batches_and_update_returns_input():
    obs = make_observer("minmax")
    x = torch.tensor([-1.0, 2.0])
    assert obs.update(x) is x
    obs.update(torch.tensor([0.5, 3.0]))
    lo, hi = obs.range()
    assert (lo.item(), hi.item()) == (-1.0, 3.0)
    scale, zp = obs.qparams(8, symmetric=True)
    assert scale.item() == pytest.approx(3 / 127) and zp.item() == 0


def test_minmax_per_channel():
    obs = make_observer("minmax", axis=1)
    obs.update(torch.tensor([[1.0, -2.0, 0.0], [3.0, 5.0, -1.0]]))
    lo, hi = obs.range()
    assert lo.tolist() == [1.0, -2.0, -1.0] and hi.tolist() == [3.0, 5.0, 0.0]
    scale, _ = obs.qparams(8, symmetric=False, signed=False)
    assert scale.tolist() == pytest.approx([3 / 255, 7 / 255, 1 / 255])  # ranges widened to include 0


def test_moving_average_follows_the_formula():
    obs = make_observer("moving_average", momentum=0.5)
    obs.update(torch.tensor([-2.0, 2.0]))  # the first batch sets the averages
    obs.update(torch.tensor([0.0, 4.0]))
    lo, hi = obs.range()
    assert (lo.item(), hi.item()) == (-1.0, 3.0)
    obs.reset()
    with pytest.raises(LifecycleError, match="before any update"):
        obs.range()


@pytest.mark.parametrize("kwargs, key", [({"momentum": 0.0}, "momentum"), ({"momentum": 2.0}, "momentum")])
def test_moving_average_rejects_bad_momentum(kwargs, key):
    with pytest.raises(ConfigError) as err:
        make_observer("moving_average", **kwargs)
    assert err.value.key == key


def test_percentile_rejects_bad_values_and_entropy_rejects_per_channel():
    with pytest.raises(ConfigError) as err:
        make_observer("percentile", percentile=30)
    assert err.value.key == "percentile"
    with pytest.raises(ConfigError) as err:
        make_observer("entropy", axis=0)
    assert err.value.key == "axis" and "per tensor only" in str(err.value)


@pytest.mark.parametrize("name", ["minmax", "percentile", "mse", "entropy"])
def test_range_before_data_is_a_lifecycle_error(name):
    with pytest.raises(LifecycleError):
        make_observer(name).range()


def test_uniform_data_keeps_nearly_the_full_range():
    torch.manual_seed(1)
    x = torch.empty(20_000).uniform_(-1, 1)
    for name, kwargs in [("minmax", {}), ("percentile", {"percentile": 99.99}), ("mse", {"bits": 8}),
                         ("entropy", {})]:
        obs = make_observer(name, **kwargs)
        obs.update(x)
        lo, hi = obs.range()
        assert hi.item() == pytest.approx(1.0, abs=0.06), name
        assert lo.item() == pytest.approx(-1.0, abs=0.06), name


def test_gaussian_outliers_are_clipped_except_by_minmax(outliers):
    ranges = {}
    for name, kwargs in [("minmax", {}), ("percentile", {"percentile": 99.9}), ("mse", {"bits": 4}),
                         ("entropy", {"bits": 4})]:
        obs = make_observer(name, **kwargs)
        obs.update(outliers)
        ranges[name] = max(-obs.range()[0].item(), obs.range()[1].item())
    assert ranges["minmax"] == 40.0
    assert 3.0 < ranges["percentile"] < 4.0  # the 99.9th percentile of N(0, 1) is 3.09
    assert 1.5 < ranges["mse"] < 6.0
    assert 1.5 < ranges["entropy"] < 6.0


def test_mse_range_has_lower_error_than_minmax(outliers):
    mse, mm = make_observer("mse", bits=4), make_observer("minmax")
    mse.update(outliers)
    mm.update(outliers)
    err = {}
    for name, obs in (("mse", mse), ("minmax", mm)):
        s, z = obs.qparams(4)
        err[name] = (qmath.fake_quantize(outliers, s, z, 4) - outliers).pow(2).mean().item()
    assert err["mse"] < 0.5 * err["minmax"]  # 0.28 vs 0.98 here; most of the rest is the clipped outliers


def test_mse_qparams_search_for_the_bits_asked(outliers):
    obs = make_observer("mse", bits=8)
    obs.update(outliers)
    s8, _ = obs.qparams(8)
    s2, _ = obs.qparams(2)
    assert s2.item() < 3.0  # 2 bits (levels -2..1, clip = one step): well inside 3 sigma
    assert s8.item() * 127 > s2.item() * 1


def test_per_channel_sample_observers():
    torch.manual_seed(2)
    w = torch.randn(4, 2000) * torch.tensor([[0.5], [1.0], [2.0], [4.0]])
    for name in ("percentile", "mse"):
        obs = make_observer(name, axis=0)
        obs.update(w)
        lo, hi = obs.range()
        assert lo.shape == (4,) and hi.shape == (4,)
        assert torch.all(hi[1:] > hi[:-1]) and torch.all(lo[1:] < lo[:-1]), name
        scale, zp = obs.qparams(4)
        assert scale.shape == (4,) and torch.all(zp == 0)


def test_entropy_on_non_negative_data_starts_at_zero():
    torch.manual_seed(3)
    obs = make_observer("entropy")
    obs.update(torch.relu(torch.randn(10_000)))
    lo, hi = obs.range()
    assert lo.item() == 0.0 and 1.0 < hi.item() <= 4.5
    scale, zp = obs.qparams(8, symmetric=False, signed=False)
    assert zp.item() == 0 and scale.item() == pytest.approx(hi.item() / 255, rel=1e-5)


def test_sample_observer_weighs_batches_by_size():
    obs = SampleObserver(max_samples=400)
    obs.update(torch.ones(1000))
    obs.update(torch.zeros(3000))
    assert obs.samples.shape == (1, 400)
    assert int(obs.samples.sum()) == 100  # 1000 of 4000 values seen were ones
    assert obs.seen == 4000
