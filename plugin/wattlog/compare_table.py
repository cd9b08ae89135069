"""The human ``wattlog compare`` table: columns that fit the terminal, groups, markers, footnotes, verdict.

Rendering only: the rows come from :func:`wattlog.compare.compare_runs` and
:func:`wattlog.compare.group_runs`; every number goes through :mod:`wattlog.render`.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wattlog import payback, render
from wattlog.compare import _label, group_runs, verdict

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

DEFAULT_WIDTH = 100
"""Width of the table when stdout is not a terminal and ``COLUMNS`` is not set."""
IN_NOISE = "~"
"""Suffix of a difference inside the run-to-run spread."""
_EST_NOTE = "CPU from TDP × utilisation, RAM from memory in use"


@dataclass(frozen=True)
class Column:
    """One displayed column: header, cell function, core (always shown) or optional (if it fits)."""

    header: str
    cell: Callable[[Any], str]
    core: bool = True
    left: bool = False


def _as_groups(df: pd.DataFrame, metric: str | None, group: bool = True) -> pd.DataFrame:
    if df.attrs.get("grouped"):
        return df
    return group_runs(df, metric, group=group)




def _notes_cell(r: Any) -> str:
    marks = []
    if str(r.get("estimated", "")):
        marks.append("est")
    if bool(r.get("short_run", False)):
        marks.append("short")
    if str(r.get("degraded", "")):
        marks.append("degr")
    status = str(r.get("status", "FINISHED"))
    if status != "FINISHED":
        marks.append("fail" if "FAILED" in status else status.lower()[:7])
    return ",".join(marks)


def _spread_cell(r: Any, col: str, fmt: str, unit: str) -> str:
    mean, sd = r.get(col, math.nan), r.get(f"{col}_sd", math.nan)
    if fmt == "energy":
        return render.format_energy_spread(mean, sd, unit)
    if fmt == "emissions":
        return render.format_emissions(mean)
    if fmt == "power":
        return render.format_power(mean)
    if fmt == "duration":
        return render.format_duration(mean)
    if fmt == "j":  # J/sample: auto-scaled joules
        return render.format_energy(mean, "J")
    return render.format_number_spread(mean, sd)


def _delta_pct_cell(r: Any) -> str:
    if bool(r.get("is_baseline", False)):
        return "base"
    text = render.format_percent(r.get("delta_j_pct"))
    return text + IN_NOISE if bool(r.get("delta_j_in_noise", False)) and text != render.MISSING else text


def _delta_metric_cell(r: Any, metric: str) -> str:
    if bool(r.get("is_baseline", False)):
        return ""
    text = render.format_signed(r.get(f"delta_{metric}"))
    in_noise = bool(r.get(f"delta_{metric}_in_noise", False))
    return text + IN_NOISE if in_noise and text != render.MISSING else text


def _payback_cell(r: Any) -> str:
    if bool(r.get("is_baseline", False)):
        return "base"
    value, sd = r.get("payback_samples"), r.get("payback_samples_sd")
    text = payback.describe(value) + (f"±{payback.describe(sd)}" if render.is_number(sd) and sd > 0 else "")
    return text + IN_NOISE if bool(r.get("payback_in_noise", False)) else text


def table_columns(
    groups: pd.DataFrame, metric: str | None = None, *, unit: str = "J", wide: bool = False
) -> list[Column]:
    """The columns of the human table of a group frame: core ones, then optional ones.

    Core (always shown): run, energy, Δ energy % (with a baseline), the metric, Δ metric, ★
    (with a metric), note (est/short/degr/fail). Optional (shown with ``wide``, else while they
    fit): GPU/CPU/RAM energy (GPU only when some run measured a GPU), CO2e, J/sample, avg power,
    time, energy to target, Δ energy, experiment (several), then the ``params.*`` columns.
    """
    metric = metric if metric is not None else groups.attrs.get("metric")
    has = groups.columns
    has_delta = "delta_j_pct" in has
    cols = [
        Column("run", _label, left=True),
        Column("energy", lambda r: _spread_cell(r, "total_j", "energy", unit)),
    ]
    if has_delta:
        cols.append(Column("Δ energy", _delta_pct_cell))
    if metric and metric in has:
        cols.append(Column(metric, lambda r: _spread_cell(r, metric, "number", unit)))
        if has_delta and f"delta_{metric}" in has:
            cols.append(Column(f"Δ {metric}", lambda r: _delta_metric_cell(r, metric)))
        cols.append(Column("★", lambda r: "★" if bool(r.get("pareto", False)) else ""))
    if "payback_samples" in has:
        cols.append(Column("payback", _payback_cell))
    if any(_notes_cell(r) for _, r in groups.iterrows()):
        cols.append(Column("note", _notes_cell, left=True))
    optional: list[Column] = []
    if "gpu_measured" in has and bool(groups["gpu_measured"].any()):
        optional.append(
            Column(
                "GPU",
                lambda r: (
                    _spread_cell(r, "gpu_j", "energy", unit)
                    if bool(r.get("gpu_measured", True))
                    else render.MISSING
                ),
                core=False,
            )
        )
    for col, header, kind in (("cpu_j", "CPU", "energy"), ("ram_j", "RAM", "energy"),
                              ("emissions_g", "CO2e", "emissions"), ("j_per_sample", "train/sample", "j"),
                              ("test_j_per_sample", "test/sample", "j"), ("avg_power_w", "avg power", "power"),
                              ("duration_s", "time", "duration")):
        if col in has and groups[col].notna().any():
            optional.append(Column(header, lambda r, c=col, k=kind: _spread_cell(r, c, k, unit), core=False))
    if "j_to_target" in has:
        optional.append(
            Column("to target", lambda r: _spread_cell(r, "j_to_target", "energy", unit), core=False)
        )
    if has_delta:
        optional.append(
            Column(
                "Δ energy abs",
                lambda r: "" if bool(r.get("is_baseline")) else _signed_energy(r.get("delta_j"), unit),
                core=False,
            )
        )
    if "experiment" in has and groups["experiment"].nunique() > 1:
        optional.append(Column("experiment", lambda r: str(r["experiment"]), core=False, left=True))
    for c in [c for c in has if c.startswith("params.")]:
        optional.append(
            Column(c.removeprefix("params."), lambda r, c=c: _param_text(r[c]), core=False, left=True)
        )
    return cols + optional


def _signed_energy(joules: Any, unit: str) -> str:
    if not render.is_number(joules):
        return render.MISSING
    return ("+" if float(joules) > 0 else "") + render.format_energy(joules, unit)


def _param_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return render.MISSING
    return str(value)


def _cell_len(text: str) -> int:
    from rich.cells import cell_len

    return cell_len(text)


def _fit(columns: list[Column], cells: list[list[str]], width: int | None) -> list[int]:
    """Indices of the columns to show within ``width``: the core ones always, optional ones in
    order while they fit (columns are 2 characters apart)."""
    if width is None:
        return list(range(len(columns)))
    widths = [
        max([_cell_len(c.header), *(_cell_len(row[i]) for row in cells)]) for i, c in enumerate(columns)
    ]
    keep = [i for i, c in enumerate(columns) if c.core]

    def total(idx: list[int]) -> int:
        return sum(widths[i] for i in idx) + 2 * (len(idx) - 1)

    for i, c in enumerate(columns):
        if not c.core and total(sorted([*keep, i])) <= width:
            keep = sorted([*keep, i])
    return keep


def display_rows(
    df: pd.DataFrame,
    metric: str | None = None,
    *,
    unit: str = "J",
    wide: bool = True,
    width: int | None = None,
    group: bool = True,
) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, formatted cells and footnotes shared by the table and Markdown.

    Accepts a :func:`compare_runs` frame (grouped here) or a :func:`group_runs` frame. Energy is
    auto-scaled per cell (``unit`` family or a fixed unit); ``mean±sd`` for groups of replicates;
    ★ marks the noise-aware Pareto front; a ``~`` suffix marks a difference inside the
    run-to-run spread; runs without energy show ``—``. With ``wide=False`` the optional
    columns are added only while the table fits ``width``. The last footnote is the verdict.
    """
    _, columns, rows, notes = _layout(df, metric, unit=unit, wide=wide, width=width, group=group)
    return [c.header for c in columns], rows, notes


