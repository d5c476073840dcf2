"""Measuring a profile: layers and whole candidates timed with the protocol of timing.py through the
runners of runners.py, and the resumable profile builder.

An early-exit candidate's latency is the mean over its plan's input batches of their medians.
The profile file is rewritten atomically after every chunk, so an interrupted run resumes where it
stopped: entries already in the file are not measured again.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from automl.errors import ProfileError
from automl.hardware.layer_models import input_shape
from automl.hardware.layers import LayerKey, modelled_energy_mj
from automl.hardware.profile import DeviceInfo, Entry, HardwareProfile, Protocol
from automl.hardware.runners import (CONTEXT_PRECISIONS, cold_runner, context_runner, early_exit_runners, layer_runner,
                                     model_runner, overhead_runner, times_cold)
from automl.hardware.timing import (OVERHEAD, REFERENCE, REFERENCE_KEY, Progress, RaplMeter, Stats, time_interleaved,
                                    with_retries)


def measure_layers(keys: Sequence[LayerKey], *, runtime: str, threads: int, protocol: Protocol,
                   meter: Optional[RaplMeter] = None, l2_cache_kb: int = 0
                   ) -> Tuple[Dict[LayerKey, Stats], Stats, Stats, Dict[LayerKey, Stats], Dict[LayerKey, float]]:
    """One chunk: every key alone (and cold, see times_cold), interleaved with the empty model and the
    reference layer; returns (stats per key, empty model, reference layer, cold stats per key, context
    ms per key). fp32 and static int8 layers on onnxruntime are also timed in context (context_runner,
    CONTEXT_PRECISIONS): the layer behind its producer less the producer alone, the median over
    ``protocol.context_sessions`` independent pairs of sessions."""
    with tempfile.TemporaryDirectory(prefix="automl-profile-") as tmp:
        runners = {OVERHEAD: overhead_runner(runtime, threads, Path(tmp)),
                   REFERENCE: layer_runner(REFERENCE_KEY, runtime, threads, Path(tmp))}
        for k in keys:
            runners[k.id] = layer_runner(k, runtime, threads, Path(tmp))
            if times_cold(k, protocol):
                runners["cold:" + k.id] = cold_runner(k, runtime, threads, Path(tmp), protocol, l2_cache_kb)
            for s in range(protocol.context_sessions if k.precision in CONTEXT_PRECISIONS and runtime != "torch"
                           else 0):
                runners[f"ctx{s}:{k.id}"] = context_runner(k, threads, Path(tmp), session=s)
                if f"prod{s}:{input_shape(k)}" not in runners:
                    runners[f"prod{s}:{input_shape(k)}"] = context_runner(k, threads, Path(tmp), with_layer=False,
                                                                          session=s)
        stats = time_interleaved(runners, protocol, meter=meter)
    context = {k: max(float(np.median([stats[f"ctx{s}:{k.id}"].median_ms - stats[f"prod{s}:{input_shape(k)}"].median_ms
                                       for s in range(protocol.context_sessions)])), 0.0)
               for k in keys if f"ctx0:{k.id}" in stats}
    cold = {k: stats["cold:" + k.id] for k in keys if "cold:" + k.id in stats}
    return {k: stats[k.id] for k in keys}, stats[OVERHEAD], stats[REFERENCE], cold, context


def time_with_reference(runners: Dict[str, Callable[[], object]], runtime: str, threads: int, protocol: Protocol,
                         work_dir: Path) -> Tuple[Dict[str, Stats], float]:
    """Time ``runners`` interleaved, with the reference layer when the protocol has its usual time, measuring
    again while the machine drifts (with_retries); returns (stats, drift)."""
    runners = dict(runners)
    if protocol.reference_ms > 0:
        runners[REFERENCE] = layer_runner(REFERENCE_KEY, runtime, threads, work_dir)

    def attempt():
        stats = time_interleaved(runners, protocol)
        return stats, stats[REFERENCE].median_ms if REFERENCE in stats else None
    return with_retries(attempt, protocol, protocol.reference_ms)


def measure_early_exit(candidate, *, runtime: str, threads: int, protocol: Protocol) -> Stats:
    """An early-exit candidate's mean latency per call over its plan's inputs (see the module docstring),
    with the exit shares its deployed runner produced on them."""
    with tempfile.TemporaryDirectory(prefix="automl-exits-") as tmp:
        runners, shares = early_exit_runners(candidate, runtime, threads, Path(tmp))
        names = list(runners)
        stats, drift = time_with_reference(runners, runtime, threads, protocol, Path(tmp))
    mean = lambda f: float(np.mean([getattr(stats[n], f) for n in names]))  # noqa: E731
    return Stats(mean("median_ms"), mean("p10_ms"), mean("p90_ms"), sum(stats[n].runs for n in names),
                 drift=drift, exit_shares=shares)


def measure_candidates(candidates: Sequence, *, runtime: str, threads: int, protocol: Protocol,
                       progress: Optional[Progress] = None) -> List[Stats]:
    """Whole candidates, ``protocol.chunk`` at a time interleaved; one Stats per candidate. With
    ``protocol.reference_ms`` set, a chunk measured while the machine drifted is measured again. An
    early-exit candidate with an exit plan is measured alone through its runner (measure_early_exit)."""
    out: List[Optional[Stats]] = [None] * len(candidates)
    whole = [i for i, c in enumerate(candidates) if getattr(c, "exit_plan", None) is None]
    for start in range(0, len(whole), protocol.chunk):
        chunk = whole[start:start + protocol.chunk]
        with tempfile.TemporaryDirectory(prefix="automl-models-") as tmp:
            runners = {f"model_{i}": model_runner(candidates[i], runtime, threads, Path(tmp), f"model_{i}")
                       for i in chunk}
            stats, drift = time_with_reference(runners, runtime, threads, protocol, Path(tmp))
        for i in chunk:
            out[i] = replace(stats[f"model_{i}"], drift=drift)
        if progress:
            progress.update(len(chunk))
    for i in (i for i, c in enumerate(candidates) if getattr(c, "exit_plan", None) is not None):
        out[i] = measure_early_exit(candidates[i], runtime=runtime, threads=threads, protocol=protocol)
        if progress:
            progress.update(1)
    return out


# the resumable builder -----------------------------------------------------------------------------
def make_entry(key: LayerKey, stats: Stats, overhead_ms: float, drift: float = 1.0,
               cold: Optional[Stats] = None, context_ms: Optional[float] = None) -> Entry:
    """The entry of a layer timed alone: its median less the empty model's time, or ``context_ms`` where
    the layer was timed in context (its cold time then keeps the cold - warm difference of the layer alone)."""
    if stats.energy_uj is not None:
        energy, source = stats.energy_uj / stats.runs * 1e-3, "measured"
    else:
        energy, source = modelled_energy_mj(key), "modelled"
    ns = lambda ms: round(float(ms), 6)  # noqa: E731  (1 ns resolution keeps the file readable)
    alone = max(stats.median_ms - overhead_ms, 0.0)
    latency = alone if context_ms is None else context_ms
    return Entry(key=key, latency_ms=ns(latency), raw_ms=ns(stats.median_ms),
                 p10_ms=ns(stats.p10_ms), p90_ms=ns(stats.p90_ms), runs=stats.runs,
                 energy_mj=float(f"{energy:.6g}"), energy_source=source, drift=round(float(drift), 6),
                 cold_ms=None if cold is None else ns(latency + max(cold.median_ms - overhead_ms - alone, 0.0)))


def _same_setup(old: DeviceInfo, new: DeviceInfo) -> List[str]:
    return [f"{f}: {getattr(old, f)!r} in the file, {getattr(new, f)!r} now"
            for f in ("kind", "cpu_model", "threads", "runtime", "runtime_version", "batch")
            if getattr(old, f) != getattr(new, f)]


# chunk -> (stats per key, empty model[, reference layer[, cold stats per key[, context ms per key]]])
MeasureChunk = Callable[[Sequence[LayerKey]], tuple]


def build_profile(keys: Sequence[LayerKey], out, *, device: DeviceInfo, protocol: Protocol = Protocol(),
                  space: Optional[Dict[str, str]] = None, measure_chunk: Optional[MeasureChunk] = None,
                  progress: bool = True) -> HardwareProfile:
    """Measure every key not yet in the profile at ``out`` (created, or resumed when it exists with the
    same device and runtime), saving atomically after each chunk. Returns the profile (status partial:
    the caller fits the correction and marks it complete)."""
    out = Path(out)
    if measure_chunk is None:
        meter = RaplMeter()
        meter = meter if meter.available else None
        measure_chunk = lambda chunk: measure_layers(chunk, runtime=device.runtime, threads=device.threads,  # noqa
                                                     protocol=protocol, meter=meter, l2_cache_kb=device.l2_cache_kb)
    if out.exists():
        profile = HardwareProfile.load(out)
        clash = _same_setup(profile.device, device)
        if clash:
            raise ProfileError(f"{out} exists and was measured on another setup ({'; '.join(clash)})", file=out,
                               fix="choose another --out, or delete the file to measure it again")
        protocol = replace(protocol, overhead_ms=profile.protocol.overhead_ms,
                           reference_ms=profile.protocol.reference_ms)
    else:
        profile = HardwareProfile(device=device, protocol=protocol)
    precisions = sorted(set(profile.device.precisions) | {k.precision for k in keys} | set(device.precisions),
                        key=lambda p: ("fp32", "int8_static", "int8_dynamic").index(p))
    profile.device = replace(device, precisions=tuple(precisions))
    profile.space = dict(space or profile.space)
    profile.status = "partial"
    todo = [k for k in dict.fromkeys(keys) if k not in profile.entries]
    overheads = [protocol.overhead_ms] if profile.entries and protocol.overhead_ms > 0 else []
    bar = Progress(len(todo), "profiling layers", enabled=progress)
    refs = [e.drift * protocol.reference_ms for e in profile.entries.values()] if protocol.reference_ms > 0 else []
    for start in range(0, len(todo), protocol.chunk):
        chunk = todo[start:start + protocol.chunk]

        def attempt(chunk=chunk):
            result = measure_chunk(chunk)
            return result, (result[2].median_ms if len(result) > 2 and result[2] is not None else None)
        (results, empty, *rest), _ = with_retries(attempt, protocol, float(np.median(refs)) if refs else 0.0)
        ref, cold, context = rest[:1], (rest[1] if len(rest) > 1 else {}), (rest[2] if len(rest) > 2 else {})
        overheads.append(empty.median_ms)
        if ref and ref[0] is not None:
            refs += [ref[0].median_ms] * len(chunk)
            protocol = replace(protocol, reference_ms=float(np.median(refs)))
        for key in chunk:
            drift = ref[0].median_ms / protocol.reference_ms if ref and ref[0] is not None else 1.0
            profile.entries[key] = make_entry(key, results[key], empty.median_ms, drift, cold.get(key),
                                              context.get(key))
        profile.protocol = protocol = replace(protocol, overhead_ms=float(np.median(overheads)))
        profile.save(out)
        bar.update(len(chunk))
    if not todo:
        profile.save(out)
    return profile


def profile_space(space, out, *, runtime: str = "onnxruntime", threads: int = 1, batch: Optional[int] = None,
                  samples: int = 200, calibration_models: int = 24, protocol: Protocol = Protocol(),
                  task=None, progress: bool = True, log=print) -> HardwareProfile:
    """``automl profile measure``: enumerate the space's layers, measure them (resumable), fit the
    whole-model correction per precision, and save the profile as complete."""
    from automl.hardware.candidates import space_layer_keys
    from automl.hardware.profile import detect_device
    from automl.hardware.validate import calibrate, calibrate_handoff

    task = task if task is not None else space.build_task()
    batch = batch or space.deploy.batch
    started = time.perf_counter()
    keys, counts = space_layer_keys(space, runtime=runtime, batch=batch, samples=samples, task=task)
    log(f"{counts['keys']} distinct layers from {counts['models']} distinct models ({counts['configs']} configs"
        + (f"; {counts['skipped']} skipped: {runtime} does not deploy their precision" if counts["skipped"] else "")
        + (f"; {counts['invalid']} refused by their method (e.g. more exits than blocks)" if counts.get("invalid")
           else "") + f") in {time.perf_counter() - started:.0f} s")
    device = detect_device(threads=threads, runtime=runtime, precisions=sorted({k.precision for k in keys}),
                           batch=batch)
    profile = build_profile(keys, out, device=device, protocol=protocol, progress=progress,
                            space={"source": str(space.source), "hash": space.hash})
    calibrate(profile, space, per_precision=calibration_models, task=task, progress=progress)
    calibrate_handoff(profile, space, models=max(calibration_models // 2, 1), task=task, progress=progress)
    profile.status = "complete"
    profile.save(out)
    for p, c in profile.corrections.items():
        cold = f" + {c.d:.3f} x cold excess beyond {c.cache_kb} KB of L2" if c.d else ""
        log(f"correction {p}: latency = {c.a:.3f} x sum + {c.b * 1e3:.2f} us x layers + {c.c * 1e3:.2f} us{cold} "
            f"({c.models} models, fit RMSPE {100 * c.rmspe:.1f}%)")
        if c.handoff_models:
            log(f"early-exit hand-over {p}: {c.handoff_ms * 1e3:.2f} us + {c.handoff_ms_per_kb * 1e3:.3f} us per KB of "
                f"feature map ({c.handoff_models} models)")
    log(f"profiled in {time.perf_counter() - started:.0f} s -> {out}")
    return profile
