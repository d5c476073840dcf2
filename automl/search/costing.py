"""Hardware-aware trial costs: latency and energy predicted from a hardware profile (no Ray here).

With a profile, a trial's ``latency_ms`` and ``energy_mj`` are predicted for the trained, compressed
model (``predict_model`` at the precision it deployed at), so trials need not run on a quiet
machine or on the target device. The latency measured inside the trial is kept as
``measured_latency_ms`` only when asked (``measure_trials``). A profile measured with other threads,
batch or runtime than the space deploys with would price another setup: that is refused up front.

Pricing itself is automl.hardware.pricing. A modelled accelerator profile (``automl profile model``) prices
each conv/linear layer at its own bit-widths; its latency and energy are reported as modelled
(``latency_source`` / ``energy_source``), and only its batch has to match the space (the space's
threads and runtime describe the CPU that evaluates accuracy, not the accelerator).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from automl.configs import config_to_dict
from automl.errors import ConfigError, ProfileError, RunDirError
from automl.hardware.pricing import one_source, price_deployed
from automl.hardware.profile import HardwareProfile
from automl.io import load_yaml, write_yaml
from automl.runtime import Artifact

# space deploy.runtime -> the profile runtimes that price it (onnxruntime_int8 profiles hold int8 entries)
PROFILE_RUNTIMES = {"onnxruntime": ("onnxruntime", "onnxruntime_int8")}
MEASURED_KEYS = ("latency_ms", "latency_p10_ms", "latency_p90_ms")
OPTIONS_FILE = "search_options.yaml"
PROFILE_COPY = "profile.yaml"


@dataclass
class Costing:
    """How a profiled search prices its trials."""

    profile: HardwareProfile
    source: str                  # the profile file the user gave
    measure_trials: bool = False
    measure_front: bool = False

    def trial_metrics(self, metrics: Dict, model, artifact: Artifact, example: torch.Tensor,
                      space_source: Optional[str] = None) -> Dict:
        """``metrics`` of an applied recipe with the cost metrics replaced by the profile's prediction for
        its deployed ``artifact`` (priced by what its method says it is: ``artifact.quant``)."""
        out = dict(metrics)
        measured = {k: out.pop(k) for k in MEASURED_KEYS if k in out}
        if self.measure_trials:
            out.update({f"measured_{k}": v for k, v in measured.items()})
        out.update(price_deployed(self.profile, model, artifact, example, space=space_source))
        return out


def check_profile(profile: HardwareProfile, space) -> HardwareProfile:
    """Refuse a profile that does not price the space's deployment (threads, batch, runtime) or is
    unfinished; each mismatch is named with the profile file, its key, the values and the fix."""
    where = profile.source or "<profile>"
    if profile.status != "complete":
        raise ProfileError("the profile is partial (its measurement was interrupted)", file=where, key="status",
                           value=profile.status, fix=f"finish it: {profile.reprofile_command(space.source)}")
    deploy = space.deploy
    allowed = PROFILE_RUNTIMES.get(deploy.runtime, (deploy.runtime,))
    clash = []
    # a modelled accelerator is the target itself: the space's threads and runtime are the CPU's
    if profile.device.threads != deploy.threads and not profile.modelled:
        clash.append(("device.threads", profile.device.threads, deploy.threads, "deploy.threads", "--threads"))
    if profile.device.batch != deploy.batch:
        clash.append(("device.batch", profile.device.batch, deploy.batch, "deploy.batch", "--batch"))
    if profile.device.runtime not in allowed and not profile.modelled:
        clash.append(("device.runtime", profile.device.runtime, deploy.runtime, "deploy.runtime", "--runtime"))
    if clash:
        text = "; ".join(f"{k} is {p!r} in the profile but the space deploys with {sk}: {s!r}"
                         for k, p, s, sk, _ in clash)
        flags = " ".join(f"{flag} {s}" for _, _, s, _, flag in clash)
        command = (f"automl profile model --accelerator {profile.accelerator.name}" if profile.modelled
                   else "automl profile measure")
        raise ProfileError(f"the profile does not match the space's deploy settings ({text})", file=where,
                           key=", ".join(c[0] for c in clash),
                           value={c[0]: c[1] for c in clash},
                           fix=f"{'build' if profile.modelled else 'measure'} a profile for this setup ('{command} "
                               f"--space {space.source or '<space.yaml>'} {flags} --out <new profile.yaml>'), or set "
                               + ", ".join(f"{sk}: {p}" for _, p, _, sk, _ in clash) + " in the space")
    return profile


def check_metrics(space, costing: Optional[Costing]):
    """Objectives and constraints that only a profiled search reports."""
    used = list(space.objectives) + list(space.constraints)
    need = {"energy_mj": costing is not None,
            "measured_latency_ms": costing is not None and costing.measure_trials}
    for metric in used:
        if metric in need and not need[metric]:
            fix = ("pass --profile <profile.yaml> (energy is predicted from a hardware profile)"
                   if metric == "energy_mj" else
                   "pass --profile with --measure-trials, or use latency_ms (measured when no profile is given)")
            where = "objectives" if metric in space.objectives else "constraints"
            raise ConfigError(f"metric '{metric}' is reported only by a search with a hardware profile"
                              + ("" if metric == "energy_mj" else " and --measure-trials"),
                              file=space.source, key=f"{where}.{metric}", value=metric, fix=fix)


def load_costing(profile, space, *, measure_trials: bool = False, measure_front: bool = False
                 ) -> Optional[Costing]:
    """The costing of a search: None without a profile (latency measured in each trial, as before)."""
    if profile is None:
        if measure_trials or measure_front:
            flag = "--measure-trials" if measure_trials else "--measure-front"
            raise ConfigError(f"{flag} compares predicted with measured latency and needs a hardware profile",
                              key=flag, value=True,
                              fix="pass --profile <profile.yaml>, or drop the flag (without a profile every "
                                  "trial's latency is measured)")
        check_metrics(space, None)
        return None
    loaded = profile if isinstance(profile, HardwareProfile) else HardwareProfile.load(profile)
    source = str(loaded.source) if loaded.source else "<profile given in memory>"
    if loaded.modelled and measure_front:
        raise ConfigError("--measure-front times the Pareto front on this CPU, but the profile models an "
                          f"accelerator ({loaded.device.cpu_model}) that is not here", key="--measure-front",
                          value=source, fix="drop --measure-front; a modelled profile has no device to compare with")
    costing = Costing(check_profile(loaded, space), source, measure_trials, measure_front)
    check_metrics(space, costing)
    return costing


def example_batch(task, batch: int) -> torch.Tensor:
    """The deployed batch (repeating the first sample when the task has fewer)."""
    x = task.example_input(batch)
    return x if x.shape[0] == batch else x[:1].repeat(batch, *([1] * (x.dim() - 1)))


# run directory: the profile travels with the run so `automl resume` prices trials the same way ----
def save_costing(run_dir: Path, costing: Optional[Costing]):
    if costing is None:
        return
    write_yaml(Path(run_dir) / PROFILE_COPY, costing.profile.to_dict())
    write_yaml(Path(run_dir) / OPTIONS_FILE, {"version": 1, "profile": costing.source, "profile_copy": PROFILE_COPY,
                                              "measure_trials": costing.measure_trials,
                                              "measure_front": costing.measure_front})


def restore_costing(run_dir: Path) -> Optional[Costing]:
    """The costing an earlier search in ``run_dir`` used (its copy of the profile), or None."""
    path = Path(run_dir) / OPTIONS_FILE
    if not path.is_file():
        return None
    opts = load_yaml(path)
    keys = ("profile", "measure_trials", "measure_front")
    if not isinstance(opts, dict) or any(k not in opts for k in keys) or not isinstance(opts["profile"], str):
        raise RunDirError(f"{path}: not a search options file written by automl (needs {', '.join(keys)}). "
                          "Fix: start a new search; this run directory cannot be resumed")
    # the copy is always the run directory's own file: a path stored in a received directory could
    # name any file on this machine
    copy = Path(run_dir) / PROFILE_COPY
    if copy.is_symlink() or not copy.resolve().is_relative_to(Path(run_dir).resolve()):
        raise RunDirError(f"{copy}: the profile copy must be a plain file inside the run directory. "
                          "Fix: start a new search; this run directory cannot be resumed")
    profile = HardwareProfile.load(copy)
    profile.source = opts["profile"]   # errors and re-profile commands name the user's file
    return Costing(profile, opts["profile"], bool(opts["measure_trials"]), bool(opts["measure_front"]))


# report -------------------------------------------------------------------------------------------
VALIDATION_KEYS = ("samples", "within_10pct", "within_5pct", "kendall_tau", "rmspe", "mean_error", "worst_error",
                   "date")


def profile_report(costing: Costing, space) -> Dict:
    """The profile's identity and quality, and where each metric comes from."""
    p = costing.profile
    if p.modelled:
        return _modelled_report(costing, space)
    energy = one_source(e.energy_source for e in p.entries.values())
    sources = {
        "latency_ms": "predicted from the hardware profile (per-layer entries + fitted whole-model correction)",
        "energy_mj": f"predicted from the hardware profile; energy {energy}"
                     + (" (Horowitz 45 nm per-operation model, not a measurement)" if energy == "modelled" else ""),
        "accuracy": "measured: validation accuracy of the deployed model",
        "test_accuracy": "measured: test accuracy of the deployed model",
        "size_kb": "measured: deflate-compressed size of the deployed file",
    }
    if costing.measure_trials:
        sources["measured_latency_ms"] = (f"measured inside each trial: median of batch-{space.deploy.batch} runs "
                                          f"of the deployed ONNX model, {space.deploy.threads} thread(s)")
    return {
        "path": costing.source, "status": p.status, "created": p.created, "device": config_to_dict(p.device),
        "measured_for_space": dict(p.space), "same_space": p.space.get("hash") == space.hash,
        "entries": len(p.entries), "energy_source": energy,
        "corrections": {k: {"models": c.models, "rmspe": c.rmspe} for k, c in p.corrections.items()},
        "validation": {k: p.validation[k] for k in VALIDATION_KEYS if k in p.validation},
        "metric_sources": sources,
    }