def _layout(
    df: pd.DataFrame, metric: str | None, *, unit: str, wide: bool, width: int | None, group: bool
) -> tuple[pd.DataFrame, list[Column], list[list[str]], list[str]]:
    metric = metric if metric is not None else df.attrs.get("metric")
    groups = _as_groups(df, metric, group)
    columns = table_columns(groups, metric, unit=unit, wide=wide)
    cells = [[c.cell(r) for c in columns] for _, r in groups.iterrows()]
    keep = _fit(columns, cells, None if wide else width)
    shown = [columns[i] for i in keep]
    rows = [[row[i] for i in keep] for row in cells]
    notes = footnotes(groups, metric, shown=[c.header for c in shown], unit=unit)
    hidden = [c.header for i, c in enumerate(columns) if i not in keep]
    if hidden:
        listed = ", ".join(hidden[:6]) + (f" and {len(hidden) - 6} more" if len(hidden) > 6 else "")
        notes.insert(-1, f"--wide adds: {listed}")
    return groups, shown, rows, notes


def footnotes(
    groups: pd.DataFrame, metric: str | None, shown: Sequence[str] = (), unit: str = "J"
) -> list[str]:
    """Footnotes for the markers in a group table; the last line is the :func:`verdict`."""
    notes = []
    mode_word = "higher" if groups.attrs.get("mode", "max") == "max" else "lower"
    if metric and "★" in shown:
        notes.append(
            f"★ Pareto front: no run has a better {metric} ({mode_word} is better) and less energy "
            "beyond the spread"
        )
    if "n" in groups.columns and (groups["n"] > 1).any():
        notes.append("×n: n runs with the same params (seeds aside): mean±sd")
    if "Δ energy" in shown:
        base = groups[groups["is_baseline"]] if "is_baseline" in groups.columns else groups.iloc[0:0]
        if len(base):
            rid = groups.attrs.get("baseline_run_id", "")
            in_noise = [c for c in groups.columns if c.startswith("delta_") and c.endswith("_in_noise")]
            noisy = any(bool(v) for c in in_noise for v in groups[c])
            notes.append(
                f"Δ vs baseline {base.iloc[0]['run_name']} ({str(rid)[:8]})"
                + (f"; {IN_NOISE}: inside the run-to-run spread, not a real difference" if noisy else "")
            )
    notes.extend(
        f"{k}: {v}"
        for k, v in (
            ("est", f"includes estimated energy ({_EST_NOTE})"),
            ("short", "shorter than its energy method resolves"),
            ("degr", "a source degraded during the run"),
            ("fail", "the run did not finish"),
        )
        if any(k in _notes_cell(r).split(",") for _, r in groups.iterrows())
    )
    if "payback" in shown:
        notes.append("payback: inference samples until the energy to make a variant (energy/make_j) is repaid "
                     "by the J per test sample it saves vs the baseline; never: it saves nothing"
                     + (f"; {IN_NOISE}: the saving is inside the spread" if groups["payback_in_noise"].any() else ""))
    if "missing_energy" in groups.columns and groups["missing_energy"].any():
        notes.append("— logged no energy/total_j (shown, excluded from the front)")
    if groups.attrs.get("non_finite"):
        nf = groups.attrs["non_finite"]
        notes.append(
            f"— also where a NaN/inf value was logged, read as missing: {', '.join(nf[:5])}"
            + (", ..." if len(nf) > 5 else "")
        )
    implied = groups.attrs.get("implied_params") or {}
    shown_params = [h for h in shown if f"params.{h}" in groups.columns]
    if implied and shown_params:
        names = ", ".join(sorted(implied)[:4]) + (", ..." if len(implied) > 4 else "")
        notes.append(f"params not shown, they follow from the others: {names}")
    if len(groups) > 1 and not groups.attrs.get("noise_known"):
        notes.append("single runs: their run-to-run spread is unknown (repeat a config to measure it)")
    notes.append(verdict(groups, metric, unit=unit).text)
    return notes


