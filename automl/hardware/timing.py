"""The timing protocol: interleaved, drift-checked timing of runners, RAPL energy and a progress line.

Protocol (see :class:`automl.hardware.profile.Protocol`): fixed intra-op threads; ``chunk`` runners
at a time (plus an empty model and a fixed reference layer) are warmed up, then timed round-robin in a shuffled order,
``block`` consecutive calls each per round, until each runner's median moved by less than
``rel_tol`` (or ``abs_tol_ms``) for ``stable_rounds`` rounds after ``min_repeats`` calls, or
``max_repeats`` is reached. Interleaving spreads the machine's drift over all runners of a chunk;
the empty model timed in the same rounds gives the per-call overhead subtracted from each entry.
A fixed reference layer timed in every chunk (of layers and of whole models) shows when the shared
machine was busier than usual: such a chunk is measured again (``with_retries``, ``Protocol.max_drift``).
Times are not rescaled by the reference: measured here, a busy neighbour slowed the reference layer by
26% and the whole models beside it by less, so rescaling over-corrected.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from automl.errors import MeasurementError
from automl.hardware.layers import LayerKey
from automl.hardware.profile import Protocol

OVERHEAD = "__overhead__"
REFERENCE = "__reference__"
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


