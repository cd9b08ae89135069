"""``wattlog report RUN_ID``: one run's power, cumulative energy and metric on one step axis.

Writes ``report.png`` and ``summary.txt`` into a folder and, with ``log=True``, logs the PNG
back to the run as ``energy/report.png``. mlflow and matplotlib are imported inside functions.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wattlog.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

TRACE_ARTIFACT = "energy/trace.csv"
_TRAIN_STAGES = ("train", "fit", "training")


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` wrote.

    Attributes:
        run_id: the run.
        png_path: the chart.
        summary_path: the text summary.
        summary: the summary text.
        logged: whether the PNG was logged to the run as ``energy/report.png``.
    """

    run_id: str
    png_path: Path
    summary_path: Path
    summary: str
    logged: bool


def build_report(
    run_id: str,
    out_dir: str | Path | None = None,
    metric: str | None = None,
    tracking_uri: str | None = None,
    log: bool = False,
) -> Report:
    """Writes ``report.png`` (stacked power per domain, cumulative kWh, the metric, over steps)
    and ``summary.txt`` for one run.

    Power comes from the ``energy/trace.csv`` artifact (train-stage rows, per-domain
    ``<domain>_j / duration``) when the run has it, else from the ``energy/gpu_power_w`` and
    ``energy/power_w`` histories (stacked as ``gpu`` and ``other``). Cumulative energy is the
    ``energy/total_kwh`` history.

    Args:
        run_id: the MLflow run id.
        out_dir: output folder; default ``./wattlog-report-<first 8 chars of run_id>``.
        metric: objective metric key to plot and summarise (e.g. ``val_acc``).
        tracking_uri: MLflow tracking URI.
        log: log the PNG to the run as artifact ``energy/report.png``.

    Returns:
        The :class:`Report`.

    Raises:
        ConfigError: unknown run or metric.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from wattlog.plots import plot_report

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ConfigError("run_id", run_id, "the id of an existing MLflow run") from None
        raise
    if metric is not None and metric not in run.data.metrics:
        available = sorted(k for k in run.data.metrics if not k.startswith("energy/"))
        raise ConfigError(
            "metric", metric, ", ".join(available) or "(the run logs no metrics besides energy/*)"
        )
    out = Path(out_dir) if out_dir else Path(f"wattlog-report-{run_id[:8]}")
    out.mkdir(parents=True, exist_ok=True)

    power_steps, layers, power_source = _power_series(client, run_id)
    kwh_hist = _history(client, run_id, "energy/total_kwh")
    metric_hist = _history(client, run_id, metric) if metric else []
    name = run.info.run_name or run_id[:8]
    png = plot_report(
        out / "report.png",
        power_steps=power_steps,
        power_layers=layers,
        kwh_steps=[s for s, _ in kwh_hist],
        kwh=[v for _, v in kwh_hist],
        metric=metric,
        metric_steps=[s for s, _ in metric_hist],
        metric_values=[v for _, v in metric_hist],
        title=f"{name} ({run_id[:8]})",
    )
    summary = summarize(run, metric, metric_hist, power_source)
    summary_path = out / "summary.txt"
    summary_path.write_text(summary, encoding="utf-8")
    if log:
        client.log_artifact(run_id, str(png), artifact_path="energy")
    return Report(run_id=run_id, png_path=png, summary_path=summary_path, summary=summary, logged=log)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` sorted by step; the last logged value wins for a repeated step."""
    by_step: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        by_step[m.step] = m.value
    return sorted(by_step.items())


