"""The hardware profile: a per-layer latency/energy lookup table measured on one device and runtime.

File layout (strict YAML, ``version: 1``)::

    version: 1
    status: complete            # 'partial' while `automl profile measure` runs; it resumes from it
    created: '2026-01-01T12:00:00'
    device: {kind: cpu, cpu_model: ..., logical_cpus: 2, threads: 1, runtime: onnxruntime,
             runtime_version: 1.32.0, precisions: [fp32, int8_static], batch: 1, platform: ..., torch_version: ...}
    space: {source: search_spaces/x.yaml, hash: ...}    # the space it was measured for
    protocol: {warmup: .., min_repeats: .., ..., overhead_ms: ..}
    entries:                    # one per distinct layer: op, precision, batch, shape
    - {op: conv, precision: fp32, batch: 1, shape: {in_ch: 1, out_ch: 8, ...}, latency_ms: .., raw_ms: ..,
       p10_ms: .., p90_ms: .., runs: .., energy_mj: .., energy_source: modelled, cold_ms: ..}
    correction: {fp32: {a: .., b: .., c: .., d: .., cache_kb: .., models: 12, rmspe: ..}}  # see Correction
    calibration: [{precision: fp32, sum_ms: .., n_layers: .., measured_ms: ..}, ...]
    validation: {...}           # figures of the last `automl profile validate`

A *modelled* profile (``device.kind: accelerator``, e.g. ``automl profile model --accelerator
bitfusion``) has no measurements: it carries an ``accelerator:`` section with the parameters of an
analytic model (automl.hardware.accelerator), entries computed by that model at one reference
precision (energy_source: modelled), and the predictor prices every other precision and shape
from the section.

``latency_ms`` is the median of the layer run alone minus the per-call overhead of an empty model,
both timed in the same interleaved rounds -- or, for fp32 and static int8 layers on onnxruntime, the
layer *in context*: behind a producer layer, less the producer alone (onnxruntime converts to its
blocked layouts at a graph's edges; see runners.CONTEXT_PRECISIONS). ``drift`` is the time of a fixed reference
layer in those rounds over ``protocol.reference_ms`` (the median over all chunks): a chunk whose reference is off by
more than ``max_drift`` was measured while the machine was busier or quieter than usual and is
measured again (``retries``), keeping the attempt closest to the usual time.

``cold_ms`` (layers holding at least ``protocol.cold_min_kb`` of weights) is the same layer timed
cycling over copies with their own weights, together larger than L2: its weights then come from
L3, as they do in a whole model whose weights do not fit in L2 together. A
layer timed alone again and again keeps its weights in L2, so ``latency_ms`` is its cost in a small
model; the predictor blends the two by how much of the model's weights L2 cannot hold.
"""
from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from automl.configs import config_to_dict, option, parse_config
from automl.errors import ConfigError, ProfileError
from automl.hardware.accelerator import RUNTIME as MODEL_RUNTIME
from automl.hardware.accelerator import AcceleratorConfig
from automl.hardware.layers import PRECISION_HELP, LayerKey, bit_pair, is_precision, key_from_dict
from automl.io import load_yaml, write_yaml
from automl.validate import Where, expect_keys, expect_mapping, expect_range, expect_type

PROFILE_VERSION = 1
ENERGY_SOURCES = ("measured", "modelled")
TOP_KEYS = ("version", "status", "created", "device", "space", "protocol", "entries", "correction",
            "calibration", "validation", "accelerator")
ENTRY_KEYS = ("op", "precision", "batch", "shape", "latency_ms", "raw_ms", "p10_ms", "p90_ms", "runs",
              "energy_mj", "energy_source", "drift", "cold_ms")
OPTIONAL_ENTRY_KEYS = ("drift", "cold_ms")


