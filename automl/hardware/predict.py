"""Latency and energy of a candidate from a profile, without running it.

latency = a * sum(entries) + b * n_layers + c + d * share * sum(cold - warm), fitted per precision on
whole models measured by ``automl profile measure`` (weighted least squares on relative error). The
cold term prices what a layer timed alone again and again cannot see: it keeps its weights in L2, but
in a model whose weights exceed L2 together they come from L3 on every inference (measured here: a
5.7 MB fp32 CNN ran 1.6x its summed layers, a 0.9 MB one matched them). Each heavy layer's entry
holds its cold time too (timed cycling over copies whose weights exceed L2); ``share`` = 1 - C / (model
weight bytes) when the weights exceed the fitted effective capacity C (``cache_kb``), else 0 -- the share of a cyclic
sweep over the weights that a cache of size C misses. A layer whose
channel counts were not measured is interpolated linearly in each channel count between the
nearest measured ones of the same op, geometry and precision (extrapolated linearly beyond them);
one with no entry of the same op, geometry and precision is a ProfileError naming the op and the
command that re-profiles. Modelled energy is additive by construction and summed as is.

A modelled accelerator profile (``profile.accelerator``) prices a layer from its entry when it has
one, else from the analytic model in its accelerator section (``how: modelled``), for any shape and
any integer pair precision such as 'w4a8'; a float layer there has no kernel (ProfileError). Its
predictions say ``latency_source: modelled``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from automl.errors import ConfigError
from automl.hardware.accelerator import layer_model
from automl.hardware.layers import MAC_OPS, LayerKey, TracedLayer, trace_layers, weight_bytes
from automl.hardware.profile import Correction, HardwareProfile

Point = Tuple[Tuple[float, ...], float]
_RANK = {"exact": 0, "modelled": 0, "interpolated": 1, "extrapolated": 2}


def _worst(*hows: str) -> str:
    return max(hows, key=_RANK.__getitem__)


def _line(points: Sequence[Tuple[float, Tuple[float, str]]], q: float) -> Tuple[float, str]:
    """1-D: exact, linear between the bracketing neighbours, or linear from the two nearest beyond
    the range (proportional to the nearest when that would go below zero or only one point exists)."""
    xs = sorted(points)
    for x, (y, how) in xs:
        if x == q:
            return y, how
    below = [p for p in xs if p[0] < q]
    above = [p for p in xs if p[0] > q]
    if below and above:
        (x0, (y0, h0)), (x1, (y1, h1)) = below[-1], above[0]
        return y0 + (y1 - y0) * (q - x0) / (x1 - x0), _worst("interpolated", h0, h1)
    side = above[:2] if not below else below[-2:]
    nearest = side[0] if not below else side[-1]
    if len(side) == 2:
        (x0, (y0, h0)), (x1, (y1, h1)) = side
        value = y0 + (y1 - y0) * (q - x0) / (x1 - x0)
        if value >= 0:
            return value, "extrapolated"
    x, (y, _) = nearest
    return y * q / x, "extrapolated"


def interpolate(points: Sequence[Point], query: Tuple[float, ...]) -> Tuple[float, str]:
    """Multilinear interpolation over scattered points: the first coordinate's neighbours are each
    resolved recursively over the remaining coordinates. Returns (value, exact|interpolated|extrapolated)."""
    if not points:
        raise ValueError("interpolate needs at least one point")
    if not query:
        return points[0][1], "exact"
    by_first: Dict[float, List[Point]] = defaultdict(list)
    for coords, value in points:
        by_first[coords[0]].append((coords[1:], value))
    resolved = [(x, interpolate(rest, query[1:])) for x, rest in by_first.items()]
    return _line(resolved, query[0])


@dataclass(frozen=True)
class LayerPrice:
    key: LayerKey
    latency_ms: float
    energy_mj: float
    how: str              # exact | interpolated | extrapolated
    energy_source: str
    cold_ms: float = 0.0  # latency with its weights beyond L2 (= latency_ms where not timed cold)


@dataclass(frozen=True)
class Prediction:
    latency_ms: float
    energy_mj: float
    sum_ms: float
    n_layers: int
    cold_share: float      # share of the weights beyond the effective L2 capacity (see cold_share)
    cold_excess_ms: float  # sum over layers of (cold - warm)
    precision: str
    layers: Tuple[LayerPrice, ...]
    latency_source: str = "measured"     # modelled for an analytic accelerator profile

    def count(self, how: str) -> int:
        return sum(1 for p in self.layers if p.how == how)


def _same_signature(profile: HardwareProfile, key: LayerKey) -> list:
    """The entries sharing ``key``'s signature (an index cached on the profile, rebuilt when the set of
    keys changes; entries are read from the profile, so a re-measured entry is never stale)."""
    cached = getattr(profile, "_signature_index", None)
    if cached is None or cached[0] != len(profile.entries) or any(k not in profile.entries for k in cached[2]):
        index: Dict[tuple, list] = defaultdict(list)
        for k in profile.entries:
            index[k.signature].append(k)
        cached = (len(profile.entries), dict(index), list(profile.entries)[:1])
        profile._signature_index = cached
    return [profile.entries[k] for k in cached[1].get(key.signature, ()) if k in profile.entries]


def price_layer(profile: HardwareProfile, key: LayerKey, *, space: Optional[str] = None) -> LayerPrice:
    """One layer's latency and energy: the entry, or interpolated over channel counts."""
    entry = profile.entries.get(key)
    if entry is not None:
        return LayerPrice(key, entry.latency_ms, entry.energy_mj, "exact", entry.energy_source, entry.cold_or_warm_ms)
    if profile.modelled:
        layer = layer_model(key, profile.accelerator)
        return LayerPrice(key, layer.latency_ms, layer.energy_mj, "modelled", "modelled", layer.latency_ms)
    same = _same_signature(profile, key)
    if not same:
        why = "" if key.precision in profile.device.precisions else \
            f" (the profile covers {', '.join(profile.device.precisions)} only)"
        raise profile.missing(key, space, why)
    latency, how = interpolate([(e.key.channels, e.latency_ms) for e in same], key.channels)
    energy, _ = interpolate([(e.key.channels, e.energy_mj) for e in same], key.channels)
    cold, _ = interpolate([(e.key.channels, e.cold_or_warm_ms) for e in same], key.channels)
    sources = {e.energy_source for e in same}
    latency = max(latency, 0.0)
    return LayerPrice(key, latency, max(energy, 0.0), how, "measured" if sources == {"measured"} else "modelled",
                      max(cold, latency))


