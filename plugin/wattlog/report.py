"""``wattlog report RUN_ID``: one run's power, cumulative energy and metric on one step axis.

Writes ``report.png`` and ``summary.txt`` into a folder and, with ``log=True``, logs the PNG
back to the run as ``energy/report.png``. Three kinds of run:

- a training run: power (from ``energy/trace.csv``, else the per-step power histories),
  cumulative energy and the metric over steps;
- an evaluation-only run (no train steps: ``validate``/``test``/``predict``): energy per stage
  and its power over batches;
- a sweep's parent run (tag ``wattlog.role=sweep``): the table of its children (as
  ``wattlog compare``) and their Pareto chart.

Every number is formatted by :mod:`wattlog.render`. mlflow and matplotlib are imported inside
functions.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wattlog import keys, render
from wattlog.errors import ConfigError
from wattlog.units import J_PER_KWH

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

TRACE_ARTIFACT = f"{keys.ARTIFACT_DIR}/{keys.TRACE_CSV}"
_TRAIN_STAGES = ("train", "fit", "training")
_EVAL_STAGES = ("val", "test", "predict")


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` wrote.

    Attributes:
        run_id: the run.
        png_path: the chart (None for a sweep without finished children).
        summary_path: the text summary.
        summary: the summary text.
        logged: whether the PNG was logged to the run as ``energy/report.png``.
        kind: ``train``, ``eval`` (no train steps) or ``sweep`` (a sweep's parent run).
    """

    run_id: str
    png_path: Path | None
    summary_path: Path
    summary: str
    logged: bool
    kind: str = "train"


