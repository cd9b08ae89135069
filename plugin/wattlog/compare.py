"""Compare runs by energy: read runs back from MLflow into one table.

``compare_runs`` answers "which run got the metric for the least energy, and by how much?".
It reads each run's *latest* metric values, params and tags with paged
``MlflowClient.search_runs`` calls (no per-step histories), so it stays fast on thousands of
runs. ``energy_to_target`` is the one function that reads per-step histories.

Module-level imports are cheap: pandas, mlflow and rich are imported inside functions.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from wattlog.errors import ConfigError
from wattlog.pareto import pareto_mask

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow import MlflowClient

PAGE_SIZE = 5000
"""Runs per ``search_runs`` page (the MLflow server and sqlite store accept up to 50,000)."""

ENERGY_COLUMNS: dict[str, str] = {
    "total_kwh": "energy/total_kwh",
    "gpu_kwh": "energy/gpu_kwh",
    "cpu_kwh": "energy/cpu_kwh",
    "ram_kwh": "energy/ram_kwh",
    "emissions_g": "energy/emissions_g",
    "j_per_sample": "energy/j_per_sample",
    "test_j_per_sample": "energy/test_j_per_sample",
    "avg_power_w": "energy/avg_power_w",
}
"""DataFrame column -> MLflow metric key (latest value)."""

BASE_COLUMNS = ["run_id", "run_name", "experiment", "status", "start_time", "duration_s", *ENERGY_COLUMNS]
MODES = ("max", "min")
SORT_KEYS: dict[str, str] = {
    "kwh": "total_kwh",
    "emissions": "emissions_g",
    "power": "avg_power_w",
    "j_per_sample": "j_per_sample",
    "duration": "duration_s",
    "name": "run_name",
    "start": "start_time",
    "delta": "delta_kwh",
    "metric": "<metric>",
    "target": "kwh_to_target",
}
"""``--sort`` keys -> columns; ``metric`` sorts best first, the others ascending."""

_ESTIMATED_PARAMS = {"cpu": "energy.cpu_method", "ram": "energy.ram_method", "gpu": "energy.gpu_method"}


# --------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------


def compare_runs(
    experiments: str | Sequence[str] | None = None,
    runs: Sequence[str] | None = None,
    filter: str | None = None,  # noqa: A002 - the documented keyword
    metric: str | None = None,
    mode: str = "max",
    baseline: str | None = None,
    tracking_uri: str | None = None,
    params: Sequence[str] | None = None,
    target: float | None = None,
) -> pd.DataFrame:
    """One row per run: energy, emissions, the objective metric, deltas and the Pareto flag.

    Reads each run's latest metrics (``energy/total_kwh``, ``energy/gpu_kwh``,
    ``energy/cpu_kwh``, ``energy/ram_kwh``, ``energy/emissions_g``, ``energy/j_per_sample``,
    ``energy/test_j_per_sample``, ``energy/avg_power_w``, ``energy/duration_s`` and ``metric``),
    the ``energy.*_method`` params and the ``energy.estimated`` tag. Per-step histories are
    read only when ``target`` is given.

    Args:
        experiments: experiment name(s) or id(s). Required unless ``runs`` is given.
        runs: run ids to compare (any experiments); combined with ``experiments`` it restricts
            them to these runs.
        filter: an MLflow search filter, e.g. ``"params.quantize = 'int8'"``.
        metric: the objective metric key, e.g. ``val_acc``; enables the Pareto flag.
        mode: ``max`` when a larger metric is better, ``min`` when smaller is.
        baseline: ``None`` (no delta columns), a compared run's id or name, ``first`` (the
            earliest started run with energy) or ``best`` (best ``metric`` among runs with energy).
        tracking_uri: MLflow tracking URI; default: ``MLFLOW_TRACKING_URI`` / MLflow's default.
        params: param names to add as ``params.<name>`` columns; default: every param whose
            value differs between the runs (``energy.*`` params excluded).
        target: with ``metric``, adds ``kwh_to_target`` (see :func:`energy_to_target`).

    Returns:
        A DataFrame ordered by start time with columns ``run_id``, ``run_name``,
        ``experiment``, ``status``, ``start_time`` (ISO 8601, UTC), ``duration_s`` (the
        measured ``energy/duration_s``, else the run's wall time), ``total_kwh``, ``gpu_kwh``,
        ``cpu_kwh``, ``ram_kwh``, ``emissions_g``, ``j_per_sample``, ``test_j_per_sample``,
        ``avg_power_w``, then ``<metric>`` and ``kwh_to_target`` when asked, ``delta_kwh``,
        ``delta_kwh_pct``, ``delta_<metric>`` with a baseline, then ``pareto`` (bool),
        ``estimated`` (comma list of estimated domain kinds, ``""`` when all measured),
        ``missing_energy`` (bool: no ``energy/total_kwh``; such runs are never on the front)
        and ``params.<name>`` columns. Missing values are NaN. A logged NaN or +-inf (MLflow's SQL
        stores return +-inf as +-1.797e308) is read as NaN too, so such runs count as missing
        that value (``missing_energy`` for ``energy/total_kwh``); ``df.attrs["non_finite"]``
        lists them as ``"<run name>: <key>"``.

    Raises:
        ConfigError: unknown experiment, run, metric or baseline; bad mode or filter.
        mlflow.exceptions.MlflowException: the tracking server failed.
    """
    import pandas as pd

    _check_mode(mode)
    if target is not None and metric is None:
        raise ConfigError("target", target, "a target needs a metric")
    client = _client(tracking_uri)
    found = _fetch_runs(client, experiments, runs, filter)
    exp_names = _experiment_names(client, {r.info.experiment_id for r in found})
    rows = [_row(r, metric, exp_names) for r in found]
    non_finite = [f"{row['run_name']}: {key}" for row in rows for key in row.pop("_non_finite")]

    columns = list(BASE_COLUMNS)
    if metric is not None:
        columns.append(metric)
    df = pd.DataFrame(rows, columns=[*columns, "estimated", "missing_energy"])
    if metric is not None and len(found) and not any(metric in r.data.metrics for r in found):
        raise ConfigError("metric", metric, _available_metrics(found))
    if target is not None:
        df["kwh_to_target"] = [
            math.nan if miss else energy_to_target(rid, metric, target, mode, client=client)
            for rid, miss in zip(df["run_id"], df["missing_energy"])
        ]
    base_ref = _add_deltas(df, baseline, metric, mode) if baseline is not None else None
    if metric is not None and len(df):
        energy = [math.nan if miss else e for e, miss in zip(df["total_kwh"], df["missing_energy"])]
        df["pareto"] = pareto_mask(list(df[metric]), energy, mode)
    else:
        df["pareto"] = False
    df["pareto"] = df["pareto"].astype(bool)
    df["missing_energy"] = df["missing_energy"].astype(bool)
    ordered = [c for c in df.columns if c not in ("estimated", "missing_energy")]
    df = df[[*ordered, "estimated", "missing_energy"]]
    param_df = _param_columns(found, params)
    if param_df:
        df = pd.concat([df, pd.DataFrame(param_df, index=df.index)], axis=1)
    df.attrs.update(metric=metric, mode=mode, non_finite=non_finite)
    if base_ref is not None:
        df.attrs["baseline_run_id"], df.attrs["baseline_run_name"] = base_ref
    return df


def energy_to_target(
    run_id: str,
    metric: str,
    value: float,
    mode: str = "max",
    tracking_uri: str | None = None,
    *,
    client: MlflowClient | None = None,
) -> float:
    """Cumulative kWh spent until ``metric`` first reached ``value`` (energy-to-accuracy).

    Reads two per-step histories: ``metric`` and ``energy/total_kwh``. The target step is
    the smallest step whose ``metric`` value is ``>= value`` (mode ``max``) or ``<= value``
    (mode ``min``). The energy at that step is linearly interpolated between the two logged
    ``energy/total_kwh`` points around it (the last value wins when one step was logged
    twice); before the first logged point it is interpolated from (step 0, 0 kWh); after the
    last point it is the last (final) value.

    Args:
        run_id: the MLflow run.
        metric: the metric key, e.g. ``val_acc``.
        value: the target value.
        mode: ``max`` or ``min``.
        tracking_uri: MLflow tracking URI (ignored when ``client`` is given).
        client: an existing ``MlflowClient`` to reuse.

    Returns:
        kWh, or NaN when the target was never reached or the run has no energy history.

    Raises:
        ConfigError: bad mode.
    """
    _check_mode(mode)
    client = client or _client(tracking_uri)
    target_step = None
    for point in sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp)):
        reached = point.value >= value if mode == "max" else point.value <= value
        if reached and is_finite_metric(point.value):
            target_step = point.step
            break
    if target_step is None:
        return math.nan
    by_step: dict[int, float] = {}
    for point in sorted(client.get_metric_history(run_id, "energy/total_kwh"), key=lambda m: m.timestamp):
        if is_finite_metric(point.value):
            by_step[point.step] = point.value
    return interpolate_kwh(sorted(by_step.items()), target_step)


def interpolate_kwh(points: Sequence[tuple[float, float]], step: float) -> float:
    """Cumulative kWh at ``step`` from sorted ``(step, kWh)`` points, as documented above.

    Returns NaN when there are no points.
    """
    if not points:
        return math.nan
    first_step, first_kwh = points[0]
    if step <= first_step:
        if first_step <= 0:
            return first_kwh
        return first_kwh * max(step, 0) / first_step
    for (s0, e0), (s1, e1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return e0 if s1 == s0 else e0 + (e1 - e0) * (step - s0) / (s1 - s0)
    return points[-1][1]


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError("mode", mode, MODES)


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _resolve_experiments(client: MlflowClient, experiments: str | Sequence[str]) -> list[str]:
    from mlflow.exceptions import MlflowException

    names = [experiments] if isinstance(experiments, str) else list(experiments)
    ids: list[str] = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None and str(name).isdigit():
            try:
                exp = client.get_experiment(str(name))
            except MlflowException:
                exp = None
        if exp is None or exp.lifecycle_stage == "deleted":
            raise ConfigError("experiment", name, _known_experiments(client))
        if exp.experiment_id not in ids:
            ids.append(exp.experiment_id)
    return ids


def _known_experiments(client: MlflowClient, limit: int = 20) -> str:
    page = client.search_experiments(max_results=limit + 1)
    names = [e.name for e in page]
    text = ", ".join(repr(n) for n in sorted(names[:limit]))
    if len(names) > limit:
        text += ", ..."
    return text or "(no experiments on this tracking server)"


def _fetch_runs(
    client: MlflowClient,
    experiments: str | Sequence[str] | None,
    runs: Sequence[str] | None,
    filter_string: str | None,
) -> list[Any]:
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    if not experiments and not runs:
        raise ConfigError("experiments", experiments, "one or more experiment names or ids, or runs=")
    exp_ids = _resolve_experiments(client, experiments) if experiments else []
    clauses = [filter_string.strip()] if filter_string and filter_string.strip() else []
    if runs:
        run_ids = list(dict.fromkeys(runs))
        for rid in run_ids:
            if not re.fullmatch(r"[0-9a-zA-Z_-]+", rid):
                raise ConfigError("runs", rid, "MLflow run ids")
        if not exp_ids:
            for rid in run_ids:
                try:
                    info = client.get_run(rid).info
                except MlflowException as exc:
                    if _is_not_found(exc):
                        raise ConfigError("runs", rid, "ids of existing runs") from None
                    raise
                if info.experiment_id not in exp_ids:
                    exp_ids.append(info.experiment_id)
        clauses.append("attributes.run_id IN (" + ", ".join(f"'{r}'" for r in run_ids) + ")")
    found: list[Any] = []
    token = None
    while True:
        try:
            page = client.search_runs(
                exp_ids,
                filter_string=" AND ".join(clauses),
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=PAGE_SIZE,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
        except MlflowException as exc:
            if filter_string and _is_bad_request(exc):
                raise ConfigError(
                    "filter",
                    filter_string,
                    f"an MLflow search filter, e.g. \"params.lr = '0.1'\" ({exc.message})",
                ) from None
            raise
        # a sweep's parent run (tag wattlog.role=sweep) summarises its children: not a row of its own
        found.extend(r for r in page if runs or r.data.tags.get("wattlog.role") != "sweep")
        token = page.token
        if not token:
            return found


def _is_not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _is_bad_request(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")


def _experiment_names(client: MlflowClient, ids: Iterable[str]) -> dict[str, str]:
    names = {}
    for exp_id in ids:
        names[exp_id] = client.get_experiment(exp_id).name
    return names


def _row(run: Any, metric: str | None, exp_names: dict[str, str]) -> dict[str, Any]:
    info, data = run.info, run.data
    metrics = data.metrics
    row: dict[str, Any] = {
        "run_id": info.run_id,
        "run_name": info.run_name or data.tags.get("mlflow.runName") or info.run_id[:8],
        "experiment": exp_names.get(info.experiment_id, info.experiment_id),
        "status": info.status,
        "start_time": _iso(info.start_time),
    }
    non_finite: list[str] = []

    def value(key: str) -> float:
        got = metrics.get(key)
        if got is None:
            return math.nan
        if not is_finite_metric(got):
            non_finite.append(key)
            return math.nan
        return float(got)

    duration_s = value("energy/duration_s")
    if math.isnan(duration_s) and info.start_time and info.end_time:
        duration_s = (info.end_time - info.start_time) / 1000.0
    row["duration_s"] = duration_s
    for column, key in ENERGY_COLUMNS.items():
        row[column] = value(key)
    if metric is not None:
        row[metric] = value(metric)
    row["estimated"] = estimated_domains(data.params, data.tags)
    row["missing_energy"] = math.isnan(row["total_kwh"])
    row["_non_finite"] = non_finite
    return row


def is_finite_metric(value: float) -> bool:
    """False for NaN, +-inf and +-1.7976931348623157e308 (what MLflow's SQL stores return for +-inf)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and abs(number) < sys.float_info.max


def estimated_domains(params: dict[str, str], tags: dict[str, str]) -> str:
    """Comma list of estimated domain kinds: the ``energy.estimated`` tag, else the
    ``energy.{gpu,cpu,ram}_method`` params equal to ``estimate``; ``""`` when none."""
    tag = tags.get("energy.estimated")
    if tag is not None:
        kinds = [k.strip() for k in tag.split(",") if k.strip() and k.strip().lower() != "none"]
        return ",".join(kinds)
    return ",".join(kind for kind, key in _ESTIMATED_PARAMS.items() if params.get(key) == "estimate")


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc).isoformat(timespec="seconds")


def _available_metrics(found: Sequence[Any]) -> str:
    keys = sorted({k for r in found for k in r.data.metrics if not k.startswith("energy/")})
    return ", ".join(keys) if keys else "(the runs log no metrics besides energy/*)"


def _param_columns(found: Sequence[Any], names: Sequence[str] | None) -> dict[str, list[Any]]:
    if names is None:
        all_names = sorted({k for r in found for k in r.data.params if not k.startswith("energy.")})
        names = [n for n in all_names if len({r.data.params.get(n) for r in found}) > 1]
    return {f"params.{n}": [r.data.params.get(n) for r in found] for n in names}


def _add_deltas(df: pd.DataFrame, baseline: str, metric: str | None, mode: str) -> tuple[str, str]:
    """Adds ``delta_kwh``, ``delta_kwh_pct`` and ``delta_<metric>``; returns the baseline's id and name."""
    with_energy = df[~df["missing_energy"]]
    if baseline == "first":
        if with_energy.empty:
            raise ConfigError("baseline", baseline, "needs at least one run with energy/total_kwh")
        base = with_energy.iloc[0]  # rows are ordered by start time
    elif baseline == "best":
        if metric is None:
            raise ConfigError("baseline", baseline, "'best' needs a metric")
        ranked = with_energy[with_energy[metric].notna()]
        if ranked.empty:
            raise ConfigError("baseline", baseline, f"needs a run with energy and {metric}")
        idx = ranked[metric].idxmax() if mode == "max" else ranked[metric].idxmin()
        base = ranked.loc[idx]
    else:
        match = df[(df["run_id"] == baseline) | (df["run_name"] == baseline)]
        if match.empty:
            raise ConfigError("baseline", baseline, "'first', 'best', or the id or name of a compared run")
        base = match.iloc[0]
        if base["missing_energy"]:
            raise ConfigError("baseline", baseline, "a run that logged energy/total_kwh")
    base_kwh = float(base["total_kwh"])
    df["delta_kwh"] = df["total_kwh"] - base_kwh
    df["delta_kwh_pct"] = 100.0 * df["delta_kwh"] / base_kwh if base_kwh else math.nan
    if metric is not None:
        df[f"delta_{metric}"] = df[metric] - base[metric]
    return str(base["run_id"]), str(base["run_name"])


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, (int, float)):
        return f"{float(value):.4g}"
    return str(value)


