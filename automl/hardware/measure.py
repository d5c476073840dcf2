"""Measuring a profile: the timing protocol, runners for single layers and whole models, RAPL energy,
and the resumable profile builder.

Protocol (see :class:`automl.hardware.profile.Protocol`): fixed intra-op threads; ``chunk`` runners
at a time (plus an empty model and a fixed reference layer) are warmed up, then timed round-robin in a shuffled order,
``block`` consecutive calls each per round, until each runner's median moved by less than
``rel_tol`` (or ``abs_tol_ms``) for ``stable_rounds`` rounds after ``min_repeats`` calls, or
``max_repeats`` is reached. Interleaving spreads the machine's drift over all runners of a chunk;
the empty model timed in the same rounds gives the per-call overhead subtracted from each entry.
An early-exit candidate with an exit plan runs through its deployed runner, one runner per batch of
the plan's inputs; its latency is the mean over those batches of their medians (the cost depends on
where each input leaves, so no single example represents it).
A fixed reference layer timed in every chunk (of layers and of whole models) shows when the shared
machine was busier than usual: such a chunk is measured again (see ``Protocol.max_drift``). Times
are not rescaled by the reference: measured here, a busy neighbour slowed the reference layer by 26%
and the whole models beside it by less, so rescaling over-corrected.

Layers holding at least ``cold_min_kb`` of weights are also timed *cold*: round-robin over copies of
the layer with their own weights, together three times the size of L2 (``cold_copies`` at most), so
each call finds its weights evicted to L3 as in a whole model too big for L2 while the code and the
input stay hot (see profile.Entry). Flushing L2 with a buffer before each call was tried and
rejected: it evicts the runtime's code too, and a 50 KB model then seemed to lose 30 us to L3.

The profile file is rewritten atomically after every chunk, so an interrupted run resumes where it
stopped: entries already in the file are not measured again.
"""
from __future__ import annotations

import itertools
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch

from automl.errors import MeasurementError, ProfileError
from automl.hardware.layer_models import (context_onnx, identity_onnx, input_array, input_shape, layer_module,
                                          layer_onnx, quantize_onnx)
from automl.hardware.layers import LayerKey, modelled_energy_mj, weight_bytes
from automl.hardware.profile import DeviceInfo, Entry, HardwareProfile, Protocol

OVERHEAD = "__overhead__"
REFERENCE = "__reference__"
# onnxruntime runs these in its own blocked layouts (NCHWc fp32, NHWC uint8), converting at a graph's
# edges: a layer timed alone pays conversions that inside a network happen once (measured here: an int8
# maxpool cost 8.9 us alone, 3.8 us in a network). Their entries are timed in context.
CONTEXT_PRECISIONS = ("fp32", "int8_static")
REFERENCE_KEY = LayerKey.make("conv", in_ch=16, out_ch=16, h=8, w=8, kernel=3, stride=1, padding=1, groups=1,
                              bn=True, act="relu")
RAPL_ROOT = Path("/sys/class/powercap")


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    energy_uj: Optional[float] = None   # package energy over all timed runs, when RAPL is readable
    drift: float = 1.0                  # reference time in this chunk / its usual time
    exit_shares: Optional[Tuple[float, ...]] = None   # early exit: share of the inputs leaving at each early exit


class Progress:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, unit: str = "entries", stream=None, enabled: bool = True):
        self.total, self.label, self.unit, self.done = max(total, 1), label, unit, 0
        self.stream = stream or sys.stderr
        self.enabled, self.start, self.last_decile = enabled and total > 0, time.perf_counter(), -1
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, n: int = 1):
        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = elapsed / self.done if self.done else 0.0
        eta = rate * (self.total - self.done)
        filled = int(30 * self.done / self.total)
        line = (f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {self.unit}, "
                f"{rate:.2f} s each, ETA {int(eta // 60)}m{int(eta % 60):02d}s")
        decile = 10 * self.done // self.total
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done >= self.total else ""))
        elif decile != self.last_decile:
            self.stream.write(line + "\n")
        self.last_decile = decile
        self.stream.flush()


class RaplMeter:
    """Package energy from Linux powercap (intel-rapl / amd energy), summed over packages."""

    def __init__(self, root=RAPL_ROOT):
        self.domains = []
        for d in sorted(Path(root).glob("*rapl:[0-9]*")) if Path(root).exists() else []:
            if d.name.count(":") != 1:          # sub-domains (core, dram) are inside the package
                continue
            try:
                int((d / "energy_uj").read_text())
                wrap = int((d / "max_energy_range_uj").read_text()) if (d / "max_energy_range_uj").exists() else 0
            except (OSError, ValueError):
                continue
            self.domains.append((d / "energy_uj", wrap))

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def read(self) -> List[int]:
        return [int(path.read_text()) for path, _ in self.domains]

    def since(self, start: List[int]) -> float:
        """Microjoules since ``start``, across a counter wrap-around."""
        total = 0.0
        for (_, wrap), a, b in zip(self.domains, start, self.read()):
            total += b - a if b >= a else b + wrap - a
        return total