def build_report(
    run_id: str,
    out_dir: str | Path | None = None,
    metric: str | None = None,
    tracking_uri: str | None = None,
    log: bool = False,
    unit: str = "J",
) -> Report:
    """Writes ``report.png`` and ``summary.txt`` for one run (see the module docstring for the kinds).

    Power comes from the ``energy/trace.csv`` artifact when the run has it (every stage, on the
    step axis), else from the ``energy/gpu_power_w`` and ``energy/power_w`` histories (stacked as
    ``gpu`` and ``other``). Cumulative energy is the ``energy/total_j`` history (or the legacy
    ``energy/total_kwh``, converted).

    Args:
        run_id: the MLflow run id.
        out_dir: output folder; default ``./wattlog-report-<first 8 chars of run_id>``.
        metric: objective metric key to plot and summarise (e.g. ``val_acc``); for a sweep
            parent, default its ``sweep.metric`` param.
        tracking_uri: MLflow tracking URI.
        log: log the PNG to the run as artifact ``energy/report.png``.
        unit: energy unit family (``J``/``Wh``, auto-scaled) or a fixed unit (``kWh``).

    Returns:
        The :class:`Report`.

    Raises:
        ConfigError: unknown run or metric, or a bad unit.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        render.energy_unit(unit)
    except ValueError:
        raise ConfigError("unit", unit, ["J", "Wh", *render.ENERGY_UNITS]) from None
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ConfigError("run_id", run_id, "the id of an existing MLflow run") from None
        raise
    out = Path(out_dir) if out_dir else Path(f"wattlog-report-{run_id[:8]}")
    if run.data.tags.get("wattlog.role") == "sweep":
        out.mkdir(parents=True, exist_ok=True)
        return _sweep_report(client, run, out, metric, tracking_uri, log, unit)
    if metric is not None and metric not in run.data.metrics:
        available = sorted(k for k in run.data.metrics if not k.startswith(keys.PREFIX))
        raise ConfigError(
            "metric", metric, ", ".join(available) or "(the run logs no metrics besides energy/*)"
        )
    out.mkdir(parents=True, exist_ok=True)

    from wattlog.compare import estimated_domains

    rows = _trace_rows(client, run_id)
    estimated = estimated_domains(run.data.params, run.data.tags)
    name = run.info.run_name or run_id[:8]
    title = f"{name} ({run_id[:8]})"
    m = run.data.metrics
    has_train = (
        any(str(r.get("stage")) in _TRAIN_STAGES for r in rows)
        if rows
        else bool(_history(client, run_id, keys.POWER_W))
    )
    if not has_train and (rows or any(keys.read_j(m, keys.stage_j(s)) is not None for s in _EVAL_STAGES)):
        from wattlog.plots import plot_stage_summary

        stage_j = {s: keys.read_j(m, keys.stage_j(s)) for s in _EVAL_STAGES}
        if rows and not any(v is not None for v in stage_j.values()):
            stage_j = _trace_stage_totals(rows)
        per_sample = {s: m.get(keys.stage_j_per_sample(s)) for s in _EVAL_STAGES}
        png = plot_stage_summary(
            out / "report.png",
            stage_j={s: v for s, v in stage_j.items() if v is not None},
            stage_j_per_sample={s: v for s, v in per_sample.items() if v is not None},
            trace_rows=rows or None,
            title=title,
            estimated=estimated,
            unit=unit,
        )
        source = f"{TRACE_ARTIFACT} ({len(rows)} rows, no train steps)" if rows else "stage summaries"
        summary = summarize(run, metric, [], source, unit=unit, kind="eval")
        kind = "eval"
    else:
        from wattlog.plots import plot_report

        energy_hist = _energy_history(client, run_id)
        metric_hist = _history(client, run_id, metric) if metric else []
        power_steps: list[float] = []
        layers: dict[str, list[float]] = {}
        if rows:
            from wattlog.plots import trace_layout

            source = f"{TRACE_ARTIFACT} ({trace_layout(rows).train_steps} train steps)"
        else:
            power_steps, layers, source = _power_series(client, run_id)
        png = plot_report(
            out / "report.png",
            power_steps=power_steps,
            power_layers=layers,
            trace_rows=rows or None,
            energy_steps=[s for s, _ in energy_hist],
            energy_j=[v for _, v in energy_hist],
            metric=metric,
            metric_steps=[s for s, _ in metric_hist],
            metric_values=[v for _, v in metric_hist],
            title=title,
            estimated=estimated,
            unit=unit,
        )
        summary = summarize(run, metric, metric_hist, source, unit=unit)
        kind = "train"
    summary_path = out / "summary.txt"
    summary_path.write_text(summary, encoding="utf-8")
    if log:
        client.log_artifact(run_id, str(png), artifact_path=keys.ARTIFACT_DIR)
    return Report(
        run_id=run_id, png_path=png, summary_path=summary_path, summary=summary, logged=log, kind=kind
    )


def _sweep_report(
    client: MlflowClient, run: Any, out: Path, metric: str | None, uri: str | None, log: bool, unit: str
) -> Report:
    """A sweep parent: the children's compare table and Pareto chart."""
    from wattlog.compare import compare_runs, group_runs
    from wattlog.compare_cli import sort_frame
    from wattlog.compare_table import print_table

    run_id = run.info.run_id
    params = run.data.params
    metric = metric or params.get("sweep.metric") or None
    mode = params.get("sweep.mode", "max") if params.get("sweep.mode") in ("max", "min") else "max"
    children = _children(client, run.info.experiment_id, run_id)
    name = run.info.run_name or run_id[:8]
    lines = [f"sweep      {name} ({run_id})  status {run.info.status}  {len(children)} child runs"]
    png: Path | None = None
    if not children:
        lines.append("children   none yet: this sweep has no child runs (tag mlflow.parentRunId) to compare")
    else:
        ids = [c.info.run_id for c in children]
        if metric and not any(metric in c.data.metrics for c in children):
            lines.append(f"metric     no child logged {metric}; compared by energy only")
            metric = None
        df = compare_runs(runs=ids, metric=metric, mode=mode, baseline="first", tracking_uri=uri)
        groups = sort_frame(group_runs(df, metric, mode), "energy", metric, mode)
        buf = io.StringIO()
        print_table(groups, metric, file=buf, width=100, unit=unit)
        lines.append("")
        lines.append(buf.getvalue().rstrip("\n"))
        if metric and (~groups["missing_energy"]).any():
            from wattlog.plots import plot_pareto

            png = plot_pareto(
                groups,
                metric,
                mode,
                out / "report.png",
                unit=unit,
                title=f"{name}: {metric} vs energy, {len(children)} runs",
            )
        else:
            lines.append("chart      none: the sweep has no metric (pass --metric) or no child logged energy")
    summary = "\n".join(lines) + "\n"
    summary_path = out / "summary.txt"
    summary_path.write_text(summary, encoding="utf-8")
    logged = False
    if log and png is not None:
        client.log_artifact(run_id, str(png), artifact_path=keys.ARTIFACT_DIR)
        logged = True
    return Report(
        run_id=run_id, png_path=png, summary_path=summary_path, summary=summary, logged=logged, kind="sweep"
    )


