"""PNG charts: Pareto scatter, power trace, run report, stage summary.

Every axis and legend uses :mod:`wattlog.render` units (auto-scaled J/kJ/MJ or Wh/kWh, W/kW),
with no axis offset (no ``1e-6`` above the ticks). Estimated figures are labelled as such.

matplotlib is imported inside the functions, and figures are drawn on a bare
``matplotlib.figure.Figure`` with the Agg canvas: no pyplot state, no backend switch, safe in
training processes and notebooks alike.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wattlog import render
from wattlog.pareto import pareto_mask

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

NON_DOMAIN_J = frozenset({"step_j", "total_j", "energy_j"})
"""Keys ending in ``_j`` in trace rows that are totals, not domains."""

TRAIN_STAGES = frozenset({"train", "fit", "training"})
STAGE_COLORS = {
    "val": "tab:purple",
    "validation": "tab:purple",
    "sanity": "tab:pink",
    "test": "tab:red",
    "predict": "tab:brown",
    "other": "tab:gray",
}
"""Colour of each non-train stage (train is drawn as its stacked domains)."""
ESTIMATE_NOTE = {"cpu": "CPU from TDP × utilisation", "ram": "RAM from memory in use", "gpu": "GPU estimated"}
_MAX_LABELS = 40
_J_PER_KWH = 3.6e6


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
    return render.is_number(x)


def _float(row: Mapping[str, Any], key: str) -> float:
    try:
        value = float(row.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return value


def _plain_axis(ax: Axes, axis: str = "both") -> None:
    """No offset and no scientific notation on the tick labels."""
    try:
        ax.ticklabel_format(axis=axis, useOffset=False, style="plain")
    except AttributeError:  # a log or categorical axis
        pass


def _estimated_kinds(estimated: str | Sequence[str] | None) -> list[str]:
    if not estimated:
        return []
    items = estimated.split(",") if isinstance(estimated, str) else list(estimated)
    return [k.strip() for k in items if k and k.strip() and k.strip().lower() != "none"]


def _estimate_text(kinds: Sequence[str]) -> str:
    notes = [ESTIMATE_NOTE.get(k, f"{k} estimated") for k in kinds]
    return f"estimated: {', '.join(kinds)} ({'; '.join(notes)})"


def power_unit(values_w: Sequence[float]) -> tuple[str, float]:
    """``(unit, watts per unit)`` for a power axis: mW, W, kW or MW so the largest value is 1-999."""
    top = max((abs(v) for v in values_w if render.is_number(v)), default=1.0)
    for name, factor in (("MW", 1e6), ("kW", 1e3), ("W", 1.0)):
        if top >= factor:
            return name, factor
    return "mW", 1e-3


# ------------------------------------------------------------------------------------------
# Pareto
# ------------------------------------------------------------------------------------------


def plot_pareto(
    df: pd.DataFrame,
    metric: str,
    mode: str = "max",
    path: str | Path = "pareto.png",
    *,
    energy_col: str | None = None,
    label_col: str = "run_name",
    title: str | None = None,
    unit: str = "J",
) -> Path:
    """Scatter of ``metric`` against energy with the Pareto front drawn, labelled and every run named.

    Columns of ``df``:
        - ``run_name`` (or ``label_col``): point labels (every point up to 40 runs, else only
          the front); a group of ``n`` > 1 replicates is labelled ``name ×n``;
        - ``total_j`` (or ``energy_j``, or ``energy_col``): energy per run in joules; a column
          whose name contains ``kwh`` is read as kWh and converted;
        - ``<metric>``: the objective;
        - ``pareto`` (optional, bool): the front; computed with ``pareto_mask`` when absent;
        - ``estimated`` (optional, str): non-empty -> hollow marker ("includes estimated");
        - ``total_j_sd`` / ``<metric>_sd`` (optional): error bars (a :func:`group_runs` frame).
    Rows with a missing energy or metric value are left out of the chart (counted in the title).

    Args:
        df: one row per run or group, e.g. from :func:`wattlog.compare.compare_runs`.
        metric: the metric column.
        mode: ``max`` when a larger metric is better, ``min`` when smaller is.
        path: the PNG to write (parents created).
        energy_col: override the energy column.
        label_col: the label column.
        title: chart title.
        unit: energy axis unit: ``"J"``/``"Wh"`` (auto-scaled) or a fixed one such as ``"kWh"``.

    Returns:
        The written path.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} is not valid; allowed: 'max', 'min'")
    if energy_col is None:
        for candidate in (
            "total_j",
            "energy_j",
            "energy/total_j",
            "total_kwh",
            "energy_kwh",
            "energy/total_kwh",
        ):
            if candidate in df.columns:
                energy_col = candidate
                break
        else:
            energy_col = "total_j"
    missing = [c for c in (energy_col, metric) if c not in df.columns]
    if missing:
        raise ValueError(f"plot_pareto: df has no column(s) {missing}; it has {list(df.columns)}")
    to_j = _J_PER_KWH if "kwh" in energy_col.lower() else 1.0
    labels = [str(v) for v in df[label_col]] if label_col in df.columns else [str(i) for i in df.index]
    if "n" in df.columns:
        labels = [
            f"{lab} ×{int(n)}" if render.is_number(n) and int(n) > 1 else lab
            for lab, n in zip(labels, df["n"])
        ]
    energy_j = [float(v) * to_j if render.is_number(v) else math.nan for v in df[energy_col]]
    values = [float(v) if render.is_number(v) else math.nan for v in df[metric]]
    front = [bool(v) for v in df["pareto"]] if "pareto" in df.columns else pareto_mask(values, energy_j, mode)
    estimated = (
        [bool(str(v)) and str(v) not in ("nan", "None", "none") for v in df["estimated"]]
        if "estimated" in df.columns
        else [False] * len(df)
    )
    keep = [i for i in range(len(df)) if render.is_number(energy_j[i]) and render.is_number(values[i])]
    unit_name, factor = render.choose_energy_unit([energy_j[i] for i in keep], unit)
    x = [e / factor if render.is_number(e) else math.nan for e in energy_j]
    x_sd = _column(df, f"{energy_col}_sd", to_j / factor)
    y_sd = _column(df, f"{metric}_sd", 1.0)

    fig = _figure(8.5, 5.2)
    ax = fig.add_subplot()
    if any(render.is_number(v) for v in x_sd + y_sd):
        ax.errorbar(
            [x[i] for i in keep],
            [values[i] for i in keep],
            xerr=[x_sd[i] if render.is_number(x_sd[i]) else 0 for i in keep],
            yerr=[y_sd[i] if render.is_number(y_sd[i]) else 0 for i in keep],
            fmt="none",
            ecolor="0.6",
            elinewidth=0.8,
            capsize=2,
            zorder=1,
            label="±1 sd (replicates)",
        )
    groups = [
        ("measured", [i for i in keep if not front[i] and not estimated[i]], "o", "tab:blue", "tab:blue"),
        (
            "includes estimated energy",
            [i for i in keep if not front[i] and estimated[i]],
            "o",
            "none",
            "tab:blue",
        ),
        ("on the front", [i for i in keep if front[i] and not estimated[i]], "D", "tab:red", "tab:red"),
        (
            "on the front, includes estimated",
            [i for i in keep if front[i] and estimated[i]],
            "D",
            "none",
            "tab:red",
        ),
    ]
    for name, idx, marker, face, edge in groups:
        if idx:
            ax.scatter(
                [x[i] for i in idx],
                [values[i] for i in idx],
                marker=marker,
                facecolors=face,
                edgecolors=edge,
                label=name,
                zorder=3,
                s=36,
            )
    on_front = sorted((x[i], values[i]) for i in keep if front[i])
    if on_front:
        better_up = mode == "max"
        fx = [e for e, _ in on_front]
        fy = [m for _, m in on_front]
        ax.step(
            fx,
            fy,
            where="post",
            color="tab:red",
            alpha=0.6,
            zorder=2,
            label=f"Pareto front ({len(on_front)} run{'s' if len(on_front) > 1 else ''}; "
            f"{'up' if better_up else 'down'}-left is better)",
        )
    to_label = keep if len(keep) <= _MAX_LABELS else [i for i in keep if front[i]]
    at_point: dict[tuple[float, float], list[str]] = {}
    for i in to_label:  # coincident points share one label
        at_point.setdefault((x[i], values[i]), []).append(labels[i])
    for k, (xy, names) in enumerate(sorted(at_point.items())):
        text = ", ".join(names)
        text = text if len(text) <= 48 else text[:47] + "…"
        dy = 5 if k % 2 == 0 else -11  # alternate above/below: neighbours rarely collide
        ax.annotate(text, xy, xytext=(5, dy), textcoords="offset points", fontsize=7.5)
    ax.margins(x=0.15, y=0.12)  # room for the labels
    ax.set_xlabel(f"energy ({unit_name})" + (", less is better" if keep else ""))
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    _plain_axis(ax)
    dropped = len(df) - len(keep)
    ax.set_title(
        title or f"{metric} vs energy: {len(keep)} runs" + (f" ({dropped} without data)" if dropped else "")
    )
    ax.grid(True, alpha=0.3)
    if keep:
        ax.legend(fontsize=7.5, loc="best")
    return _save(fig, path)


