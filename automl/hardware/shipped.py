"""The CPU profile shipped inside the package, which the embedded default search prices its trials from.

A profile predicts latency on the device it was measured on, so the default search uses it only
where it runs on that device: the same CPU model, per-core L2 and onnxruntime version. Elsewhere it
measures each trial's latency, as a search without a profile does, and says how to profile this CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from automl.hardware.profile import HardwareProfile, cpu_model, l2_cache_kb

SHIPPED_PROFILE = Path(__file__).parent / "builtin" / "xeon_ort_1t.yaml"


@dataclass(frozen=True)
class ShippedChoice:
    """The shipped profile when it describes this machine (else None), and one line saying why."""

    profile: Optional[HardwareProfile]
    reason: str


def _runtime_version(runtime: str) -> str:
    import onnxruntime

    return str(onnxruntime.__version__) if runtime.startswith("onnxruntime") else "unknown"


def shipped_profile_here(path=SHIPPED_PROFILE, *, here_cpu: Optional[str] = None,
                         here_l2_kb: Optional[int] = None, here_runtime: Optional[str] = None) -> ShippedChoice:
    """The shipped profile if this machine is the device it was measured on (``here_*`` override the
    detected CPU model, L2 size and runtime version)."""
    profile = HardwareProfile.load(path)
    dev = profile.device
    here = {"CPU": here_cpu if here_cpu is not None else cpu_model(),
            "per-core L2 (KB)": here_l2_kb if here_l2_kb is not None else l2_cache_kb(),
            f"{dev.runtime} version": here_runtime if here_runtime is not None else _runtime_version(dev.runtime)}
    theirs = {"CPU": dev.cpu_model, "per-core L2 (KB)": dev.l2_cache_kb, f"{dev.runtime} version": dev.runtime_version}
    differ = [f"{k} {here[k]!r} here, {theirs[k]!r} in the profile" for k in here if str(here[k]) != str(theirs[k])]
    if differ:
        return ShippedChoice(None, f"the shipped profile {path.name} was measured on another device ("
                                   + "; ".join(differ) + "): latency is measured inside each trial. To predict it "
                                   "instead, profile this CPU: automl profile measure --threads 1 --out my_cpu.yaml, "
                                   "then pass --profile my_cpu.yaml")
    return ShippedChoice(profile, f"latency and energy predicted from the shipped profile {path.name} ({dev.cpu_model}, "
                                  f"{dev.runtime} {dev.runtime_version}, {dev.threads} thread); the Pareto front "
                                  "is then measured for real (--no-profile measures every trial instead)")


__all__ = ["SHIPPED_PROFILE", "ShippedChoice", "shipped_profile_here"]
