"""Pareto fronts of an objective metric against energy. Pure Python, no third-party imports."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_mask(metric: Sequence[float], energy_kwh: Sequence[float], mode: str = "max") -> list[bool]:
    """Flag the points on the front of (best metric, least energy).

    A point is on the front when no other point is at least as good on both axes and
    strictly better on one. Ties (identical points) are all on the front. Points with a
    missing or non-finite value on either axis are never on the front.

    Args:
        metric: objective values, one per run.
        energy_kwh: energy values, one per run (any one unit: joules or kWh).
        mode: ``max`` when a larger metric is better, ``min`` when smaller is.

    Returns:
        One flag per point.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} is not valid; allowed: 'max', 'min'")
    if len(metric) != len(energy_kwh):
        raise ValueError("metric and energy_kwh must have the same length")
    sign = 1.0 if mode == "max" else -1.0
    points = []
    for i, (m, e) in enumerate(zip(metric, energy_kwh)):
        valid = m is not None and e is not None and math.isfinite(float(m)) and math.isfinite(float(e))
        points.append((i, sign * float(m), float(e)) if valid else None)
    valid_points = sorted((p for p in points if p is not None), key=lambda p: (p[2], -p[1]))
    mask = [False] * len(metric)
    best_metric = -math.inf
    last_on_front: tuple[float, float] | None = None
    for i, m, e in valid_points:  # ascending energy, best metric first within equal energy
        if m > best_metric or (last_on_front is not None and (m, e) == last_on_front):
            mask[i] = True
            best_metric = max(best_metric, m)
            last_on_front = (m, e)
    return mask


def pareto_mask_noisy(
    metric: Sequence[float],
    energy: Sequence[float],
    mode: str = "max",
    metric_noise: Sequence[float] | None = None,
    energy_noise: Sequence[float] | None = None,
) -> list[bool]:
    """The front of (best metric, least energy) where a difference inside the noise proves nothing.

    Point j dominates point i when it is better than i *beyond the noise* on one axis and not
    worse than i beyond the noise on the other. The noise of a pair is ``sqrt(n_i**2 + n_j**2)``
    of the per-point noise (e.g. the run-to-run standard deviation of a group of repeated runs);
    missing or NaN noise counts as 0. With no noise this is :func:`pareto_mask`. A point is on
    the front when no point dominates it; points with a missing value are never on it. Should
    the noise make every point dominated (a cycle), the noise-free front is returned.

    Args:
        metric: objective values, one per point.
        energy: energy values, one per point.
        mode: ``max`` when a larger metric is better, ``min`` when smaller is.
        metric_noise: noise of each metric value (same unit as ``metric``).
        energy_noise: noise of each energy value (same unit as ``energy``).

    Returns:
        One flag per point.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} is not valid; allowed: 'max', 'min'")
    n = len(metric)
    if len(energy) != n:
        raise ValueError("metric and energy must have the same length")
    sign = 1.0 if mode == "max" else -1.0

    def noise(values: Sequence[float] | None, i: int) -> float:
        if values is None:
            return 0.0
        v = values[i]
        return float(v) if v is not None and math.isfinite(float(v)) and float(v) > 0 else 0.0

    valid = [
        metric[i] is not None
        and energy[i] is not None
        and math.isfinite(float(metric[i]))
        and math.isfinite(float(energy[i]))
        for i in range(n)
    ]
    mask = [False] * n
    for i in range(n):
        if not valid[i]:
            continue
        mi, ei = sign * float(metric[i]), float(energy[i])
        dominated = False
        for j in range(n):
            if j == i or not valid[j]:
                continue
            mj, ej = sign * float(metric[j]), float(energy[j])
            nm = math.hypot(noise(metric_noise, i), noise(metric_noise, j))
            ne = math.hypot(noise(energy_noise, i), noise(energy_noise, j))
            not_worse = mj >= mi - nm and ej <= ei + ne
            better = mj > mi + nm or ej < ei - ne
            if not_worse and better:
                dominated = True
                break
        mask[i] = not dominated
    if any(valid) and not any(mask):
        return pareto_mask(metric, energy, mode)
    return mask