def to_markdown(df: pd.DataFrame, metric: str | None = None, *, unit: str = "J", group: bool = True) -> str:
    """A GitHub Markdown table of :func:`display_rows` (all columns), footnotes below it."""
    _, columns, rows, notes = _layout(df, metric, unit=unit, wide=True, width=None, group=group)

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    aligns = [":-:" if c.header == "★" else ("---" if c.left else "--:") for c in columns]
    lines = ["| " + " | ".join(esc(c.header) for c in columns) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    if notes:
        lines.append("")
        lines += [f"{n}  " for n in notes]
    return "\n".join(lines) + "\n"


def table_width(file: Any) -> int | None:
    """The width to fit: the terminal's, else ``$COLUMNS``, else :data:`DEFAULT_WIDTH`."""
    if hasattr(file, "isatty") and file.isatty():
        try:
            return os.get_terminal_size(file.fileno()).columns
        except (OSError, ValueError, AttributeError):
            pass
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 20 else DEFAULT_WIDTH


def print_table(
    df: pd.DataFrame,
    metric: str | None = None,
    file: Any = None,
    title: str | None = None,
    *,
    width: int | None = None,
    wide: bool = False,
    unit: str = "J",
    group: bool = True,
) -> None:
    """Prints the human table, its footnotes and the verdict.

    Fits ``width`` (default :func:`table_width`) by leaving optional columns out (never by
    cutting a cell: long run names wrap); ``wide=True`` shows every column at its natural
    width. Colour only on a terminal: Pareto rows bold green, runs without energy dimmed.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    file = file or sys.stdout
    is_tty = hasattr(file, "isatty") and file.isatty()
    fit = width or table_width(file)
    groups, columns, rows, notes = _layout(df, metric, unit=unit, wide=wide, width=fit, group=group)
    headers = [c.header for c in columns]
    natural = sum(max([_cell_len(h), *(_cell_len(r[i]) for r in rows)]) for i, h in enumerate(headers))
    natural += 2 * (len(headers) - 1)
    console_width = max(natural, fit) if wide else fit
    out = file if is_tty else io.StringIO()  # piped: trailing spaces stripped below
    console = Console(
        file=out,
        width=console_width,
        highlight=False,
        soft_wrap=False,
        force_terminal=is_tty,
        no_color=not is_tty,
        emoji=False,
    )
    table = Table(
        header_style="bold" if is_tty else None,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    for i, c in enumerate(columns):
        table.add_column(
            c.header,
            justify="left" if c.left else ("center" if c.header == "★" else "right"),
            no_wrap=i != 0,
            overflow="fold",
        )
    for (_, r), cells in zip(groups.iterrows(), rows):
        style = (
            ("bold green" if bool(r.get("pareto")) else ("dim" if bool(r.get("missing_energy")) else None))
            if is_tty
            else None
        )
        table.add_row(*cells, style=style)
    if title:
        console.print(title, markup=False, overflow="fold")
    console.print(table)
    for note in notes:
        console.print(note, overflow="fold", markup=False)
    if not is_tty:
        file.write("".join(line.rstrip() + "\n" for line in out.getvalue().splitlines()))


def to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts with NaN -> None (JSON-safe)."""
    out = []
    for rec in df.to_dict(orient="records"):
        out.append(
            {k: (None if isinstance(v, float) and math.isnan(v) else _plain(v)) for k, v in rec.items()}
        )
    return out


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    return v
