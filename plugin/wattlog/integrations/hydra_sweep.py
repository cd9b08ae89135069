"""``EnergySweepCallback``: a Hydra multirun becomes one parent MLflow run holding the sweep's
accuracy-vs-energy Pareto front.

Imports Hydra's callback base only; mlflow and matplotlib are imported when a sweep starts/ends.
"""

from __future__ import annotations

import atexit
import csv
import json
import math
import os
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from wattlog.errors import ConfigError, SinkError, WattlogWarning, degrade
from wattlog.pareto import pareto_mask

SWEEP_FILE = ".wattlog_sweep.json"
SWEEP_CALLBACK_TARGET = "wattlog.integrations.hydra.EnergySweepCallback"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ENERGY_KEY = "energy/total_kwh"
SUMMARY_METRICS = (
    "energy/total_kwh",
    "energy/emissions_g",
    "energy/j_per_sample",
    "energy/test_j_per_sample",
)
_PARAM_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def absolute_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (jobs may run in another cwd); others unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        rel = uri[len(prefix) :]
        if rel and rel != ":memory:":
            return prefix + str(Path(rel).resolve())
    return uri


def overrides_as_params(overrides: list[str]) -> dict[str, str]:
    """``["+a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``; keys made valid MLflow param names."""
    params: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep:
            params[_PARAM_KEY_BAD.sub("_", key.lstrip("+~"))] = value[:6000]
    return params