def _signed(value: Any, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return ("+" if value > 0 else "") + _fmt(value) + suffix


def display_rows(
    df: pd.DataFrame, metric: str | None = None, max_params: int = 6
) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers (with units), formatted cells and footnotes shared by the table and Markdown.

    Estimated values carry ``*``; Pareto runs ``★``; runs without energy show ``—``.
    """
    cols: list[tuple[str, Callable[[Any], str]]] = [("run", lambda r: str(r["run_name"]))]

    def energy_cell(column: str, kinds: set[str] | None) -> Callable[[Any], str]:
        def cell(r: Any) -> str:
            est = {k for k in str(r["estimated"]).split(",") if k}
            marked = bool(est) if kinds is None else bool(est & kinds)
            return _fmt(r[column]) + ("*" if marked and not r["missing_energy"] else "")

        return cell

    cols += [
        ("kWh", energy_cell("total_kwh", None)),
        ("GPU kWh", energy_cell("gpu_kwh", {"gpu"})),
        ("CPU kWh", energy_cell("cpu_kwh", {"cpu"})),
        ("RAM kWh", energy_cell("ram_kwh", {"ram"})),
        ("gCO2e", energy_cell("emissions_g", None)),
    ]
    # training J/sample where any run trained; inference J/sample where any run was tested
    for column, header in (("j_per_sample", "J/sample"), ("test_j_per_sample", "test J/sample")):
        if column in df.columns and df[column].notna().any():
            cols.append((header, energy_cell(column, None)))
    cols += [
        ("avg W", lambda r: _fmt(r["avg_power_w"])),
        ("time s", lambda r: _fmt(r["duration_s"])),
    ]
    if metric is not None and metric in df.columns:
        cols.append((metric, lambda r: _fmt(r[metric])))
    if "kwh_to_target" in df.columns:
        cols.append(("kWh to target", lambda r: _fmt(r["kwh_to_target"])))
    if "delta_kwh" in df.columns:
        cols.append(("Δ kWh", lambda r: _signed(r["delta_kwh"])))
        cols.append(("Δ kWh %", lambda r: _signed(r["delta_kwh_pct"], "%")))
        if metric is not None and f"delta_{metric}" in df.columns:
            cols.append((f"Δ {metric}", lambda r: _signed(r[f"delta_{metric}"])))
    cols.append(("pareto", lambda r: "★" if r["pareto"] else ""))
    param_cols = [c for c in df.columns if c.startswith("params.")]
    for c in param_cols[:max_params]:
        cols.append((c.removeprefix("params."), lambda r, c=c: _fmt(r[c])))

    rows = [[fn(r) for _, fn in cols] for _, r in df.iterrows()]
    notes = []
    if metric is not None:
        notes.append(
            f"★ on the Pareto front of {metric} vs kWh (both better: {metric} {_dir(df)}, kWh lower)"
        )
    if df["estimated"].astype(str).str.len().gt(0).any():
        notes.append("* includes estimated domains (CPU from TDP x utilisation, RAM from memory in use)")
    if df["missing_energy"].any():
        notes.append("— run logged no energy/total_kwh (shown, excluded from the front)")
    if df.attrs.get("non_finite"):
        shown = ", ".join(df.attrs["non_finite"][:5]) + (", ..." if len(df.attrs["non_finite"]) > 5 else "")
        notes.append(f"— also where a NaN/inf value was logged, read as missing: {shown}")
    if "baseline_run_name" in df.attrs:
        notes.append(
            f"Δ against baseline run {df.attrs['baseline_run_name']} ({df.attrs['baseline_run_id']})"
        )
    if len(param_cols) > max_params:
        notes.append(f"{len(param_cols) - max_params} more differing params not shown; choose with --params")
    return [h for h, _ in cols], rows, notes


def _dir(df: pd.DataFrame) -> str:
    return "higher" if df.attrs.get("mode", "max") == "max" else "lower"


def to_markdown(df: pd.DataFrame, metric: str | None = None) -> str:
    """A GitHub Markdown table of :func:`display_rows`, footnotes below it."""
    headers, rows, notes = display_rows(df, metric)

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    if notes:
        lines.append("")
        lines += [f"{n}  " for n in notes]
    return "\n".join(lines) + "\n"


def print_table(
    df: pd.DataFrame, metric: str | None = None, file: Any = None, title: str | None = None
) -> None:
    """Prints a rich table; Pareto rows bold green, runs without energy dimmed."""
    from rich.console import Console
    from rich.table import Table

    file = file or sys.stdout
    is_tty = hasattr(file, "isatty") and file.isatty()
    console = Console(file=file, width=None if is_tty else 240, highlight=False, soft_wrap=False)
    headers, rows, notes = display_rows(df, metric)
    table = Table(title=title, header_style="bold")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for (_, r), cells in zip(df.iterrows(), rows):
        style = "bold green" if r["pareto"] else ("dim" if r["missing_energy"] else None)
        table.add_row(*cells, style=style)
    console.print(table)
    for note in notes:
        console.print(note)


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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def redact_uri(uri: str | None) -> str:
    """The tracking URI without user:password and with secret-looking query values hidden."""
    if not uri:
        return str(uri)
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable tracking URI>"
    out = uri
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        out = out.replace(userinfo + "@", "***@", 1)
    if parts.query:
        query = re.sub(
            r"(?i)((?:token|password|passwd|secret|key|auth|sig|signature)[^=&]*)=[^&]*",
            r"\1=***",
            parts.query,
        )
        out = out.replace("?" + parts.query, "?" + query, 1)
    return out


class CliError(Exception):
    """A user-facing error: printed without traceback, exit code 2."""


def resolve_tracking_uri(uri: str | None) -> str | None:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _redact_text(text: str, uri: str | None) -> str:
    if uri:
        text = text.replace(uri, redact_uri(uri))
        parts = urlsplit(uri)
        if "@" in parts.netloc:
            text = text.replace(parts.netloc.rsplit("@", 1)[0] + "@", "***@")
    return text


def probe_tracking(uri: str | None, timeout_s: int = 5) -> None:
    """Fails fast (CliError) when the tracking store cannot be reached.

    For HTTP servers the probe runs with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=timeout_s`` (unless the user set them); the environment is
    restored afterwards. A ``sqlite:///`` URI must point at an existing file.
    """
    from mlflow import MlflowClient

    if uri and uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :].split("?", 1)[0]
        if path != ":memory:" and not os.path.exists(path):
            raise CliError(f"no MLflow database at {path} (tracking URI {redact_uri(uri)})")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "unreachable"; reported, exit 2
        reason = _redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, uri)
        raise CliError(
            f"cannot reach the MLflow tracking server at {redact_uri(uri or _default_uri())}: {reason}"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _default_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def run_cli(body: Callable[[], int], uri: str | None) -> int:
    """Runs a CLI body; ConfigError/CliError/MlflowException become ``error: ...`` and exit 2."""
    from mlflow.exceptions import MlflowException

    try:
        return body()
    except (ConfigError, CliError) as exc:
        print(f"error: {_redact_text(str(exc), uri)}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"error: MLflow: {_redact_text(exc.message, uri)}", file=sys.stderr)
        return 2


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``compare`` to an argparse subparsers object (sets ``func``)."""
    p = subparsers.add_parser(
        "compare",
        help="compare MLflow runs by energy, metric and Pareto front",
        description="One row per run: kWh, gCO2e, J/sample, the metric, deltas and the Pareto front.",
    )
    p.add_argument(
        "-e",
        "--experiment",
        dest="experiments",
        action="append",
        required=True,
        metavar="EXPERIMENT",
        help="experiment name or id (repeatable)",
    )
    p.add_argument("--filter", default=None, help="MLflow search filter, e.g. \"params.quantize = 'int8'\"")
    p.add_argument("--metric", default=None, help="objective metric key, e.g. val_acc")
    p.add_argument(
        "--mode", choices=MODES, default="max", help="is a larger (max) or smaller (min) metric better"
    )
    p.add_argument(
        "--baseline", default=None, metavar="RUN_ID|best|first", help="run to compute deltas against"
    )
    p.add_argument("--target", type=float, default=None, help="add kWh to first reach this metric value")
    p.add_argument(
        "--sort", default="kwh", help=f"one of {', '.join(SORT_KEYS)} or a column name (default: kwh)"
    )
    p.add_argument("--format", choices=("table", "csv", "json", "markdown"), default="table")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a metric-vs-kWh scatter with the front")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--params", default=None, help="comma list of params to show (default: those that differ)")
    p.set_defaults(func=cli_compare)