@dataclass(frozen=True)
class DeviceInfo:
    kind: str = option("cpu", choices=("cpu", "accelerator"), doc="device class (accelerator: modelled)")
    cpu_model: str = option("unknown", doc="from /proc/cpuinfo")
    logical_cpus: int = option(1, low=1, high=1_000_000)
    threads: int = option(1, low=1, high=4096, doc="intra-op threads the entries were measured with")
    runtime: str = option("onnxruntime", choices=("onnxruntime", "onnxruntime_int8", "torch", MODEL_RUNTIME))
    runtime_version: str = option("unknown")
    precisions: Tuple[str, ...] = option(("fp32",), doc="precisions the entries cover")
    batch: int = option(1, low=1, high=65_536)
    platform: str = option("unknown")
    torch_version: str = option("unknown")
    l2_cache_kb: int = option(0, low=0, doc="per-core L2 cache (0: unknown); sizes the cold flush and the "
                              "capacities the cold term's fit tries")


@dataclass(frozen=True)
class Protocol:
    warmup: int = option(20, low=0, high=1_000_000, doc="untimed calls per runner before timing")
    min_repeats: int = option(200, low=1, high=10_000_000, doc="timed calls per runner at least")
    max_repeats: int = option(4000, low=1, high=10_000_000, doc="timed calls per runner at most")
    block: int = option(50, low=1, high=1_000_000, doc="consecutive calls of one runner per round")
    rel_tol: float = option(0.02, low=0.0, high=1.0, doc="stable when the median moves less than this")
    abs_tol_ms: float = option(0.0002, low=0.0, doc="... or less than this many ms")
    stable_rounds: int = option(2, low=1, high=1000, doc="rounds in a row the median must be stable")
    chunk: int = option(8, low=1, high=10_000, doc="runners interleaved round-robin at a time")
    statistic: str = option("median", choices=("median",))
    overhead_ms: float = option(0.0, low=0.0, doc="per-call time of an empty model, subtracted from entries")
    reference_ms: float = option(0.0, low=0.0, doc="usual time of the reference layer timed in every chunk "
                                 "(median over the chunks; 0: not measured)")
    # measured here: the shared machine has a second state ~10 % slower for minutes at a time; 0.1
    # let whole chunks of it through, biasing the validation by as much
    max_drift: float = option(0.05, low=0.0, doc="re-measure a chunk whose reference is off by more than this")
    retries: int = option(6, low=0, high=100, doc="re-measurements of a drifting chunk")
    retry_pause_s: float = option(2.0, low=0.0, doc="pause before a re-measurement")
    cold_min_kb: float = option(32.0, low=0.0, doc="layers with at least this many KB of weights are also "
                                "timed cold (cycling over copies that together exceed L2); 0: every layer")
    cold_copies: int = option(64, low=2, high=4096, doc="copies a cold layer cycles over at most")
    context_sessions: int = option(3, low=1, high=15, doc="independent sessions a layer is timed in context in "
                                   "(the median difference is kept: one session in ~20 runs 1-2 us off)")


@dataclass(frozen=True)
class Entry:
    key: LayerKey
    latency_ms: float
    raw_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    energy_mj: float
    energy_source: str = "modelled"
    drift: float = 1.0      # reference time in this entry's chunk / protocol.reference_ms
    cold_ms: Optional[float] = None   # latency with the weights coming from beyond L2 (None: not timed cold)

    @property
    def cold_or_warm_ms(self) -> float:
        return self.latency_ms if self.cold_ms is None else self.cold_ms

    @property
    def spread(self) -> float:
        """(p90 - p10) / raw median."""
        return (self.p90_ms - self.p10_ms) / self.raw_ms if self.raw_ms > 0 else 0.0

    def to_dict(self) -> dict:
        out = self.key.to_dict()
        out.update({k: float(getattr(self, k)) for k in ("latency_ms", "raw_ms", "p10_ms", "p90_ms", "energy_mj",
                                                         "drift")})
        out.update(runs=int(self.runs), energy_source=self.energy_source)
        if self.cold_ms is not None:
            out["cold_ms"] = float(self.cold_ms)
        return {k: out[k] for k in ENTRY_KEYS if k in out}


