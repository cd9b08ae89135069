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
        energy_kwh: energy values, one per run.
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