def cold_share(weight_bytes_total: float, cache_kb: float) -> float:
    """The share of a model's weights an effective L2 capacity of ``cache_kb`` cannot hold: 0 when they
    fit (or the capacity is 0), else 1 - capacity / weights -- what a cyclic sweep over the weights
    misses in a cache that keeps a random part of them."""
    cache = cache_kb * 1024
    if cache <= 0 or weight_bytes_total <= cache:
        return 0.0
    return 1.0 - cache / weight_bytes_total


def predict_keys(profile: HardwareProfile, keys: Sequence[LayerKey], *, space: Optional[str] = None) -> Prediction:
    """Whole-candidate latency (corrected) and energy from its layer keys."""
    if not keys:
        raise ConfigError("a candidate needs at least one costed layer", key="layers", value=[])
    prices = tuple(price_layer(profile, k, space=space) for k in keys)
    precisions = [k.precision for k in keys]
    precision = max(set(precisions), key=precisions.count)
    total = sum(p.latency_ms for p in prices)
    correction = profile.correction(precision)
    share = cold_share(sum(weight_bytes(k) for k in keys), correction.cache_kb)
    excess = sum(p.cold_ms - p.latency_ms for p in prices)
    latency = correction.apply(total, len(keys), share * excess)
    modelled = sum(p.energy_mj for p in prices if p.energy_source == "modelled")
    measured = sum(p.energy_mj for p in prices if p.energy_source == "measured")
    # measured energy of isolated layers carries the same whole-model effects as their latency
    scale = latency / total if total > 0 else 1.0
    return Prediction(latency_ms=latency, energy_mj=modelled + measured * scale, sum_ms=total, n_layers=len(keys),
                      cold_share=share, cold_excess_ms=excess, precision=precision, layers=prices,
                      latency_source="modelled" if profile.modelled else "measured")


def predict_model(profile: HardwareProfile, model, example, precision: str = "fp32", *,
                  layer_precisions: Optional[Mapping[str, str]] = None, space: Optional[str] = None,
                  free_input_quant: Optional[bool] = None) -> Prediction:
    """Trace ``model`` on ``example`` (its batch) and predict it at ``precision``, or with each conv/linear
    layer at ``layer_precisions[name]`` (see :func:`assign_precisions`). The input fake-quantizers of a
    simulated low-bit model are free on a modelled accelerator profile, or when ``free_input_quant``
    says so (a CPU profile pricing a simulated model as its float equivalent; see trace_layers)."""
    free = profile.modelled if free_input_quant is None else free_input_quant
    layers = trace_layers(model, example, precision, free_input_quant=free)
    if layer_precisions is not None:
        layers = assign_precisions(layers, layer_precisions)
    return predict_keys(profile, [t.key for t in layers], space=space)