def _column(df: Any, col: str, scale: float) -> list[float]:
    if col not in df.columns:
        return [math.nan] * len(df)
    return [float(v) * scale if render.is_number(v) else math.nan for v in df[col]]


# ------------------------------------------------------------------------------------------
# Power trace
# ------------------------------------------------------------------------------------------


def domain_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-domain joule keys (``<domain>_j``) present in trace rows, in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        for k in row:
            if k.endswith("_j") and k not in NON_DOMAIN_J:
                keys[k] = None
    return list(keys)


def _duration(row: Mapping[str, Any]) -> float:
    d = _float(row, "duration_s")
    if render.is_number(d) and d > 0:
        return d
    return _float(row, "t_end_s") - _float(row, "t_start_s")


def domain_power_w(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Mean power per domain per row: ``<domain>_j / duration_s`` (else ``t_end_s - t_start_s``)."""
    out: dict[str, list[float]] = {}
    for key in domain_keys(rows):
        series = []
        for row in rows:
            dt = _duration(row)
            joules = _float(row, key)
            series.append(joules / dt if dt > 0 and math.isfinite(joules) else math.nan)
        out[key.removesuffix("_j")] = series
    return out


def _kind(domain: str) -> str:
    d = domain.lower()
    if "gpu" in d:
        return "gpu"
    if "ram" in d or "dram" in d or "mem" in d:
        return "ram"
    if "cpu" in d or "package" in d or "core" in d or "psys" in d:
        return "cpu"
    return "other"


_KIND_COLORS = {
    "gpu": ["tab:blue", "#6baed6", "#08519c", "#9ecae1", "#3182bd", "#c6dbef", "#2171b5", "#deebf7"],
    "cpu": ["tab:orange", "#fdae6b", "#e6550d", "#fdd0a2"],
    "ram": ["tab:green", "#a1d99b", "#31a354"],
    "other": ["tab:olive", "tab:cyan", "#bcbd22"],
}


def _domain_colors(domains: Sequence[str]) -> dict[str, str]:
    used: dict[str, int] = {}
    out = {}
    for d in domains:
        kind = _kind(d)
        palette = _KIND_COLORS[kind]
        out[d] = palette[used.get(kind, 0) % len(palette)]
        used[kind] = used.get(kind, 0) + 1
    return out


def _row_total_j(row: Mapping[str, Any], domains: Sequence[str]) -> float:
    total = _float(row, "total_j")
    if render.is_number(total):
        return total
    parts = [_float(row, f"{d}_j") for d in domains]
    if any(render.is_number(p) for p in parts):
        return sum(p for p in parts if render.is_number(p))
    p, dt = _float(row, "power_w"), _duration(row)
    return p * dt if render.is_number(p) and dt > 0 else math.nan


@dataclass
class _Segment:
    """A stretch of rows drawn as one bar: one train step (or bin), a non-train block, or a batch."""

    stage: str
    x0: float
    x1: float
    joules: dict[str, float] = field(default_factory=dict)
    total_j: float = 0.0
    duration_s: float = 0.0
    rows: int = 0
    steps: float = 0.0

    def power(self, key: str | None = None) -> float:
        if self.duration_s <= 0:
            return math.nan
        value = self.total_j if key is None else self.joules.get(key, 0.0)
        return value / self.duration_s


@dataclass
class TraceLayout:
    """Where each trace row lands on the x axis (see :func:`plot_power_trace`)."""

    axis: str  # "step" or "batch"
    domains: list[str]
    train: list[_Segment]
    other: list[_Segment]
    stage_totals_j: dict[str, float]
    domain_totals_j: dict[str, float]
    total_j: float
    train_steps: int
    stage_rows: dict[str, int]


def _add(seg: _Segment, row: Mapping[str, Any], domains: Sequence[str]) -> None:
    for d in domains:
        v = _float(row, f"{d}_j")
        if render.is_number(v):
            seg.joules[d] = seg.joules.get(d, 0.0) + v
    t = _row_total_j(row, domains)
    if render.is_number(t):
        seg.total_j += t
    dt = _duration(row)
    if render.is_number(dt) and dt > 0:
        seg.duration_s += dt
    seg.rows += 1


def trace_layout(rows: Sequence[Mapping[str, Any]]) -> TraceLayout:
    """Lay trace rows out on the step axis that MLflow's charts use.

    - Train rows with the same ``step`` (gradient accumulation) make one step. A train step
      ``s`` spans ``(p + 0.5, s + 0.5]``, where ``p`` is the previous train step (``s - 1``
      when steps are consecutive, so the bar is centred on ``s``; a bin of merged steps spans
      all of them). The number of train steps is the sum of those spans.
    - A contiguous block of non-train rows (val, test, other, ...) is drawn at the boundary
      after the train step it ran after (before the first train step when it ran first).
    - A trace without train rows (an evaluation-only run) uses the batch axis instead: each
      row is one batch, in time order.
    """
    ordered = sorted(
        enumerate(rows),
        key=lambda ir: (_float(ir[1], "t_start_s") if _finite(ir[1].get("t_start_s")) else math.inf, ir[0]),
    )
    rows = [r for _, r in ordered]
    domains = [k.removesuffix("_j") for k in domain_keys(rows)]
    stage_totals: dict[str, float] = {}
    stage_rows: dict[str, int] = {}
    domain_totals: dict[str, float] = {d: 0.0 for d in domains}
    for r in rows:
        stage = str(r.get("stage", "") or "other")
        t = _row_total_j(r, domains)
        stage_totals[stage] = stage_totals.get(stage, 0.0) + (t if render.is_number(t) else 0.0)
        stage_rows[stage] = stage_rows.get(stage, 0) + 1
        for d in domains:
            v = _float(r, f"{d}_j")
            domain_totals[d] += v if render.is_number(v) else 0.0
    total_j = sum(stage_totals.values())
    is_train = [str(r.get("stage", "")) in TRAIN_STAGES for r in rows]
    train: list[_Segment] = []
    other: list[_Segment] = []
    if any(is_train):
        # pass 1: train steps (consecutive rows of one step merge), non-train blocks after them
        pending: list[tuple[int, _Segment]] = []  # (index of the train step it ran after, segment)
        last_step: float | None = None
        for r, tr in zip(rows, is_train):
            if tr:
                step = _float(r, "step")
                if not train or step != last_step:
                    train.append(_Segment("train", step, step))
                    last_step = step
                _add(train[-1], r, domains)
            else:
                stage = str(r.get("stage", "") or "other")
                after = len(train) - 1
                if pending and pending[-1][0] == after and pending[-1][1].stage == stage:
                    _add(pending[-1][1], r, domains)
                else:
                    seg = _Segment(stage, 0.0, 0.0)
                    _add(seg, r, domains)
                    pending.append((after, seg))
        steps = [s.x1 for s in train]
        gaps = [
            b - a
            for a, b in itertools.pairwise(steps)
            if render.is_number(a) and render.is_number(b) and b > a
        ]
        first_width = min(gaps) if gaps else 1.0
        prev = None
        for seg in train:
            s = seg.x1
            seg.x0 = (prev + 0.5) if prev is not None and s > prev else s - first_width + 0.5
            seg.x1 = s + 0.5
            seg.steps = seg.x1 - seg.x0
            prev = s
        slot: dict[int, int] = {}
        for after, seg in pending:  # blocks after one step sit side by side (slot k), in time order
            at = train[after].x1 if after >= 0 else train[0].x0
            seg.x0 = seg.x1 = at
            seg.steps = slot.get(after, 0)
            slot[after] = slot.get(after, 0) + 1
            other.append(seg)
        n_steps = round(sum(s.steps for s in train))
        return TraceLayout(
            "step", domains, train, other, stage_totals, domain_totals, total_j, n_steps, stage_rows
        )
    for i, r in enumerate(rows):
        seg = _Segment(str(r.get("stage", "") or "other"), float(i), float(i + 1))
        _add(seg, r, domains)
        other.append(seg)
    return TraceLayout("batch", domains, train, other, stage_totals, domain_totals, total_j, 0, stage_rows)


def _stage_label(stage: str, layout: TraceLayout, unit: str) -> str:
    n = layout.stage_rows.get(stage, 0)
    what = (
        "steps" if stage in TRAIN_STAGES else ("batches" if stage in ("test", "predict", "val") else "rows")
    )
    if stage in TRAIN_STAGES:
        n, what = layout.train_steps, "steps"
    return f"{stage} {render.format_energy(layout.stage_totals_j.get(stage, 0.0), unit)} ({n} {what})"


def draw_power(
    ax: Axes,
    rows: Sequence[Mapping[str, Any]],
    *,
    estimated: str | Sequence[str] | None = None,
    unit: str = "J",
    legend: bool = True,
) -> TraceLayout:
    """Draws a power trace on ``ax`` (see :func:`plot_power_trace`); returns the layout."""
    import numpy as np

    layout = trace_layout(rows)
    kinds = set(_estimated_kinds(estimated))
    colors = _domain_colors(layout.domains)
    all_power = [s.power() for s in layout.train + layout.other]
    p_unit, p_factor = power_unit(all_power or [1.0])
    segments = layout.train if layout.axis == "step" else layout.other
    if segments and layout.domains:
        x = np.array([[s.x0, s.x1] for s in segments]).ravel()
        bottom = np.zeros(len(x))
        for d in layout.domains:
            v = np.repeat(np.nan_to_num(np.array([s.power(d) for s in segments], dtype=float)), 2) / p_factor
            est = " (estimated)" if _kind(d) in kinds else ""
            label = f"{d} {render.format_energy(layout.domain_totals_j.get(d, 0.0), unit)}{est}"
            ax.fill_between(
                x,
                bottom,
                bottom + v,
                color=colors[d],
                alpha=0.8,
                linewidth=0,
                label=label,
                hatch="//" if est else None,
                edgecolor="white" if est else None,
            )
            bottom = bottom + v
    if segments:
        xs, ys = [], []
        for s in segments:
            xs += [s.x0, s.x1, math.nan]
            ys += [s.power() / p_factor] * 2 + [math.nan]
        ax.plot(
            xs,
            ys,
            color="black",
            linewidth=0.8,
            label=f"total {render.format_energy(layout.total_j, unit)}"
            if layout.axis == "step" or not layout.domains
            else None,
        )
    if layout.axis == "step":
        span = (layout.train[-1].x1 - layout.train[0].x0) if layout.train else 1.0
        width = max(0.6, 0.012 * span)
        labelled: set[str] = set()
        for seg in layout.other:  # seg.steps is its slot among the blocks after the same step
            color = STAGE_COLORS.get(seg.stage, "tab:gray")
            label = None if seg.stage in labelled else _stage_label(seg.stage, layout, unit)
            labelled.add(seg.stage)
            ax.bar(
                seg.x0 + seg.steps * width,
                seg.power() / p_factor if render.is_number(seg.power()) else 0.0,
                width=width,
                align="edge",
                color=color,
                alpha=0.9,
                edgecolor="black",
                linewidth=0.4,
                zorder=4,
                label=label,
            )
        if layout.train:
            widest = max((seg.steps + 1 for seg in layout.other), default=0)
            ax.set_xlim(layout.train[0].x0 - width * 2, layout.train[-1].x1 + width * (widest + 1))
        ax.set_xlabel("step (as in MLflow; other stages drawn at the step they ran after)")
    else:
        start = 0
        blocks: list[tuple[str, int, int]] = []
        for i, seg in enumerate(layout.other):
            if i + 1 == len(layout.other) or layout.other[i + 1].stage != seg.stage:
                blocks.append((seg.stage, start, i + 1))
                start = i + 1
        labelled = set()
        for stage, a, b in blocks:
            color = STAGE_COLORS.get(stage, "tab:gray")
            ax.axvspan(
                a,
                b,
                color=color,
                alpha=0.12,
                lw=0,
                label=None if stage in labelled else _stage_label(stage, layout, unit),
            )
            labelled.add(stage)
        ax.set_xlabel("batch (evaluation only: no train steps)")
    ax.set_ylabel(f"power ({p_unit})")
    _plain_axis(ax, "y")
    ax.grid(True, alpha=0.3)
    if legend and (segments or layout.other):
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return layout


def plot_power_trace(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str | None = None,
    estimated: str | Sequence[str] | None = None,
    unit: str = "J",
) -> Path:
    """``energy/power.png``: power over the run on MLflow's step axis, domains stacked.

    Each row (one step, or a bin of steps; values may be strings, as read from
    ``energy/trace.csv``) has ``stage``, ``step``, ``t_start_s``, ``t_end_s``, ``duration_s``,
    ``samples``, ``total_j``, ``power_w`` and per-domain joules ``<domain>_j`` (``gpu0_j``,
    ``cpu_j``, ``ram_j``, ...; ``step_j``/``total_j`` are not domains). Domain power is
    ``<domain>_j / duration_s``; the total is a black line on top.

    - x is the train step, aligned with MLflow's charts (see :func:`trace_layout`): validation,
      test and other non-train stretches are bars in their own colour at the step they ran after;
      an evaluation-only run (no train rows) is drawn over its batches, stages shaded.
    - The title counts train steps (not rows) and gives the total; the legend gives each domain's
      and each stage's energy (auto-scaled units).
    - ``estimated`` names the estimated domain kinds (``"cpu,ram"``): their layers are hatched,
      their legend entries say "(estimated)" and a note under the chart says how they were estimated.

    Args:
        rows: trace rows, in any order (sorted by ``t_start_s``).
        path: the PNG to write (parents created).
        title: the run's name or a title; the step count and total are appended.
        estimated: the estimated domain kinds, e.g. ``"cpu,ram"`` (the ``energy.estimated`` tag);
            None: all measured.
        unit: energy unit for the legend (``"J"``/``"Wh"`` auto-scaled, or fixed).

    Returns:
        The written path.
    """
    fig = _figure(10.0, 4.4)
    ax = fig.add_subplot()
    layout = draw_power(ax, rows, estimated=estimated, unit=unit)
    if layout.axis == "step":
        what = f"{layout.train_steps} train step{'s' if layout.train_steps != 1 else ''}"
        extra = sorted(s for s in layout.stage_rows if s not in TRAIN_STAGES)
        if extra:
            what += " + " + ", ".join(extra)
    elif rows:
        what = ", ".join(f"{n} {s} batches" for s, n in layout.stage_rows.items())
    else:
        what = "no steps recorded"
    head = f"{title}: " if title else "power: "
    ax.set_title(
        f"{head}{what}, {render.format_energy(layout.total_j, unit)} total" if rows else f"{head}{what}"
    )
    kinds = _estimated_kinds(estimated)
    if kinds:
        fig.supxlabel(_estimate_text(kinds), fontsize=7.5, x=0.01, ha="left", style="italic")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def plot_report(
    path: str | Path,
    *,
    power_steps: Sequence[float] = (),
    power_layers: Mapping[str, Sequence[float]] | None = None,
    trace_rows: Sequence[Mapping[str, Any]] | None = None,
    energy_steps: Sequence[float] = (),
    energy_j: Sequence[float] = (),
    metric: str | None = None,
    metric_steps: Sequence[float] = (),
    metric_values: Sequence[float] = (),
    title: str | None = None,
    estimated: str | Sequence[str] | None = None,
    unit: str = "J",
) -> Path:
    """Panels on one step axis: power (trace rows, else per-step layers), cumulative energy, the metric.

    Args:
        path: the PNG to write.
        power_steps, power_layers: domain -> mean power (W) per step, stacked in order (used
            when there are no ``trace_rows``).
        trace_rows: ``energy/trace.csv`` rows: the power panel is :func:`draw_power`.
        energy_steps, energy_j: the ``energy/total_j`` history (joules; auto-scaled on the axis).
        metric, metric_steps, metric_values: the objective's history (panel left out if None).
        title: figure title.
        estimated: estimated domain kinds (hatched, noted).
        unit: energy unit family or fixed unit.

    Returns:
        The written path.
    """
    import numpy as np

    panels = 3 if metric else 2
    fig = _figure(10.0, 2.7 * panels)
    axes = fig.subplots(panels, 1, sharex=True)
    ax_p = axes[0]
    kinds = _estimated_kinds(estimated)
    if trace_rows:
        draw_power(ax_p, trace_rows, estimated=kinds, unit=unit)
        ax_p.set_xlabel("")
    elif len(power_steps) and power_layers:
        p_unit, p_factor = power_unit(
            [max((v for v in vals if render.is_number(v)), default=0.0) for vals in power_layers.values()]
        )
        ax_p.stackplot(
            np.asarray(power_steps, float),
            *[np.nan_to_num(np.asarray(v, float)) / p_factor for v in power_layers.values()],
            labels=[f"{k} (estimated)" if _kind(k) in kinds else k for k in power_layers],
            step="post",
            alpha=0.8,
        )
        ax_p.set_ylabel(f"power ({p_unit})")
        ax_p.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax_p.text(0.5, 0.5, "no power data", ha="center", va="center", transform=ax_p.transAxes)
        ax_p.set_ylabel("power (W)")
    ax_e = axes[1]
    finite = [v for v in energy_j if render.is_number(v)]
    e_unit, e_factor = render.choose_energy_unit(finite, unit)
    if len(energy_steps):
        ax_e.plot(energy_steps, [v / e_factor for v in energy_j], color="tab:green")
        if finite:
            ax_e.annotate(
                render.format_energy(finite[-1], unit),
                (energy_steps[-1], finite[-1] / e_factor),
                xytext=(-4, -12),
                textcoords="offset points",
                ha="right",
                fontsize=8,
            )
    else:
        ax_e.text(0.5, 0.5, "no energy/total_j history", ha="center", va="center", transform=ax_e.transAxes)
    ax_e.set_ylabel(f"cumulative energy ({e_unit})")
    _plain_axis(ax_e, "y")
    if metric:
        ax_m = axes[2]
        if len(metric_steps):
            ax_m.plot(metric_steps, metric_values, marker="o", markersize=3, color="tab:purple")
        ax_m.set_ylabel(metric)
        _plain_axis(ax_m, "y")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    if kinds:
        fig.supxlabel(_estimate_text(kinds), fontsize=7.5, x=0.01, ha="left", style="italic")
    return _save(fig, path)


def plot_stage_summary(
    path: str | Path,
    *,
    stage_j: Mapping[str, float],
    stage_j_per_sample: Mapping[str, float] | None = None,
    trace_rows: Sequence[Mapping[str, Any]] | None = None,
    title: str | None = None,
    estimated: str | Sequence[str] | None = None,
    unit: str = "J",
) -> Path:
    """The chart of a run without train steps (evaluation only): energy per stage, and its power
    over batches when trace rows are given.

    Args:
        path: the PNG to write.
        stage_j: stage -> joules (``energy/{val,test,predict}_j``).
        stage_j_per_sample: stage -> joules per sample, written on the bars.
        trace_rows: ``energy/trace.csv`` rows (second panel: power per batch).
        title: figure title.
        estimated: estimated domain kinds (noted under the chart).
        unit: energy unit family or fixed unit.

    Returns:
        The written path.
    """
    stages = [s for s, v in stage_j.items() if render.is_number(v)]
    panels = 2 if trace_rows else 1
    fig = _figure(10.0, 3.2 * panels)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    ax = axes[0]
    if stages:
        e_unit, factor = render.choose_energy_unit([stage_j[s] for s in stages], unit)
        bars = ax.barh(
            stages,
            [stage_j[s] / factor for s in stages],
            height=0.5,
            color=[STAGE_COLORS.get(s, "tab:gray") for s in stages],
            alpha=0.85,
        )
        for bar, s in zip(bars, stages):
            text = render.format_energy(stage_j[s], unit)
            per = (stage_j_per_sample or {}).get(s)
            if render.is_number(per):
                text += f", {render.format_energy(per, 'J')}/sample"
            ax.annotate(
                text,
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        ax.set_xlabel(f"energy ({e_unit})")
        ax.margins(x=0.35)
        _plain_axis(ax, "x")
    else:
        ax.text(0.5, 0.5, "no stage energy logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("energy per stage (evaluation run: no train steps)")
    if trace_rows:
        draw_power(axes[1], trace_rows, estimated=estimated, unit=unit)
    if title:
        fig.suptitle(title)
    kinds = _estimated_kinds(estimated)
    if kinds:
        fig.supxlabel(_estimate_text(kinds), fontsize=7.5, x=0.01, ha="left", style="italic")
    return _save(fig, path)
