"""Sparsity schedules: pure functions from a step (or epoch) number to the target sparsity.

``agp_sparsity`` is Zhu & Gupta 2017 (cubic): prune fast while redundancy is high, slowly near the
end. Before ``start`` the value is ``initial``, from ``end`` on it is ``final``; in between it
only changes every ``frequency`` steps (the value of the last update step holds in between).
"""
from __future__ import annotations

from typing import List

from automl.errors import ConfigError


def _check_int(value, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}", key=key, value=value,
                          fix=f"write a whole number such as {max(low, 1)}")
    return value


def _check_sparsity(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{key} sparsity must be in [0, 1)", key=key, value=value,
                          fix="write a share such as 0.8 (1.0 would remove every weight)")
    return float(value)


def _ramp_progress(step, initial, final, start, end, frequency) -> float | None:
    """Validated progress in [0, 1] of the last update step, or None outside [start, end)."""
    _check_int(step, "step", 0)
    initial, final = _check_sparsity(initial, "initial"), _check_sparsity(final, "final")
    _check_int(start, "start", 0)
    _check_int(end, "end", 0)
    _check_int(frequency, "frequency", 1)
    if initial > final:
        raise ConfigError("initial sparsity exceeds final sparsity", key="initial", value=initial,
                          fix=f"use initial <= final ({final})")
    if end <= start:
        raise ConfigError("end must come after start", key="end", value=end, fix=f"use end > start ({start})")
    if step < start or step >= end:
        return None
    held = start + (step - start) // frequency * frequency   # last step the schedule updated at
    return (held - start) / (end - start)


def agp_sparsity(step: int, *, initial: float = 0.0, final: float, start: int, end: int,
                 frequency: int = 1) -> float:
    """s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n*dt))**3 with n*dt = end - start."""
    progress = _ramp_progress(step, initial, final, start, end, frequency)
    if progress is None:
        return float(initial) if step < start else float(final)
    return final + (initial - final) * (1.0 - progress) ** 3


def linear_sparsity(step: int, *, initial: float = 0.0, final: float, start: int, end: int,
                    frequency: int = 1) -> float:
    """Like ``agp_sparsity`` but interpolating linearly from ``initial`` to ``final``."""
    progress = _ramp_progress(step, initial, final, start, end, frequency)
    if progress is None:
        return float(initial) if step < start else float(final)
    return initial + (final - initial) * progress


def one_shot(step: int, *, final: float, at: int) -> float:
    """0 before step ``at``, ``final`` from ``at`` on."""
    _check_int(step, "step", 0)
    _check_int(at, "at", 0)
    final = _check_sparsity(final, "final")
    return final if step >= at else 0.0


def iterative_levels(final: float, iterations: int) -> List[float]:
    """Cumulative sparsity after each of ``iterations`` rounds that each prune the same share of the
    weights still remaining (keep ratio per round r = (1 - final)**(1/iterations)), as in iterative
    magnitude pruning / lottery tickets: level_k = 1 - r**k, and the last level is exactly ``final``."""
    final = _check_sparsity(final, "final")
    _check_int(iterations, "iterations", 1)
    keep = (1.0 - final) ** (1.0 / iterations)
    levels = [1.0 - keep ** k for k in range(1, iterations)]
    return levels + [final]    # exact at the end, free of float drift