def assign_precisions(layers: List[TracedLayer], mac_precision: Mapping[str, str]) -> List[TracedLayer]:
    """Each conv/linear layer at ``mac_precision[name]``; every other layer (pool, add, ...) at the
    precision of the next conv/linear layer -- its output is stored at the width that layer reads --
    or of the last one when none follows."""
    missing = [t.name for t in layers if t.key.op in MAC_OPS and t.name not in mac_precision]
    if missing:
        raise ConfigError("no precision given for these layers", key="layers", value=missing,
                          fix="give every conv/linear layer a precision")
    last = next((mac_precision[t.name] for t in reversed(layers) if t.key.op in MAC_OPS), None)
    result, following = [], None
    for t in reversed(layers):
        if t.key.op in MAC_OPS:
            following = mac_precision[t.name]
        precision = following or last or t.key.precision
        result.append(replace(t, key=t.key.replace(precision=precision)))
    return result[::-1]


# Effective shares of L2 the cold term's fit tries: activations, the input and the runtime's buffers
# share L2 with the weights (measured here: CNNs with 0.9 to 5.7 MB of fp32 weights behaved as if
# 1 to 1.4 MB of the 2 MB L2 held weights).
CACHE_SHARES = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def _fit(s, n, m, cold) -> np.ndarray:
    """(a, b, c, d) by weighted least squares, dropping terms the data cannot support."""
    w = 1.0 / m
    coef = np.array([1.0, 0.0, float(np.sum(w * w * (m - s)) / np.sum(w * w)), 0.0])
    columns = [s, n, np.ones_like(s)] + ([cold] if np.any(cold > 0) else [])
    while len(columns) >= 3 and len(m) >= len(columns):
        fit, *_ = np.linalg.lstsq(np.stack(columns, axis=1) * w[:, None], m * w, rcond=None)
        if len(columns) == 4 and fit[3] < 0:
            columns = columns[:3]
            continue
        if fit[0] > 0:
            coef = np.concatenate([fit, np.zeros(4 - len(fit))])
        break
    return coef


def fit_correction(sums: Sequence[float], n_layers: Sequence[int], measured: Sequence[float],
                   cold_excess: Optional[Sequence[float]] = None, weight_bytes_total: Optional[Sequence[float]] = None,
                   l2_cache_kb: int = 0) -> Correction:
    """Least squares of measured ~ a*sum + b*n + c + d*share*excess, each row weighted by 1/measured so
    the fit minimises relative error (what the +-10% bar counts).

    ``cold_excess`` (each model's summed cold - warm layer time), ``weight_bytes_total`` and
    ``l2_cache_kb`` enable the cold term; its effective capacity is the share of L2 (CACHE_SHARES)
    that fits best. Degenerate cases drop terms: a negative d drops the cold term; fewer models than
    terms, or a non-positive slope a, leave a=1, b=0 and fit c only."""
    s, n, m = (np.asarray(v, dtype=float) for v in (sums, n_layers, measured))
    cold_given = cold_excess is not None and weight_bytes_total is not None
    if not (len(s) == len(n) == len(m)) or len(m) == 0 or \
            (cold_given and not len(cold_excess) == len(weight_bytes_total) == len(m)):
        raise ConfigError("fit_correction needs equal-length, non-empty sums, layer counts and measurements",
                          value=(len(s), len(n), len(m)))
    if np.any(m <= 0) or not np.all(np.isfinite(np.concatenate([s, n, m]))):
        raise ConfigError("whole-model latencies must be positive and finite", value=m.tolist())
    best = None
    # no cold term first: a capacity must fit strictly better to be chosen
    caches = list(dict.fromkeys([0] + ([int(l2_cache_kb * share) for share in CACHE_SHARES] if cold_given else [])))
    for cache in caches:
        cold = np.array([cold_share(wb, cache) * ex for wb, ex in zip(weight_bytes_total, cold_excess)]) \
            if cache else np.zeros_like(s)
        a, b, c, d = _fit(s, n, m, cold)
        rmspe = float(np.sqrt(np.mean(((a * s + b * n + c + d * cold - m) / m) ** 2)))
        if best is None or rmspe < best.rmspe * (0.99 if best.d == 0 else 1.0) - 1e-12:
            best = Correction(a=float(a), b=float(b), c=float(c), d=float(d), cache_kb=cache if d > 0 else 0,
                              models=len(m), rmspe=rmspe)
    return best


def expected_cost(segment_costs: Sequence[float], reach: Sequence[float]) -> float:
    """An early-exit model's expected cost: sum over segments of P(reach segment) x segment cost.

    Segment i runs from exit i-1 to exit i (segment 0 from the input); ``reach[0]`` is normally 1."""
    if len(segment_costs) != len(reach) or not segment_costs:
        raise ConfigError("one reach probability per segment is needed", key="reach",
                          value=(len(segment_costs), len(reach)), fix="give as many probabilities as segments")
    for i, p in enumerate(reach):
        if not 0.0 <= p <= 1.0:
            raise ConfigError("a reach probability is in [0, 1]", key=f"reach[{i}]", value=p)
        if i and p > reach[i - 1] + 1e-12:
            raise ConfigError("reach probabilities cannot grow along the network", key=f"reach[{i}]", value=p,
                              fix="P(reach segment i) <= P(reach segment i-1)")
    return float(sum(c * p for c, p in zip(segment_costs, reach)))


