"""PNG charts: Pareto scatter, power trace, run report.

matplotlib is imported inside the functions, and figures are drawn on a bare
``matplotlib.figure.Figure`` with the Agg canvas: no pyplot state, no backend switch, safe in
training processes and notebooks alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wattlog.pareto import pareto_mask

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

NON_DOMAIN_J = frozenset({"step_j", "total_j", "energy_j"})
"""Keys ending in ``_j`` in trace rows that are totals, not domains."""

_TRAIN_STAGES = frozenset({"train", "fit", "training"})
_MAX_LABELS = 40


def _figure(width_in: float = 8.0, height_in: float = 5.0) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, format="png")
    return out


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def plot_pareto(
    df: pd.DataFrame,
    metric: str,
    mode: str = "max",
    path: str | Path = "pareto.png",
    *,
    energy_col: str | None = None,
    label_col: str = "run_name",
    title: str | None = None,
) -> Path:
    """Scatter of ``metric`` against energy with the Pareto front drawn and points labelled.

    Columns of ``df``:
        - ``run_name`` (or ``label_col``): point labels (all points up to 40 runs, else
          only the front);
        - ``total_kwh`` (or ``energy_kwh``, or ``energy_col``): energy per run, kWh;
        - ``<metric>``: the objective;
        - ``pareto`` (optional, bool): the front; computed with ``pareto_mask`` when absent;
        - ``estimated`` (optional, str): non-empty -> hollow marker ("includes estimated").
    Rows with a missing energy or metric value are left out of the chart.

    Args:
        df: one row per run, e.g. from :func:`wattlog.compare.compare_runs`.
        metric: the metric column.
        mode: ``max`` when a larger metric is better, ``min`` when smaller is.
        path: the PNG to write (parents created).
        energy_col: override the energy column.
        label_col: the label column.
        title: chart title.

    Returns:
        The written path.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} is not valid; allowed: 'max', 'min'")
    energy_col = energy_col or ("total_kwh" if "total_kwh" in df.columns else "energy_kwh")
    missing = [c for c in (energy_col, metric) if c not in df.columns]
    if missing:
        raise ValueError(f"plot_pareto: df has no column(s) {missing}; it has {list(df.columns)}")
    labels = [str(v) for v in df[label_col]] if label_col in df.columns else [str(i) for i in df.index]
    energy = [float(v) if _finite(v) else math.nan for v in df[energy_col]]
    values = [float(v) if _finite(v) else math.nan for v in df[metric]]
    if "pareto" in df.columns:
        front = [bool(v) for v in df["pareto"]]
    else:
        front = pareto_mask(values, energy, mode)
    estimated = (
        [bool(str(v)) and str(v) not in ("nan", "None") for v in df["estimated"]]
        if ("estimated" in df.columns)
        else [False] * len(df)
    )
    keep = [i for i in range(len(df)) if _finite(energy[i]) and _finite(values[i])]

    fig = _figure()
    ax = fig.add_subplot()
    groups = [
        ("measured", [i for i in keep if not front[i] and not estimated[i]], "o", "tab:blue", "tab:blue"),
        ("includes estimated", [i for i in keep if not front[i] and estimated[i]], "o", "none", "tab:blue"),
        ("Pareto front", [i for i in keep if front[i] and not estimated[i]], "D", "tab:red", "tab:red"),
        ("front, includes estimated", [i for i in keep if front[i] and estimated[i]], "D", "none", "tab:red"),
    ]
    for name, idx, marker, face, edge in groups:
        if idx:
            ax.scatter(
                [energy[i] for i in idx],
                [values[i] for i in idx],
                marker=marker,
                facecolors=face,
                edgecolors=edge,
                label=name,
                zorder=3,
            )
    on_front = sorted((energy[i], values[i]) for i in keep if front[i])
    if len(on_front) > 1:
        ax.step(
            [e for e, _ in on_front],
            [m for _, m in on_front],
            where="post",
            color="tab:red",
            alpha=0.6,
            zorder=2,
        )
    to_label = keep if len(keep) <= _MAX_LABELS else [i for i in keep if front[i]]
    at_point: dict[tuple[float, float], list[str]] = {}
    for i in to_label:  # coincident points share one label
        at_point.setdefault((energy[i], values[i]), []).append(labels[i])
    for xy, names in at_point.items():
        text = ", ".join(names)
        text = text if len(text) <= 32 else text[:31] + "…"
        ax.annotate(text, xy, xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.margins(x=0.1, y=0.08)  # room for the labels
    ax.set_xlabel(f"energy ({energy_col}, kWh)")
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    dropped = len(df) - len(keep)
    ax.set_title(
        title or f"{metric} vs energy: {len(keep)} runs" + (f" ({dropped} without data)" if dropped else "")
    )
    ax.grid(True, alpha=0.3)
    if keep:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _float(row: Mapping[str, Any], key: str) -> float:
    try:
        return float(row.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan


def domain_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-domain joule keys (``<domain>_j``) present in trace rows, in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        for k in row:
            if k.endswith("_j") and k not in NON_DOMAIN_J:
                keys[k] = None
    return list(keys)


def domain_power_w(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Mean power per domain per row: ``<domain>_j / (t_end_s - t_start_s)``, keyed by domain."""
    out: dict[str, list[float]] = {}
    for key in domain_keys(rows):
        series = []
        for row in rows:
            dt = _float(row, "t_end_s") - _float(row, "t_start_s")
            joules = _float(row, key)
            series.append(joules / dt if dt > 0 and math.isfinite(joules) else math.nan)
        out[key.removesuffix("_j")] = series
    return out


def _stack_steps(ax: Axes, x0: list[float], x1: list[float], layers: dict[str, list[float]]) -> None:
    """Stacked constant-per-interval areas over [x0, x1); gaps between intervals stay empty."""
    import numpy as np

    groups: list[list[int]] = []
    for i, (a, b) in enumerate(zip(x0, x1)):
        if not (_finite(a) and _finite(b)):
            continue
        if groups and a <= x1[groups[-1][-1]] + 1e-9:
            groups[-1].append(i)
        else:
            groups.append([i])
    colors = [f"C{k % 10}" for k in range(len(layers))]
    for g, idx in enumerate(groups):
        x = np.column_stack([[x0[i] for i in idx], [x1[i] for i in idx]]).ravel()  # a0 b0 a1 b1 ...
        bottom = np.zeros(len(x))
        for (name, values), color in zip(layers.items(), colors):
            v = np.repeat(np.nan_to_num(np.array([values[i] for i in idx], dtype=float)), 2)
            top = bottom + v
            ax.fill_between(
                x, bottom, top, color=color, alpha=0.75, linewidth=0, label=name if g == 0 else None
            )
            bottom = top


def plot_power_trace(
    rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str | None = None
) -> Path:
    """Power over time from trace rows, per-domain power stacked.

    Each row (one step; values may be strings, as read from ``energy/trace.csv``) has
    ``stage``, ``step``, ``t_start_s``, ``t_end_s``, ``power_w`` and per-domain joules
    ``<domain>_j`` (e.g. ``gpu0_j``, ``cpu_j``, ``ram_j``; ``step_j``/``total_j`` are not
    domains). Domain power is ``<domain>_j / (t_end_s - t_start_s)``; the total ``power_w``
    is drawn as a line on top. Non-train stages are shaded.

    Args:
        rows: trace rows in time order.
        path: the PNG to write (parents created).
        title: chart title.

    Returns:
        The written path.
    """
    rows = sorted(rows, key=lambda r: _float(r, "t_start_s"))
    fig = _figure(9.0, 4.0)
    ax = fig.add_subplot()
    origin_s = _float(rows[0], "t_start_s") if rows else 0.0  # the trace's clock is perf_counter: show seconds since start
    t0 = [_float(r, "t_start_s") - origin_s for r in rows]
    t1 = [_float(r, "t_end_s") - origin_s for r in rows]
    layers = domain_power_w(rows)
    if layers:
        _stack_steps(ax, t0, t1, layers)
    total_x, total_y = [], []
    for a, b, r in zip(t0, t1, rows):
        p = _float(r, "power_w")
        total_x += [a, b, math.nan]
        total_y += [p, p, math.nan]
    if total_x:
        ax.plot(total_x, total_y, color="black", linewidth=0.8, label="power_w (total)")
    _shade_stages(ax, rows, t0, t1)
    ax.set_xlabel("time since the first step (s)")
    ax.set_ylabel("power (W)")
    ax.set_title(title or f"power over {len(rows)} steps")
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _shade_stages(ax: Axes, rows: Sequence[Mapping[str, Any]], t0: list[float], t1: list[float]) -> None:
    """Shades contiguous blocks of non-train stages, labelling each stage once."""
    labelled: set[str] = set()
    i = 0
    while i < len(rows):
        stage = str(rows[i].get("stage", ""))
        j = i
        while j + 1 < len(rows) and str(rows[j + 1].get("stage", "")) == stage:
            j += 1
        if stage and stage not in _TRAIN_STAGES and _finite(t0[i]) and _finite(t1[j]):
            ax.axvspan(
                t0[i], t1[j], color="grey", alpha=0.15, lw=0, label=None if stage in labelled else stage
            )
            labelled.add(stage)
        i = j + 1


def plot_report(
    path: str | Path,
    *,
    power_steps: Sequence[float],
    power_layers: Mapping[str, Sequence[float]],
    kwh_steps: Sequence[float],
    kwh: Sequence[float],
    metric: str | None = None,
    metric_steps: Sequence[float] = (),
    metric_values: Sequence[float] = (),
    title: str | None = None,
) -> Path:
    """Three panels on one step axis: stacked power per domain, cumulative kWh, the metric.

    Args:
        path: the PNG to write.
        power_steps: step of each power value.
        power_layers: domain -> mean power (W) per step, stacked in order.
        kwh_steps, kwh: the ``energy/total_kwh`` history.
        metric, metric_steps, metric_values: the objective's history (panel left out if None).
        title: figure title.

    Returns:
        The written path.
    """
    import numpy as np

    panels = 3 if metric else 2
    fig = _figure(9.0, 2.6 * panels)
    axes = fig.subplots(panels, 1, sharex=True)
    ax_p = axes[0]
    if len(power_steps) and power_layers:
        ax_p.stackplot(
            np.asarray(power_steps, float),
            *[np.nan_to_num(np.asarray(v, float)) for v in power_layers.values()],
            labels=list(power_layers),
            step="post",
            alpha=0.8,
        )
        ax_p.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax_p.text(0.5, 0.5, "no power data", ha="center", va="center", transform=ax_p.transAxes)
    ax_p.set_ylabel("power (W)")
    ax_e = axes[1]
    if len(kwh_steps):
        ax_e.plot(kwh_steps, kwh, color="tab:green")
    ax_e.set_ylabel("cumulative kWh")
    if metric:
        ax_m = axes[2]
        if len(metric_steps):
            ax_m.plot(metric_steps, metric_values, marker="o", markersize=3, color="tab:purple")
        ax_m.set_ylabel(metric)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