def time_interleaved(runners: Dict[str, Callable[[], object]], protocol: Protocol, *, meter: Optional[RaplMeter] = None,
                     seed: int = 0) -> Dict[str, Stats]:
    """Per-call wall times of every runner under the protocol (see the module docstring)."""
    rng = random.Random(seed)
    names = list(runners)
    for name in names:
        try:
            for _ in range(protocol.warmup):
                runners[name]()
        except Exception as exc:
            raise MeasurementError(f"running {name} failed: {type(exc).__name__}: {exc}") from exc
    samples = {n: [] for n in names}
    energy = {n: 0.0 for n in names}
    prev, stable, done = {n: None for n in names}, {n: 0 for n in names}, set()
    clock = time.perf_counter_ns
    while len(done) < len(names):
        order = [n for n in names if n not in done]
        rng.shuffle(order)
        for name in order:
            fn, times = runners[name], samples[name]
            start = meter.read() if meter else None
            for _ in range(protocol.block):
                t0 = clock()
                fn()
                times.append((clock() - t0) / 1e6)
            if meter:
                energy[name] += meter.since(start)
        for name in order:
            median = float(np.median(samples[name]))
            if prev[name] is not None and abs(median - prev[name]) <= max(protocol.rel_tol * median,
                                                                           protocol.abs_tol_ms):
                stable[name] += 1
            else:
                stable[name] = 0
            prev[name] = median
            n = len(samples[name])
            if (n >= protocol.min_repeats and stable[name] >= protocol.stable_rounds) or n >= protocol.max_repeats:
                done.add(name)
    out = {}
    for name, times in samples.items():
        p10, median, p90 = np.percentile(times, [10, 50, 90])
        if not np.isfinite(median) or median <= 0:
            raise MeasurementError(f"{name}: latency measurement gave {median} ms")
        out[name] = Stats(float(median), float(p10), float(p90), len(times), energy[name] if meter else None)
    return out


# runners -------------------------------------------------------------------------------------------
def _ort_runner(path, x: np.ndarray, threads: int) -> Callable[[], object]:
    from automl.runtime import OrtModel

    model = OrtModel(path, threads=threads)   # the deployed session options
    return lambda: model(x)


def _torch_runner(module: torch.nn.Module, x: np.ndarray) -> Callable[[], object]:
    tensor = torch.from_numpy(x)

    def run():
        with torch.inference_mode():
            return module(tensor)
    return run


def layer_runner(key: LayerKey, runtime: str, threads: int, work_dir: Path, copies: int = 1) -> Callable[[], object]:
    """One layer alone on ``runtime`` at its precision; with ``copies`` > 1, each call runs the next of
    that many instances, each holding its own weights (see cold_runner)."""
    x = input_array(key)
    if runtime == "torch":
        if key.precision != "fp32":
            raise ProfileError("the torch runtime runs fp32 layers only", key="--runtime", value=key.id,
                               fix="profile int8 layers with --runtime onnxruntime")
        torch.set_num_threads(threads)
        runs = [_torch_runner(layer_module(key), x) for _ in range(copies)]
    else:
        path = _onnx_at_precision(layer_onnx(key), key, Path(work_dir) / f"layer_{abs(hash(key))}.onnx", alone=True)
        runs = [_ort_runner(path, x, threads) for _ in range(copies)]   # a session holds its own weights
    if copies == 1:
        return runs[0]
    turn = itertools.cycle(runs)
    return lambda: next(turn)()


def _onnx_at_precision(model: onnx.ModelProto, key: LayerKey, path: Path, alone: bool = False) -> Path:
    """``model`` saved at ``path``, quantized to ``key.precision`` (calibrated on the key's inputs)."""
    onnx.save(model, path)
    if key.precision == "fp32":
        return path
    return quantize_onnx(path, path.with_name(path.stem + f".{key.precision}.onnx"), key.precision,
                         [input_array(key, seed=s) for s in range(1, 5)], alone=alone)


def context_runner(key: LayerKey, threads: int, work_dir: Path, with_layer: bool = True,
                   session: int = 0) -> Callable[[], object]:
    """The layer behind its producer, or the producer alone (context_onnx), quantized as a network;
    ``session`` numbers independent copies (own file, own onnxruntime session)."""
    name = f"{'ctx' if with_layer else 'prod'}{session}_{abs(hash(key if with_layer else input_shape(key)))}"
    path = _onnx_at_precision(context_onnx(key, with_layer), key, Path(work_dir) / f"{name}.onnx")
    return _ort_runner(path, input_array(key), threads)


def cold_runner(key: LayerKey, runtime: str, threads: int, work_dir: Path, protocol: Protocol,
                l2_cache_kb: int) -> Callable[[], object]:
    """The layer cycling over copies whose weights together are 3x L2 (6 MB when L2 is unknown)."""
    copies = min(protocol.cold_copies, max(2, math.ceil(3 * 1024 * (l2_cache_kb or 2048) / weight_bytes(key))))
    return layer_runner(key, runtime, threads, work_dir, copies)