def read_sweep_file(path: Path) -> dict[str, Any] | None:
    """The sweep record written by :meth:`EnergySweepCallback.on_multirun_start`, or None if absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    info = json.loads(text)
    if not isinstance(info, dict) or "parent_run_id" not in info:
        raise ValueError(f"{path} is not a wattlog sweep file")
    return info


class EnergySweepCallback(Callback):
    """Hydra callback: opens a parent MLflow run per multirun and summarises its children's energy.

    Enable with ``hydra/callbacks=energy_sweep`` (the packaged config) or in ``hydra.callbacks``.
    Jobs join the sweep by creating their run with
    :func:`wattlog.integrations.hydra.make_mlflow_logger` (or ``mlflow_run_kwargs``), which reads
    ``<hydra.sweep.dir>/.wattlog_sweep.json``.

    Logged to the parent run:
        - params ``sweep.dir``, ``sweep.overrides``, ``sweep.metric``, ``sweep.mode`` and one param per
          sweep override (``model.lr`` = ``0.1,0.01``);
        - tags ``wattlog.sweep_id``, ``wattlog.role=sweep``, ``wattlog.best_by_energy``,
          ``wattlog.best_by_metric`` (child run ids);
        - metrics ``sweep/n_runs``, ``sweep/n_pareto``, ``sweep/total_kwh``, ``sweep/emissions_g``;
        - artifacts ``sweep/summary.csv`` (one row per child: run, overrides, ``energy/total_kwh``,
          ``energy/emissions_g``, ``energy/j_per_sample``, ``energy/test_j_per_sample``, the metric,
          ``on_front``), ``sweep/pareto.csv`` (the front, by ascending energy), ``sweep/pareto.png``.

    Failures warn (Hydra would turn a raised error into a warning anyway); under
    ``WATTLOG_STRICT=1`` they raise ``SinkError``. When a failed job aborts the multirun (Hydra then
    skips ``on_multirun_end``), the parent is summarised and ended as FAILED at interpreter exit.

    Args:
        experiment_name: MLflow experiment of the parent and of every job.
        tracking_uri: MLflow tracking URI; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
        metric: the objective metric the jobs log (e.g. ``val_acc``).
        mode: ``max`` when a larger metric is better, ``min`` when smaller is.
        run_name: name of the parent run; default ``sweep <sweep dir name>``.
    """

    def __init__(
        self,
        experiment_name: str = "Default",
        tracking_uri: str | None = None,
        metric: str = "val_loss",
        mode: str = "min",
        run_name: str | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ConfigError("hydra.callbacks.energy_sweep.mode", mode, ("max", "min"))
        if not metric:
            raise ConfigError(
                "hydra.callbacks.energy_sweep.metric", metric, "a metric name such as 'val_acc'"
            )
        self.experiment_name = str(experiment_name)
        self.tracking_uri = absolute_tracking_uri(
            tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        )
        self.metric = str(metric)
        self.mode = mode
        self.run_name = run_name
        self.parent_run_id: str | None = None
        self.sweep_dir: Path | None = None
        self._ended = False

    # ------------------------------------------------------------------ Hydra hooks

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the parent run and write ``<sweep dir>/.wattlog_sweep.json`` for the jobs."""
        try:
            self._start(config)
        except Exception as exc:  # noqa: BLE001 - failure policy: warn, or raise when strict
            degrade(f"could not open the sweep's parent MLflow run: {exc}", exc, error=SinkError)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Read the children back, log the summary and Pareto front to the parent, end it."""
        self._ended = True
        atexit.unregister(self._at_exit)
        try:
            self._finish(config)
        except Exception as exc:  # noqa: BLE001 - failure policy: warn, or raise when strict
            degrade(f"could not summarise the sweep into MLflow: {exc}", exc, error=SinkError)

    def _at_exit(self) -> None:
        """A job failed and Hydra aborted the sweep before ``on_multirun_end``: summarise what ran
        and end the parent run as FAILED instead of leaving it RUNNING."""
        if self._ended or self.parent_run_id is None:
            return
        self._ended = True
        try:
            if self._client().get_run(self.parent_run_id).info.status != "RUNNING":
                return  # ended by another callback instance
            self._finish(None, status="FAILED")
        except Exception as exc:  # noqa: BLE001 - at interpreter exit a warning is all we can do
            message = f"wattlog: could not end the sweep's parent run: {exc}"
            warnings.warn(message, WattlogWarning, stacklevel=1)

    # ------------------------------------------------------------------ internals

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _start(self, config: DictConfig) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_absolute():
            cwd = OmegaConf.select(config, "hydra.runtime.cwd", default=None) or os.getcwd()
            sweep_dir = Path(str(cwd)) / sweep_dir
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.sweep_dir = sweep_dir
        overrides = [str(o) for o in config.hydra.overrides.task]
        client = self._client()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = client.create_experiment(self.experiment_name)
        sweep_id = uuid.uuid4().hex[:16]
        run = client.create_run(
            experiment_id,
            run_name=self.run_name or f"sweep {sweep_dir.name}",
            tags={
                "wattlog.role": "sweep",
                "wattlog.sweep_id": sweep_id,
                "wattlog.sweep_dir": str(sweep_dir),
                "wattlog.overrides": json.dumps(overrides)[:5000],
            },
        )
        self.parent_run_id = run.info.run_id
        atexit.register(self._at_exit)
        from mlflow.entities import Param

        params = {
            "sweep.dir": str(sweep_dir),
            "sweep.overrides": " ".join(overrides),
            "sweep.metric": self.metric,
            "sweep.mode": self.mode,
        }
        for key, value in overrides_as_params(overrides).items():
            params.setdefault(key, value)
        client.log_batch(self.parent_run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        record = {
            "parent_run_id": self.parent_run_id,
            "sweep_id": sweep_id,
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.experiment_name,
            "experiment_id": experiment_id,
            "metric": self.metric,
            "mode": self.mode,
        }
        tmp = sweep_dir / (SWEEP_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
        tmp.replace(sweep_dir / SWEEP_FILE)

    def _finish(self, config: DictConfig | None, status: str = "FINISHED") -> None:
        if self.parent_run_id is None:  # e.g. a callback instance rebuilt in another process
            assert config is not None
            sweep_dir = Path(str(config.hydra.sweep.dir))
            info = read_sweep_file(sweep_dir / SWEEP_FILE)
            if info is None:
                raise SinkError(f"no parent run: {sweep_dir / SWEEP_FILE} is missing")
            self.parent_run_id, self.sweep_dir = info["parent_run_id"], sweep_dir
        client = self._client()
        final_status, status = status, "FAILED"
        try:
            parent = client.get_run(self.parent_run_id)
            children = _search_children(client, parent.info.experiment_id, self.parent_run_id)
            rows = summary_rows(children, self.metric)
            mark_front(rows, self.metric, self.mode)
            out_dir = (self.sweep_dir or Path(".")) / "wattlog"
            out_dir.mkdir(parents=True, exist_ok=True)
            front = sorted((r for r in rows if r["on_front"]), key=lambda r: r[ENERGY_KEY])
            write_csv(rows, out_dir / "summary.csv")
            write_csv(front, out_dir / "pareto.csv")
            for name in ("summary.csv", "pareto.csv"):
                client.log_artifact(self.parent_run_id, str(out_dir / name), artifact_path="sweep")
            self._log_bests(client, rows)
            status = final_status
            try:
                _plot_pareto(rows, self.metric, self.mode, out_dir / "pareto.png")
                client.log_artifact(self.parent_run_id, str(out_dir / "pareto.png"), artifact_path="sweep")
            except Exception as exc:  # noqa: BLE001 - the tables are logged; the chart is optional
                degrade(f"could not draw sweep/pareto.png: {exc}", exc, error=SinkError)
        finally:
            client.set_terminated(self.parent_run_id, status=status)

    def _log_bests(self, client: Any, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, RunTag

        tags = []
        by_energy = best_run(rows, ENERGY_KEY, "min")
        by_metric = best_run(rows, self.metric, self.mode)
        if by_energy is not None:
            tags.append(RunTag("wattlog.best_by_energy", by_energy))
        if by_metric is not None:
            tags.append(RunTag("wattlog.best_by_metric", by_metric))
        values = {
            "sweep/n_runs": float(len(rows)),
            "sweep/n_pareto": float(sum(bool(r["on_front"]) for r in rows)),
            "sweep/total_kwh": _nansum(r["energy/total_kwh"] for r in rows),
            "sweep/emissions_g": _nansum(r["energy/emissions_g"] for r in rows),
        }
        now_ms = int(time.time() * 1000)
        metrics = [Metric(k, v, now_ms, 0) for k, v in values.items()]
        client.log_batch(self.parent_run_id, metrics=metrics, tags=tags)


# ---------------------------------------------------------------------- summary (pure functions)


def _search_children(client: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every run tagged ``mlflow.parentRunId = parent_run_id``, oldest first."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _nan(value: Any) -> float:
    return float(value) if value is not None else math.nan


def _nansum(values: Any) -> float:
    return float(sum(v for v in values if isinstance(v, float) and math.isfinite(v)))


def summary_rows(runs: list[Any], metric: str) -> list[dict[str, Any]]:
    """One dict per child run: ids, status, overrides (joined and one column per key), energy, metric."""
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        try:
            overrides = json.loads(tags.get("wattlog.overrides", "[]"))
        except ValueError:
            overrides = []
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "job_num": tags.get("wattlog.job_num", ""),
            "overrides": " ".join(overrides),
            "energy.estimated": tags.get("energy.estimated", ""),
        }
        for item in overrides:
            key, sep, value = item.partition("=")
            if sep:
                row[key.lstrip("+~")] = value
        for key in SUMMARY_METRICS:
            row[key] = _nan(metrics.get(key))
        row[metric] = _nan(metrics.get(metric))
        rows.append(row)
    return rows


def mark_front(rows: list[dict[str, Any]], metric: str, mode: str) -> None:
    """Set ``row["on_front"]``: on the Pareto front of (best ``metric``, least ``energy/total_kwh``)."""
    mask = pareto_mask([r[metric] for r in rows], [r[ENERGY_KEY] for r in rows], mode)
    for row, on_front in zip(rows, mask):
        row["on_front"] = on_front


def best_run(rows: list[dict[str, Any]], key: str, mode: str) -> str | None:
    """Run id of the row with the best finite ``key`` (``min`` or ``max``); None when there is none."""
    valid = [r for r in rows if math.isfinite(r[key])]
    if not valid:
        return None
    pick = min if mode == "min" else max
    return str(pick(valid, key=lambda r: r[key])["run_id"])


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows with the union of their keys as columns (first-seen order); NaN as empty."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or ["run_id"])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            )


def _plot_pareto(rows: list[dict[str, Any]], metric: str, mode: str, path: Path) -> None:
    """``wattlog.plots.plot_pareto`` of the summary rows (front as in ``on_front``)."""
    import pandas as pd

    from wattlog.plots import plot_pareto

    est = [str(r.get("energy.estimated", "")) for r in rows]
    df = pd.DataFrame(
        {
            "label": [f"#{r['job_num']}" if r["job_num"] != "" else str(r["run_name"]) for r in rows],
            ENERGY_KEY: [r[ENERGY_KEY] for r in rows],
            metric: [r[metric] for r in rows],
            "pareto": [bool(r["on_front"]) for r in rows],
            "estimated": ["" if e in ("", "none") else e for e in est],
        }
    )
    plot_pareto(
        df, metric, mode, path, energy_col=ENERGY_KEY, label_col="label", title="sweep: metric vs energy"
    )