@dataclass(frozen=True)
class Correction:
    """Whole-model latency = a * (sum of entries) + b * (number of layers) + c + d * (cold excess).

    The cold term: a layer measured alone keeps its weights in L2 between calls; in a model whose
    weights together exceed the effective L2 capacity ``cache_kb`` they come from L3. The cold excess
    is the share of the model's weights beyond that capacity times the summed (cold - warm) time of
    its layers (see predict.cold_share)."""

    a: float = option(1.0)
    b: float = option(0.0)
    c: float = option(0.0)
    d: float = option(0.0, low=0.0, doc="weight of the cold excess (the layers' cold - warm time, scaled by the "
                      "share of the weights beyond cache_kb)")
    cache_kb: int = option(0, low=0, doc="effective L2 capacity of the cold term, fitted (0: no cold term)")
    models: int = option(0, low=0, doc="whole models the fit used (0: not fitted)")
    rmspe: float = option(0.0, low=0.0, doc="root mean squared relative error of the fit on those models")
    # An early-exit model runs one graph per segment: each segment but the last also hands its feature
    # map to the next (out of the blocked layout, copied out of one session and into the next).
    handoff_ms: float = option(0.0, low=0.0, doc="early exit: fixed cost of one segment-to-segment hand-over")
    handoff_ms_per_kb: float = option(0.0, low=0.0, doc="early exit: hand-over cost per KB of feature map")
    handoff_models: int = option(0, low=0, doc="early-exit models the hand-over fit used (0: not fitted)")

    def apply(self, sum_ms: float, n_layers: int, cold_excess_ms: float = 0.0) -> float:
        return self.a * sum_ms + self.b * n_layers + self.c + self.d * cold_excess_ms

    def handoff(self, feature_bytes: float) -> float:
        """The hand-over of a ``feature_bytes`` feature map from one early-exit segment to the next."""
        return self.handoff_ms + self.handoff_ms_per_kb * feature_bytes / 1024


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (x86 'model name', ARM 'Hardware'/'Processor')."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for label in ("model name", "Hardware", "Processor", "cpu model"):
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == label and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def l2_cache_kb(cpu: int = 0) -> int:
    """Per-core L2 size from sysfs (0 when unknown)."""
    for index in sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                return int(size[:-1]) * (1024 if size.endswith("M") else 1) if size[-1] in "KM" else int(size) // 1024
        except (OSError, ValueError):
            continue
    return 0


def detect_device(*, threads: int, runtime: str, precisions, batch: int) -> DeviceInfo:
    import torch

    if runtime == "torch":
        version = str(torch.__version__)
    else:
        import onnxruntime

        version = str(onnxruntime.__version__)
    return DeviceInfo(cpu_model=cpu_model(), logical_cpus=os.cpu_count() or 1, threads=threads, runtime=runtime,
                      runtime_version=version, precisions=tuple(precisions), batch=batch,
                      platform=platform.platform(), torch_version=str(torch.__version__), l2_cache_kb=l2_cache_kb())