def times_cold(key: LayerKey, protocol: Protocol) -> bool:
    return weight_bytes(key) >= protocol.cold_min_kb * 1024


def overhead_runner(runtime: str, threads: int, work_dir: Path) -> Callable[[], object]:
    x = np.zeros((1, 1, 8, 8), dtype=np.float32)
    if runtime == "torch":
        return _torch_runner(torch.nn.Identity(), x)
    path = Path(work_dir) / "identity.onnx"
    onnx.save(identity_onnx(x.shape), path)
    return _ort_runner(path, x, threads)


def model_runner(candidate, runtime: str, threads: int, work_dir: Path, name: str) -> Callable[[], object]:
    """A whole candidate in its deployed form: exported ONNX (quantized at its precision) or torch eager."""
    x = candidate.example.numpy().astype(np.float32)
    if runtime == "torch":
        torch.set_num_threads(threads)
        return _torch_runner(candidate.model.eval(), x)
    from automl.runtime import export_onnx

    path = export_onnx(candidate.model, candidate.example[:1], Path(work_dir) / f"{name}.onnx").path
    if candidate.precision != "fp32":
        rng = np.random.default_rng(0)
        calib = [rng.standard_normal(x.shape).astype(np.float32) for _ in range(4)]
        path = quantize_onnx(path, path.with_name(f"{name}.{candidate.precision}.onnx"), candidate.precision, calib)
    return _ort_runner(path, x, threads)


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


def _time_with_reference(runners: Dict[str, Callable[[], object]], runtime: str, threads: int, protocol: Protocol,
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


def early_exit_runners(candidate, runtime: str, threads: int, work_dir: Path
                       ) -> Tuple[Dict[str, Callable[[], object]], Tuple[float, ...]]:
    """One runner per batch of ``candidate.exit_plan.inputs`` through the deployed early-exit model (the
    segment graphs of ``export_early_exit`` chained by EarlyExitRunner; torch: ``EarlyExitModel.infer``),
    and the share of the inputs leaving at each early exit there."""
    plan = candidate.exit_plan
    if candidate.precision != "fp32":
        raise ProfileError("early exit deploys float segment graphs only", key="precision",
                           value=candidate.precision, fix="validate early-exit candidates with an fp32 profile")
    size = candidate.example.shape[0]
    x = plan.inputs.detach().numpy().astype(np.float32)
    batches = [np.ascontiguousarray(x[i:i + size]) for i in range(0, len(x) - size + 1, size)]
    if runtime == "torch":
        torch.set_num_threads(threads)
        model, tensors = candidate.model.eval(), [torch.from_numpy(b) for b in batches]
        run = lambda b: model.infer(b, list(plan.thresholds), plan.criterion)  # noqa: E731
        inputs = tensors
    else:
        from automl.compress.early_exit_export import EarlyExitRunner, export_early_exit

        manifest = export_early_exit(candidate.model, candidate.example[:1], Path(work_dir) / "early_exit",
                                     list(plan.thresholds), plan.criterion)
        run, inputs = EarlyExitRunner.load(manifest.parent, threads=threads), batches
    taken = np.concatenate([np.asarray(run(b)[1]) for b in inputs])
    counts = np.bincount(taken, minlength=len(plan.thresholds) + 1)
    shares = tuple(float(c) / len(taken) for c in counts[:-1])
    return {f"batch_{j}": (lambda b=b: run(b)) for j, b in enumerate(inputs)}, shares


def measure_early_exit(candidate, *, runtime: str, threads: int, protocol: Protocol) -> Stats:
    """An early-exit candidate's mean latency per call over its plan's inputs (see the module docstring),
    with the exit shares its deployed runner produced on them."""
    with tempfile.TemporaryDirectory(prefix="automl-exits-") as tmp:
        runners, shares = early_exit_runners(candidate, runtime, threads, Path(tmp))
        names = list(runners)
        stats, drift = _time_with_reference(runners, runtime, threads, protocol, Path(tmp))
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
            stats, drift = _time_with_reference(runners, runtime, threads, protocol, Path(tmp))
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
def with_retries(attempt: Callable[[], tuple], protocol: Protocol, usual_ms: float) -> tuple:
    """Run ``attempt() -> (result, reference ms)``; while the reference is off the usual time by more
    than ``max_drift``, pause and try again (``retries`` times). Returns (result closest to usual, drift)."""
    best = None
    for i in range(protocol.retries + 1):
        if i:
            time.sleep(protocol.retry_pause_s)
        result, ref = attempt()
        drift = ref / usual_ms if ref and usual_ms > 0 else 1.0
        if best is None or abs(drift - 1) < abs(best[1] - 1):
            best = (result, drift)
        if abs(drift - 1) <= protocol.max_drift:
            break
    return best


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