def _children(client: MlflowClient, experiment_id: str, parent_id: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` sorted by step; the last logged value wins for a repeated step."""
    by_step: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        by_step[m.step] = m.value
    return sorted(by_step.items())


def _energy_history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    """The cumulative-energy history in joules (``energy/total_j``, else legacy kWh converted)."""
    hist = _history(client, run_id, keys.TOTAL_J)
    if hist:
        return hist
    return [(s, v * J_PER_KWH) for s, v in _history(client, run_id, keys.LEGACY_KWH[keys.TOTAL_J])]


def _trace_rows(client: MlflowClient, run_id: str) -> list[dict[str, Any]]:
    artifacts = {a.path for a in client.list_artifacts(run_id, keys.ARTIFACT_DIR)}
    if TRACE_ARTIFACT not in artifacts:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, TRACE_ARTIFACT, tmp)
        with open(local, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))


def _trace_stage_totals(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    from wattlog.plots import trace_layout

    totals = trace_layout(rows).stage_totals_j
    return {s: totals[s] for s in _EVAL_STAGES if s in totals}


def _power_series(client: MlflowClient, run_id: str) -> tuple[list[float], dict[str, list[float]], str]:
    """Steps, domain -> watts per step from the per-step histories, and where they came from."""
    gpu = dict(_history(client, run_id, keys.GPU_POWER_W))
    total = dict(_history(client, run_id, keys.POWER_W))
    steps = sorted(set(total) | set(gpu))
    layers = {}
    if gpu:
        layers["gpu"] = [gpu.get(s, math.nan) for s in steps]
    if total:
        layers["other"] = [max(total[s] - gpu.get(s, 0.0), 0.0) if s in total else math.nan for s in steps]
    if not layers:
        return [], {}, "nowhere: the run has no energy/trace.csv and no energy/power_w history"
    return [float(s) for s in steps], layers, "energy/power_w and energy/gpu_power_w histories"


def _num(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def summarize(
    run: Any,
    metric: str | None,
    metric_hist: list[tuple[int, float]],
    power_source: str,
    *,
    unit: str = "J",
    kind: str = "train",
) -> str:
    """A short plain-text summary of one run's energy (estimated figures marked ``*``).

    Reads the joule keys (or legacy kWh keys) of the run's latest metrics; units auto-scaled.
    """
    from wattlog.compare import T_SHORT_RUN, estimated_domains, is_finite_metric

    m, p, tags = run.data.metrics, run.data.params, run.data.tags
    estimated = set(filter(None, estimated_domains(p, tags).split(",")))

    def E(joules: float | None) -> str:
        return render.format_energy(joules, unit)

    lines = [f"run        {run.info.run_name or ''} ({run.info.run_id})  status {run.info.status}"]
    total_key = keys.TOTAL_J if keys.TOTAL_J in m else keys.LEGACY_KWH[keys.TOTAL_J]
    if total_key not in m:
        lines.append("energy     — this run logged no energy/total_j")
    elif not is_finite_metric(m[total_key]):
        lines.append(f"energy     — this run logged a non-finite {total_key} ({m[total_key]:g})")
    else:
        parts = []
        for k in keys.KINDS:
            value = keys.read_j(m, keys.kind_j(k))
            if value is not None:
                star = "*" if k in estimated else ""
                parts.append(f"{k} {E(value)}{star} [{p.get(f'energy.{k}_method', '?')}]")
        star = "*" if estimated else ""
        total = keys.read_j(m, keys.TOTAL_J)
        lines.append(f"energy     {E(total)}{star}" + (f"  ({', '.join(parts)})" if parts else ""))
        stages = []
        for s in keys.STAGES:
            value = keys.read_j(m, keys.stage_j(s))
            if value is not None:
                per = m.get(keys.stage_j_per_sample(s))
                stages.append(
                    f"{s} {E(value)}"
                    + (f" ({render.format_energy(per, 'J')}/sample)" if per is not None else "")
                )
        if stages:
            lines.append(f"stages     {', '.join(stages)}")
    if keys.EMISSIONS_G in m:
        intensity = p.get(keys.P_INTENSITY, "?")
        source, pue = p.get(keys.P_CARBON_SOURCE, "?"), p.get(keys.P_PUE, "?")
        lines.append(
            f"emissions  {render.format_emissions(m[keys.EMISSIONS_G])}{'*' if estimated else ''}  "
            f"(intensity {intensity} g/kWh, source {source}, PUE {pue})"
        )
    if keys.AVG_POWER_W in m or keys.DURATION_S in m:
        avg, dur = m.get(keys.AVG_POWER_W), m.get(keys.DURATION_S)
        lines.append(f"power      avg {render.format_power(avg)} over {render.format_duration(dur)}")
    if keys.stage_j_per_sample("train") in m and keys.read_j(m, keys.stage_j("train")) is None:
        lines.append(f"J/sample   train {render.format_energy(m[keys.stage_j_per_sample('train')], 'J')}")
    if keys.P_GPU_MODEL in p:
        count, method = p.get(keys.P_GPU_COUNT, "?"), p.get(keys.P_GPU_METHOD, "?")
        lines.append(f"GPU        {p[keys.P_GPU_MODEL]} x{count} [{method}]")
    if metric:
        last = m.get(metric)
        line = f"metric     {metric} = {render.format_number(last)} (last)"
        if metric_hist:
            best_step, best = max(metric_hist, key=lambda sv: sv[1])
            line += f", max {render.format_number(best)} at step {best_step}"
        lines.append(line)
    to_target = keys.read_j(m, keys.J_TO_TARGET)
    if to_target is not None:
        lines.append(f"to target  {E(to_target)}")
    if kind == "eval":
        lines.append("kind       evaluation only: no train steps (energy per stage, power per batch)")
    lines.append(f"power from {power_source}")
    if estimated:
        lines.append(
            f"* includes estimated domains: {', '.join(sorted(estimated))} "
            "(CPU from TDP × utilisation, RAM from memory in use)"
        )
    short = str(tags.get(T_SHORT_RUN, "")).strip()
    if short and short.lower() not in ("none", "false", "0", "no"):
        lines.append(
            f"short run  {short}: shorter than its energy method resolves; treat the energy as approximate"
        )
    if tags.get(keys.T_DEGRADED):
        lines.append(f"degraded   {tags[keys.T_DEGRADED]}")
    return "\n".join(lines) + "\n"


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``report`` to an argparse subparsers object (sets ``func``)."""
    p = subparsers.add_parser(
        "report",
        help="chart and summary of one run's energy (or of a sweep's children)",
        description="Writes report.png (power per domain, cumulative energy, metric over steps; energy "
        "per stage for an evaluation run; the children's Pareto chart for a sweep parent) and summary.txt.",
    )
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="output folder (default: ./wattlog-report-<run>)"
    )
    p.add_argument("--metric", default=None, help="objective metric key to plot, e.g. val_acc")
    p.add_argument(
        "--unit",
        default="J",
        metavar="UNIT",
        help="energy unit: J or Wh (auto-scaled, default J) or a fixed one such as kWh",
    )
    p.add_argument("--log", action="store_true", help="also log the PNG to the run as energy/report.png")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cli_report)


def cli_report(args: argparse.Namespace) -> int:
    """``wattlog report``: writes the files, prints the summary and the paths."""
    from wattlog.compare_cli import probe_tracking, resolve_tracking_uri, run_cli

    uri = resolve_tracking_uri(args.tracking_uri)

    def body() -> int:
        probe_tracking(uri)
        rep = build_report(args.run_id, args.out, args.metric, uri, args.log, getattr(args, "unit", "J"))
        sys.stdout.write(rep.summary)
        if rep.png_path is not None:
            print(f"wrote {rep.png_path} and {rep.summary_path}", file=sys.stderr)
        else:
            print(f"wrote {rep.summary_path} (no chart)", file=sys.stderr)
        if rep.logged and rep.png_path is not None:
            print(f"logged {rep.png_path.name} to run {rep.run_id} as energy/report.png", file=sys.stderr)
        return 0

    return run_cli(body, uri)