def reach_probabilities(exit_shares: Sequence[float]) -> List[float]:
    """P(reach segment i) from the share of inputs that leave at each early exit (in order):
    segment 0 is always reached, segment i by what no earlier exit took."""
    if any(s < 0 for s in exit_shares) or sum(exit_shares) > 1 + 1e-9:
        raise ConfigError("exit shares are non-negative and sum to at most 1", key="exit_shares",
                          value=list(exit_shares))
    out, left = [1.0], 1.0
    for s in exit_shares:
        left = max(0.0, left - s)
        out.append(left)
    return out


@dataclass(frozen=True)
class ExitPrediction:
    """An early-exit model's expected cost and the per-segment predictions it comes from."""

    latency_ms: float
    energy_mj: float
    reach: Tuple[float, ...]
    segments: Tuple[Prediction, ...]      # each with its hand-over to the next segment included
    handoff_kb: Tuple[float, ...] = ()    # feature map each segment but the last hands to the next

    def count(self, how: str) -> int:
        return sum(p.count(how) for p in self.segments)


def predict_early_exit(profile: HardwareProfile, model, example, exit_shares: Sequence[float],
                       precision: str = "fp32", *, space: Optional[str] = None) -> ExitPrediction:
    """Expected latency and energy of an early-exit model (``automl.compress.early_exit.model.EarlyExitModel``).

    Each segment (its blocks and its exit head, one deployed graph) is predicted on the features that
    reach it; the expectation weighs segment i by P(reach i) from ``exit_shares``, the share of inputs
    leaving at each early exit (e.g. measured on the validation split)."""
    import torch
    import torch.nn as nn

    graphs, h = [], example
    with torch.no_grad():
        for segment, head in zip(model.segments, model.exit_heads):
            graphs.append((nn.Sequential(segment, head).eval(), h))
            h = segment.eval()(h)
    if len(exit_shares) != len(graphs) - 1:
        raise ConfigError(f"the model has {len(graphs) - 1} early exits but {len(exit_shares)} exit shares "
                          "were given", key="exit_shares", value=list(exit_shares), fix="give one share per early exit")
    reach = reach_probabilities(exit_shares)
    preds = [predict_model(profile, g, x, precision, space=space) for g, x in graphs]
    # every segment but the last also outputs its feature map, which the runner hands to the next
    corr = profile.correction(precision)
    handed = [handoff_bytes(x) for _, x in graphs[1:]]
    preds = [replace(p, latency_ms=p.latency_ms + corr.handoff(handed[i])) if i < len(handed) else p
             for i, p in enumerate(preds)]
    return ExitPrediction(latency_ms=expected_cost([p.latency_ms for p in preds], reach),
                          energy_mj=expected_cost([p.energy_mj for p in preds], reach),
                          reach=tuple(reach), segments=tuple(preds), handoff_kb=tuple(b / 1024 for b in handed))


def handoff_bytes(features) -> int:
    """Bytes of a feature map handed from one early-exit segment to the next (float32)."""
    return int(features.numel()) * 4


def fit_handoff(residual_ms: Sequence[float], boundaries: Sequence[int], feature_kb: Sequence[float],
                measured_ms: Sequence[float]) -> Tuple[float, float]:
    """(fixed ms, ms per KB) of a segment hand-over, from early-exit models run through every segment:
    ``residual_ms`` = measured - the segments' summed predictions, explained by ``boundaries`` hand-overs
    of ``feature_kb`` in all; non-negative least squares weighted by 1/measured (relative error)."""
    from scipy.optimize import nnls

    r, n, kb, m = (np.asarray(v, dtype=float) for v in (residual_ms, boundaries, feature_kb, measured_ms))
    if not (len(r) == len(n) == len(kb) == len(m)) or len(r) == 0 or np.any(m <= 0) or np.any(n < 1):
        raise ConfigError("fit_handoff needs equal-length, non-empty rows of models with at least one hand-over "
                          "and positive latencies", value=(len(r), len(n), len(kb), len(m)))
    w = 1.0 / m
    if len(r) == 1:   # one model: a fixed cost per hand-over only
        return float(max(r[0], 0.0) / n[0]), 0.0
    coef, _ = nnls(np.stack([n, kb], axis=1) * w[:, None], r * w)
    return float(coef[0]), float(coef[1])


def entry_table(profile: HardwareProfile) -> Mapping[str, float]:
    """{key id: latency_ms}, for reports."""
    return {k.id: e.latency_ms for k, e in sorted(profile.entries.items())}