def _modelled_report(costing: Costing, space) -> Dict:
    """profile_report of a modelled accelerator profile: every cost metric says it is modelled."""
    p = costing.profile
    acc = p.accelerator
    sources = {
        "latency_ms": f"MODELLED, not measured: analytic {acc.name} model ({p.device.cpu_model}); per layer "
                      "max(bit-brick compute cycles, DRAM cycles) / clock, each conv/linear at its own bit-widths",
        "energy_mj": "MODELLED, not measured: Horowitz 45 nm MAC energy scaled by bit-width plus SRAM and DRAM "
                     "traffic per layer",
        "accuracy": "measured: validation accuracy of the deployed model (simulated low-bit models compute in "
                    "float on this CPU)",
        "test_accuracy": "measured: test accuracy of the deployed model",
        "size_kb": "measured: deflate-compressed size of the deployed file",
    }
    if costing.measure_trials:
        sources["measured_latency_ms"] = ("measured inside each trial on this CPU (onnxruntime), not on the "
                                          "accelerator")
    return {
        "path": costing.source, "status": p.status, "created": p.created, "device": config_to_dict(p.device),
        "accelerator": config_to_dict(acc), "measured_for_space": dict(p.space),
        "same_space": p.space.get("hash") == space.hash, "entries": len(p.entries), "energy_source": "modelled",
        "latency_source": "modelled", "corrections": {}, "validation": {}, "metric_sources": sources,
    }