def sort_frame(df: pd.DataFrame, key: str, metric: str | None, mode: str) -> pd.DataFrame:
    """Sorts by a ``SORT_KEYS`` key or a column, ties by the best metric; missing values last."""
    column = SORT_KEYS.get(key, key)
    ascending = True
    if column == "<metric>":
        if metric is None:
            raise CliError("--sort metric needs --metric")
        column, ascending = metric, mode == "min"
    if column not in df.columns:
        raise ConfigError("sort", key, [*SORT_KEYS, *[c for c in df.columns if c not in SORT_KEYS.values()]])
    if metric is not None and column != metric and metric in df.columns:  # ties: best metric first
        return df.sort_values(
            [column, metric], ascending=[ascending, mode == "min"], na_position="last", kind="stable"
        )
    return df.sort_values(column, ascending=ascending, na_position="last", kind="stable")


def cli_compare(args: argparse.Namespace) -> int:
    """``wattlog compare``: prints the table (or csv/json/markdown) and writes ``--plot``."""
    uri = resolve_tracking_uri(args.tracking_uri)

    def body() -> int:
        if args.target is not None and not args.metric:
            raise CliError("--target needs --metric")
        if args.plot and not args.metric:
            raise CliError("--plot needs --metric")
        if args.baseline == "best" and not args.metric:
            raise CliError("--baseline best needs --metric")
        probe_tracking(uri)
        params = [p.strip() for p in args.params.split(",") if p.strip()] if args.params else None
        df = compare_runs(
            experiments=args.experiments,
            filter=args.filter,
            metric=args.metric,
            mode=args.mode,
            baseline=args.baseline,
            tracking_uri=uri,
            params=params,
            target=args.target,
        )
        if df.empty:
            print(f"no runs in {', '.join(args.experiments)} match", file=sys.stderr)
            return 0
        attrs = dict(df.attrs)
        df = sort_frame(df, args.sort, args.metric, args.mode)
        df.attrs.update(attrs)
        if args.format == "csv":
            sys.stdout.write(df.to_csv(index=False))
        elif args.format == "json":
            import json

            sys.stdout.write(json.dumps(to_records(df), indent=1) + "\n")
        elif args.format == "markdown":
            sys.stdout.write(to_markdown(df, args.metric))
        else:
            title = f"{', '.join(args.experiments)}: {len(df)} runs"
            print_table(df, args.metric, title=title)
        if args.plot:
            from wattlog.plots import plot_pareto

            path = plot_pareto(df, args.metric, args.mode, args.plot)
            print(f"wrote {path}", file=sys.stderr)
        return 0

    return run_cli(body, uri)