@dataclass
class HardwareProfile:
    device: DeviceInfo
    protocol: Protocol = field(default_factory=Protocol)
    entries: Dict[LayerKey, Entry] = field(default_factory=dict)
    corrections: Dict[str, Correction] = field(default_factory=dict)
    calibration: List[Dict[str, Any]] = field(default_factory=list)
    validation: Dict[str, Any] = field(default_factory=dict)
    space: Dict[str, str] = field(default_factory=dict)
    status: str = "partial"
    created: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))
    source: Optional[str] = None        # the file it was loaded from / saved to (not serialised)
    accelerator: Optional[AcceleratorConfig] = None   # the model of a modelled (accelerator) profile

    @property
    def modelled(self) -> bool:
        """True for an analytic accelerator profile: nothing in it was measured."""
        return self.accelerator is not None

    def reprofile_command(self, space: Optional[str] = None) -> str:
        space = space or self.space.get("source") or "<space.yaml>"
        if self.modelled:
            return (f"automl profile model --accelerator {self.accelerator.name} --space {space} --batch "
                    f"{self.device.batch} --out {self.source or '<profile.yaml>'}")
        return (f"automl profile measure --space {space} --device {self.device.kind} --threads "
                f"{self.device.threads} --runtime {self.device.runtime} --out {self.source or '<profile.yaml>'}")

    def missing(self, key: LayerKey, space: Optional[str] = None, why: str = "") -> ProfileError:
        """The error for a layer the profile cannot price: names the op and the command to re-profile."""
        return ProfileError(f"the profile has no entry for {key.describe()}{why}", file=self.source,
                            key="entries", value=key.id,
                            fix=f"profile the space this candidate comes from: {self.reprofile_command(space)}")

    def correction(self, precision: str) -> Correction:
        return self.corrections.get(precision, Correction())

    def to_dict(self) -> dict:
        out = {
            "version": PROFILE_VERSION, "status": self.status, "created": self.created,
            "device": config_to_dict(self.device), "space": dict(self.space),
            "protocol": config_to_dict(self.protocol),
            "entries": [self.entries[k].to_dict() for k in sorted(self.entries)],
            "correction": {p: config_to_dict(c) for p, c in self.corrections.items()},
            "calibration": list(self.calibration), "validation": dict(self.validation),
        }
        if self.modelled:
            out = {**{k: v for k, v in out.items() if k != "entries"},
                   "accelerator": config_to_dict(self.accelerator), "entries": out["entries"]}
        return out

    def save(self, path=None) -> Path:
        path = Path(path or self.source)
        write_yaml(path, self.to_dict())
        self.source = str(path)
        return path

    @classmethod
    def from_dict(cls, data, source: Optional[str] = None) -> "HardwareProfile":
        try:
            return _parse(data, source)
        except ProfileError:
            raise
        except ConfigError as exc:   # the shared validators raise ConfigError; a profile says ProfileError
            raise ProfileError(exc.message, file=exc.file or source, key=exc.key, value=exc.value,
                               fix=exc.fix) from None

    @classmethod
    def load(cls, path) -> "HardwareProfile":
        path = Path(path)
        if not path.exists():
            raise ProfileError("profile file not found", file=path,
                               fix="measure one with 'automl profile measure --space <space.yaml> --out "
                                   f"{path}'")
        try:
            data = load_yaml(path)
        except ConfigError as exc:
            raise ProfileError(exc.message, file=exc.file, key=exc.key, value=exc.value, fix=exc.fix) from None
        return cls.from_dict(data, str(path))


def _number(value, where: Where, low=None) -> float:
    value = expect_type(value, where, float)
    return expect_range(value, where, low, None)


def _entry(raw, where: Where) -> Entry:
    raw = expect_mapping(raw, where)
    expect_keys(raw, where, ENTRY_KEYS, required=tuple(k for k in ENTRY_KEYS if k not in OPTIONAL_ENTRY_KEYS))
    raw = {"drift": 1.0, **raw}
    try:
        key = key_from_dict(raw)
    except ConfigError as exc:
        raise ProfileError(exc.message, file=where.file, key=f"{where.key}.{exc.key}", value=exc.value,
                           fix=exc.fix) from None
    if raw["energy_source"] not in ENERGY_SOURCES:
        raise (where / "energy_source").error("not one of the allowed values", raw["energy_source"],
                                              f"use one of: {', '.join(ENERGY_SOURCES)}")
    nums = {k: _number(raw[k], where / k, 0.0) for k in ("latency_ms", "raw_ms", "p10_ms", "p90_ms", "energy_mj",
                                                          "drift")}
    runs = expect_range(expect_type(raw["runs"], where / "runs", int), where / "runs", 1)
    cold = None if raw.get("cold_ms") is None else _number(raw["cold_ms"], where / "cold_ms", 0.0)
    return Entry(key=key, runs=runs, energy_source=raw["energy_source"], cold_ms=cold, **nums)