def _power_series(client: MlflowClient, run_id: str) -> tuple[list[float], dict[str, list[float]], str]:
    """Steps, domain -> watts per step, and a description of where they came from."""
    from wattlog.plots import domain_power_w

    artifacts = {a.path for a in client.list_artifacts(run_id, "energy")}
    if TRACE_ARTIFACT in artifacts:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, TRACE_ARTIFACT, tmp)
            with open(local, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        train = [r for r in rows if r.get("stage") in _TRAIN_STAGES] or rows
        train.sort(key=lambda r: _num(r.get("step")))
        layers = domain_power_w(train)
        if layers:
            return [_num(r.get("step")) for r in train], layers, f"{TRACE_ARTIFACT} ({len(train)} steps)"
    gpu = dict(_history(client, run_id, "energy/gpu_power_w"))
    total = dict(_history(client, run_id, "energy/power_w"))
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


def _kwh(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g} kWh"


def summarize(run: Any, metric: str | None, metric_hist: list[tuple[int, float]], power_source: str) -> str:
    """A short plain-text summary of one run's energy (estimated figures marked ``*``)."""
    from wattlog.compare import estimated_domains, is_finite_metric

    m, p, tags = run.data.metrics, run.data.params, run.data.tags
    estimated = set(filter(None, estimated_domains(p, tags).split(",")))
    lines = [f"run        {run.info.run_name or ''} ({run.info.run_id})  status {run.info.status}"]
    if "energy/total_kwh" not in m:
        lines.append("energy     — this run logged no energy/total_kwh")
    elif not is_finite_metric(m["energy/total_kwh"]):
        total = m["energy/total_kwh"]
        lines.append(f"energy     — this run logged a non-finite energy/total_kwh ({total:g})")
    else:
        parts = []
        for kind in ("gpu", "cpu", "ram"):
            value = m.get(f"energy/{kind}_kwh")
            if value is not None:
                star = "*" if kind in estimated else ""
                parts.append(f"{kind} {value:.6g}{star} [{p.get(f'energy.{kind}_method', '?')}]")
        star = "*" if estimated else ""
        lines.append(
            f"energy     {m['energy/total_kwh']:.6g} kWh{star}" + (f"  ({', '.join(parts)})" if parts else "")
        )
        stages = [
            f"{s} {m[f'energy/{s}_kwh']:.6g}"
            for s in ("train", "val", "test", "predict")
            if f"energy/{s}_kwh" in m
        ]
        if stages:
            lines.append(f"stages     {', '.join(stages)} kWh")
    if "energy/emissions_g" in m:
        intensity = p.get("energy.carbon_intensity_g_per_kwh", "?")
        source, pue = p.get("energy.carbon_source", "?"), p.get("energy.pue", "?")
        lines.append(
            f"emissions  {m['energy/emissions_g']:.6g} gCO2e{'*' if estimated else ''}  "
            f"(intensity {intensity} g/kWh, source {source}, PUE {pue})"
        )
    if "energy/avg_power_w" in m or "energy/duration_s" in m:
        avg, dur = m.get("energy/avg_power_w"), m.get("energy/duration_s")
        avg_text = "—" if avg is None else f"{avg:.4g}"
        dur_text = "—" if dur is None else f"{dur:.4g}"
        lines.append(f"power      avg {avg_text} W over {dur_text} s")
    jps = [
        f"{k} {m[f'energy/{key}']:.4g}"
        for k, key in (
            ("train", "j_per_sample"),
            ("test", "test_j_per_sample"),
            ("predict", "predict_j_per_sample"),
        )
        if f"energy/{key}" in m
    ]
    if jps:
        lines.append(f"J/sample   {', '.join(jps)}")
    if "energy.gpu_model" in p:
        count, method = p.get("energy.gpu_count", "?"), p.get("energy.gpu_method", "?")
        lines.append(f"GPU        {p['energy.gpu_model']} x{count} [{method}]")
    if metric:
        last = m.get(metric)
        line = f"metric     {metric} = {last:.6g} (last)"
        if metric_hist:
            best_step, best = max(metric_hist, key=lambda sv: sv[1])
            line += f", max {best:.6g} at step {best_step}"
        lines.append(line)
    if "energy/kwh_to_target" in m:
        lines.append(f"to target  {_kwh(m['energy/kwh_to_target'])}")
    lines.append(f"power from {power_source}")
    if estimated:
        lines.append(f"* includes estimated domains: {', '.join(sorted(estimated))}")
    if tags.get("energy.degraded"):
        lines.append(f"degraded   {tags['energy.degraded']}")
    return "\n".join(lines) + "\n"


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``report`` to an argparse subparsers object (sets ``func``)."""
    p = subparsers.add_parser(
        "report",
        help="chart and summary of one run's energy",
        description="Writes report.png (power per domain, cumulative kWh, metric over steps) "
        "and summary.txt.",
    )
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="output folder (default: ./wattlog-report-<run>)"
    )
    p.add_argument("--metric", default=None, help="objective metric key to plot, e.g. val_acc")
    p.add_argument("--log", action="store_true", help="also log the PNG to the run as energy/report.png")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cli_report)


def cli_report(args: argparse.Namespace) -> int:
    """``wattlog report``: writes the files, prints the summary and the paths."""
    from wattlog.compare import resolve_tracking_uri, probe_tracking, run_cli

    uri = resolve_tracking_uri(args.tracking_uri)

    def body() -> int:
        probe_tracking(uri)
        rep = build_report(args.run_id, args.out, args.metric, uri, args.log)
        sys.stdout.write(rep.summary)
        print(f"wrote {rep.png_path} and {rep.summary_path}", file=sys.stderr)
        if rep.logged:
            print(f"logged {rep.png_path.name} to run {rep.run_id} as energy/report.png", file=sys.stderr)
        return 0

    return run_cli(body, uri)
