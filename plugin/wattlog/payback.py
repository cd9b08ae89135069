"""Payback of a compressed model: after how many inferences has making it paid for itself? (framework-free)

A compressed variant costs energy to make, ``energy/make_j`` (a recovery fine-tune, a distillation; 0 for
post-training quantisation), and saves energy on every inference: the baseline's J per inference sample
minus the variant's (``energy/test_j_per_sample``). Its payback, in inference samples:

- ``make_j / saved`` when it saves energy (0 when making it cost nothing);
- ``math.inf`` (never) when it saves nothing or costs more per sample.

MLflow stores infinity badly (its SQL stores return 1.8e308), so a variant that never pays back gets no
``energy/payback_samples`` point but the tag ``energy.payback=never``; the baseline gets
``energy.payback=baseline`` (:func:`mlflow_fields`). With replicates, :func:`payback_spread` propagates the
run-to-run spreads, and :func:`saving_in_spread` says when the saving itself is inside the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from wattlog import keys
from wattlog.render import MISSING, is_number, significant

NEVER = "never"
"""``energy.payback`` of a variant that saves no energy per inference sample."""
BASELINE = "baseline"
"""``energy.payback`` of the reference the others are measured against."""

_COUNT_PREFIXES = (("", 1.0), ("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12))


def _finite(value: Any) -> float | None:
    return float(value) if is_number(value) else None


def payback_samples(make_j: float, variant_j_per_sample: float, baseline_j_per_sample: float) -> float:
    """Inference samples until the energy saved per sample repays ``make_j``; ``math.inf`` when nothing is saved.

    Args:
        make_j: energy spent making the variant, >= 0 (J).
        variant_j_per_sample: the variant's inference energy per sample, > 0 (J).
        baseline_j_per_sample: the baseline's, > 0 (J).

    Raises:
        ValueError: a negative or non-finite make energy, a non-positive or non-finite J/sample.
    """
    if not is_number(make_j) or make_j < 0:
        raise ValueError(f"make_j must be a finite energy >= 0 J, got {make_j!r}")
    for name, value in (("variant_j_per_sample", variant_j_per_sample),
                        ("baseline_j_per_sample", baseline_j_per_sample)):
        if not is_number(value) or value <= 0:
            raise ValueError(f"{name} must be a finite energy > 0 J, got {value!r}")
    saved = baseline_j_per_sample - variant_j_per_sample
    if saved <= 0:
        return math.inf
    return make_j / saved


def payback_spread(payback: float, make_j: float, make_sd: float, saved_j: float, saved_sd: float) -> float:
    """First-order spread of a payback from the spreads of its make energy and per-sample saving.

    ``payback * sqrt((make_sd / make_j)^2 + (saved_sd / saved_j)^2)``; unknown spreads count as 0;
    NaN for an infinite payback; ``saved_sd / saved_j * payback`` alone when ``make_j`` is 0 (then 0).
    """
    if not math.isfinite(payback) or not is_number(saved_j) or saved_j <= 0:
        return math.nan
    rel_make = (make_sd / make_j) if make_j > 0 and is_number(make_sd) else 0.0
    rel_saved = (saved_sd / saved_j) if is_number(saved_sd) else 0.0
    return payback * math.hypot(rel_make, rel_saved)


def saving_in_spread(saved_j: float, variant_sd: float, baseline_sd: float) -> bool:
    """True when the per-sample saving is within the combined run-to-run spread (unknown spread: False)."""
    known = [float(s) for s in (variant_sd, baseline_sd) if is_number(s)]
    if not known or not is_number(saved_j):
        return False
    return abs(float(saved_j)) <= math.sqrt(sum(s * s for s in known))


def make_energy_j(metrics: Mapping[str, Any]) -> float:
    """``energy/make_j`` of a run: its logged value, else the sum of its make stages
    (``energy/recover_j``, ``energy/distill_j``), else 0 (post-training compression, or the baseline)."""
    logged = _finite(metrics.get(keys.MAKE_J))
    if logged is not None:
        return logged
    return sum(_finite(metrics.get(keys.stage_j(s))) or 0.0 for s in keys.MAKE_STAGES)


def mlflow_fields(payback: float, *, is_baseline: bool = False) -> tuple[dict[str, float], dict[str, str]]:
    """The (metrics, tags) a run gets for its payback: ``energy/payback_samples`` when finite, else the
    tag ``energy.payback=never``; ``energy.payback=baseline`` for the baseline; nothing for NaN."""
    if is_baseline:
        return {}, {keys.T_PAYBACK: BASELINE}
    if is_number(payback):
        return {keys.PAYBACK_SAMPLES: float(payback)}, {}
    if payback == math.inf:
        return {}, {keys.T_PAYBACK: NEVER}
    return {}, {}


def describe(payback: float | None) -> str:
    """``0``, ``850``, ``1.23k``, ``4.5M`` samples; ``never`` for infinity; ``—`` when unknown."""
    if payback == math.inf:
        return NEVER
    if not is_number(payback):
        return MISSING
    value = float(payback)  # type: ignore[arg-type]
    if value == 0:
        return "0"
    prefix, scale = next(((p, s) for p, s in reversed(_COUNT_PREFIXES) if value >= s), _COUNT_PREFIXES[0])
    text = significant(value / scale, 3) if scale > 1 or value < 1 else str(round(value))
    return f"{text}{prefix}"


def rank_key(payback: float | None, is_baseline: bool = False) -> tuple[int, float]:
    """Sort key: the baseline first, then finite paybacks ascending, then never, then unknown."""
    if is_baseline:
        return (0, 0.0)
    if is_number(payback):
        return (1, float(payback))  # type: ignore[arg-type]
    return (2, 0.0) if payback == math.inf else (3, 0.0)


def _mean(values: Iterable[Any]) -> float:
    finite = [float(v) for v in values if is_number(v)]
    return sum(finite) / len(finite) if finite else math.nan


def add_payback(rows: list[dict[str, Any]], is_baseline: Callable[[dict[str, Any]], bool],
                metric: str | None = None, j_key: str = keys.stage_j_per_sample("test")) -> float:
    """Add payback columns to summary rows (dicts with ``energy/make_j`` and ``j_key``) and sort them by it.

    Columns added: ``baseline`` (bool), ``saved_j_per_sample`` (baseline mean minus the row's),
    ``energy/payback_samples`` (``math.inf`` when nothing is saved, NaN for the baseline or without
    J/sample), ``payback`` (text of :func:`describe`), ``delta_<metric>`` (the row's metric minus the
    baseline mean) with ``metric``. Rows are sorted by :func:`rank_key` (in place).

    Returns:
        The baseline's mean J/sample (NaN when no baseline row has one: then every payback is NaN).
    """
    flags = [bool(is_baseline(r)) for r in rows]
    base_j = _mean(r.get(j_key) for r, b in zip(rows, flags) if b)
    base_metric = _mean(r.get(metric) for r, b in zip(rows, flags) if b) if metric else math.nan
    for row, base in zip(rows, flags):
        j = _finite(row.get(j_key))
        row["baseline"] = base
        row["saved_j_per_sample"] = base_j - j if j is not None else math.nan
        value = math.nan
        if not base and j is not None and j > 0 and is_number(base_j):
            value = payback_samples(make_energy_j(row), j, base_j)
        row[keys.PAYBACK_SAMPLES] = value
        row["payback"] = BASELINE if base else describe(value)
        if metric:
            row[f"delta_{metric}"] = _finite(row.get(metric)) - base_metric if is_number(row.get(metric)) else math.nan
    rows.sort(key=lambda r: rank_key(r[keys.PAYBACK_SAMPLES], r["baseline"]))
    return base_j