def _parse(data, source) -> HardwareProfile:
    where = Where(source)
    data = expect_mapping(data, where)
    expect_keys(data, where, TOP_KEYS, required=("version", "device", "entries"))
    if isinstance(data["version"], bool) or data["version"] != PROFILE_VERSION:
        raise ProfileError("unsupported profile version", file=source, key="version", value=data["version"],
                           fix=f"use version: {PROFILE_VERSION} (re-measure with 'automl profile measure')")
    device = parse_config(DeviceInfo, data["device"], where / "device")
    for i, p in enumerate(device.precisions):
        if not is_precision(p):
            raise (where / "device" / "precisions" / i).error("unknown precision", p,
                                                              f"use {', '.join(PRECISION_HELP)}")
    status = data.get("status", "complete")
    if status not in ("partial", "complete"):
        raise (where / "status").error("not one of the allowed values", status, "use partial or complete")
    entries: Dict[LayerKey, Entry] = {}
    for i, raw in enumerate(expect_type(data["entries"] or [], where / "entries", list)):
        entry = _entry(raw, where / "entries" / i)
        if entry.key in entries:
            raise (where / "entries" / i).error("duplicate entry", entry.key.id, "keep one entry per layer key")
        entries[entry.key] = entry
    corrections = {}
    for p, raw in expect_mapping(data.get("correction") or {}, where / "correction").items():
        if not is_precision(p):
            raise (where / "correction" / p).error("unknown precision", p, f"use {', '.join(PRECISION_HELP)}")
        corrections[p] = parse_config(Correction, raw, where / "correction" / p)
    space = expect_mapping(data.get("space") or {}, where / "space")
    expect_keys(space, where / "space", ("source", "hash"))
    accelerator = None
    if data.get("accelerator") is not None:
        accelerator = parse_config(AcceleratorConfig, data["accelerator"], where / "accelerator")
    _check_modelled(device, accelerator, entries, where)
    return HardwareProfile(
        device=device, protocol=parse_config(Protocol, data.get("protocol"), where / "protocol"),
        entries=entries, corrections=corrections,
        calibration=list(expect_type(data.get("calibration") or [], where / "calibration", list)),
        validation=dict(expect_mapping(data.get("validation") or {}, where / "validation")),
        space={k: str(v) for k, v in space.items()}, status=status,
        created=str(data.get("created", "")), source=source, accelerator=accelerator)


def _check_modelled(device: DeviceInfo, accelerator, entries: Dict[LayerKey, Entry], where: Where) -> None:
    """A modelled profile says so everywhere: device kind, model runtime, the accelerator section and
    integer-pair entries with modelled energy; a measured one has none of them."""
    modelled = device.kind == "accelerator"
    if modelled != (accelerator is not None) or modelled != (device.runtime == MODEL_RUNTIME):
        raise (where / "device").error(
            "a modelled accelerator profile needs device.kind: accelerator, device.runtime: "
            f"{MODEL_RUNTIME} and an accelerator section together", {"kind": device.kind, "runtime": device.runtime,
                                                                    "accelerator": accelerator is not None},
            "rebuild it with 'automl profile model', or measure a CPU profile with 'automl profile measure'")
    if not modelled:
        return
    for i, (key, entry) in enumerate(entries.items()):
        if bit_pair(key.precision) is None or entry.energy_source != "modelled":
            raise (where / "entries" / i).error(
                "an accelerator profile holds modelled integer-pair entries only (the accelerator has no "
                "float or runtime-int8 kernel)", f"{key.precision}, energy_source {entry.energy_source}",
                "use a precision such as w8a8 and energy_source: modelled")
