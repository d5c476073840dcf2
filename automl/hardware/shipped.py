"""The CPU profiles shipped inside the package, which the embedded default search prices its trials from.

A profile predicts latency on the device it was measured on, so the default search uses one only where
it runs on that device: the same CPU model, per-core L2 and onnxruntime version (the L2 size tells
apart CPUs that a virtual machine names alike, e.g. "AMD EPYC" Zen 3 with 512 KB and Zen 4 with
1 MB). Elsewhere it measures each trial's latency, as a search without a profile does, and says how to
profile this CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from automl.hardware.profile import HardwareProfile, cpu_model, l2_cache_kb

SHIPPED_DIR = Path(__file__).parent / "builtin"
SHIPPED_PROFILES = tuple(sorted(SHIPPED_DIR.glob("*.yaml")))


@dataclass(frozen=True)
class ShippedChoice:
    """The shipped profile that describes this machine (else None), and one line saying why."""

    profile: Optional[HardwareProfile]
    reason: str


def _runtime_version(runtime: str) -> str:
    import onnxruntime

    return str(onnxruntime.__version__) if runtime.startswith("onnxruntime") else "unknown"


def _differences(profile: HardwareProfile, here_cpu, here_l2_kb, here_runtime) -> list:
    dev = profile.device
    here = {"CPU": here_cpu if here_cpu is not None else cpu_model(),
            "per-core L2 (KB)": here_l2_kb if here_l2_kb is not None else l2_cache_kb(),
            f"{dev.runtime} version": here_runtime if here_runtime is not None else _runtime_version(dev.runtime)}
    theirs = {"CPU": dev.cpu_model, "per-core L2 (KB)": dev.l2_cache_kb, f"{dev.runtime} version": dev.runtime_version}
    return [f"{k} {here[k]!r} here, {theirs[k]!r} in the profile" for k in here if str(here[k]) != str(theirs[k])]


def shipped_profile_here(paths: Sequence[Path] = SHIPPED_PROFILES, *, here_cpu: Optional[str] = None,
                         here_l2_kb: Optional[int] = None, here_runtime: Optional[str] = None) -> ShippedChoice:
    """The first shipped profile measured on this machine's device (``here_*`` override the detected
    CPU model, L2 size and runtime version)."""
    misses = []
    for path in paths:
        profile = HardwareProfile.load(path)
        differ = _differences(profile, here_cpu, here_l2_kb, here_runtime)
        if not differ:
            dev = profile.device
            return ShippedChoice(profile, f"latency and energy predicted from the shipped profile {path.name} "
                                          f"({dev.cpu_model}, {dev.l2_cache_kb} KB L2 per core, {dev.runtime} "
                                          f"{dev.runtime_version}, {dev.threads} thread); the Pareto front is then "
                                          "measured for real (--no-profile measures every trial instead)")
        misses.append(f"{path.name}: " + "; ".join(differ))
    return ShippedChoice(None, "no shipped profile was measured on this device (" + " | ".join(misses)
                         + "): latency is measured inside each trial. To predict it instead, profile this CPU: "
                         "automl profile measure --threads 1 --out my_cpu.yaml, then pass --profile my_cpu.yaml")


def auto_profile(measure_front: bool = True, log=print):
    """(profile, measure_front) for ``profile="auto"``: the shipped profile of this CPU (its front then
    measured for real when ``measure_front``), else (None, False); the reason is logged."""
    choice = shipped_profile_here()
    log(f"automl search: {choice.reason}")
    return (choice.profile, measure_front) if choice.profile is not None else (None, False)


__all__ = ["SHIPPED_PROFILES", "ShippedChoice", "auto_profile", "shipped_profile_here"]
