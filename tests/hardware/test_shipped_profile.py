"""The shipped CPU profiles: used by the embedded default search on their own device only."""
import argparse
import filecmp

import pytest

from automl.errors import ConfigError
from automl.hardware.profile import HardwareProfile
from automl.hardware.shipped import SHIPPED_PROFILES, shipped_profile_here
from automl.search.costing import load_costing
from automl.spaces import load_default_space


@pytest.fixture(scope="module", params=SHIPPED_PROFILES, ids=lambda p: p.stem)
def shipped(request):
    return request.param, HardwareProfile.load(request.param)


def _here(profile, **change):
    dev = profile.device
    here = {"here_cpu": dev.cpu_model, "here_l2_kb": dev.l2_cache_kb, "here_runtime": dev.runtime_version}
    return {**here, **change}


def test_at_least_two_cpus_are_shipped():
    cpus = {(HardwareProfile.load(p).device.cpu_model, HardwareProfile.load(p).device.l2_cache_kb)
            for p in SHIPPED_PROFILES}
    assert len(cpus) >= 2, cpus


def test_shipped_profile_is_complete_validated_and_prices_the_default_space(shipped):
    path, shipped = shipped
    assert shipped.status == "complete" and not shipped.modelled
    assert shipped.validation and shipped.validation["samples"] == 100
    assert shipped.space["hash"] == load_default_space().hash
    assert load_costing(shipped, load_default_space()).profile is shipped
    # the copy in hardware_profiles/ is the same file (a link to the package's)
    listed = path.parents[3] / "hardware_profiles" / path.name
    assert filecmp.cmp(path, listed, shallow=False)


def test_used_on_its_own_device_only(shipped):
    path, shipped = shipped
    mine = shipped_profile_here(**_here(shipped))
    assert mine.profile is not None and "predicted from the shipped profile" in mine.reason
    assert mine.profile.device == shipped.device and path.name in mine.reason
    for change, named in (({"here_cpu": "AMD EPYC 9654"}, "CPU 'AMD EPYC 9654' here"),
                          ({"here_l2_kb": 777}, "per-core L2 (KB) 777 here"),
                          ({"here_runtime": "1.20.0"}, "onnxruntime version '1.20.0' here")):
        other = shipped_profile_here(**_here(shipped, **change))
        assert other.profile is None
        assert named in other.reason and "measured inside each trial" in other.reason
        assert "automl profile measure --threads 1" in other.reason


def _args(**given):
    base = dict(space=None, profile=None, no_profile=False, measure_trials=False, measure_front=False)
    return argparse.Namespace(**{**base, **given})


def test_search_picks_the_shipped_profile_only_for_the_default_search(monkeypatch, shipped, capsys):
    shipped = shipped[1]
    from automl import cli
    from automl.hardware import shipped as shipped_mod

    assert cli._search_profile(_args()) == ("auto", True)   # the default search: run_search decides
    assert cli._search_profile(_args(no_profile=True)) == (None, False)
    assert cli._search_profile(_args(space="s.yaml")) == (None, False)
    assert cli._search_profile(_args(profile="p.yaml")) == ("p.yaml", False)
    here = shipped_mod.ShippedChoice(shipped, "predicted from the shipped profile")
    monkeypatch.setattr(shipped_mod, "shipped_profile_here", lambda: here)
    assert shipped_mod.auto_profile() == (shipped, True)   # what run_search(profile="auto") uses
    assert "shipped profile" in capsys.readouterr().out
    monkeypatch.setattr(shipped_mod, "shipped_profile_here", lambda: shipped_mod.ShippedChoice(None, "elsewhere"))
    assert shipped_mod.auto_profile() == (None, False)
    with pytest.raises(ConfigError, match="--no-profile.*cannot be combined with --profile"):
        cli._search_profile(_args(no_profile=True, profile="p.yaml"))
