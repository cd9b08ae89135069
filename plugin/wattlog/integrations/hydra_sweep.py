"""``EnergySweepCallback``: a Hydra multirun becomes one parent MLflow run holding the sweep's
accuracy-vs-energy Pareto front.

Imports Hydra's callback base only; mlflow and matplotlib are imported when a sweep starts/ends.
Jobs link their runs to the parent themselves, whatever built their ``MLFlowLogger``: an
``EnergyMonitor`` tags its run with :func:`sweep_link_tags` (``mlflow.parentRunId``, ``energy.sweep_id``),
read from the sweep context the callback writes (see :mod:`wattlog.integrations.sweep_context`).
"""

from __future__ import annotations

import atexit
import csv
import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from wattlog import keys, payback
from wattlog.errors import ConfigError, SinkError, WattlogWarning, degrade
from wattlog.integrations.sweep_context import (
    LEGACY_T_JOB_NUM,
    LEGACY_T_OVERRIDES,
    SWEEP_CALLBACK_TARGETS,
    SWEEP_FILE,
    SWEEP_FORMAT,
    T_OVERRIDES,
    T_PARENT_RUN_ID,
    T_ROLE,
    T_SWEEP_ID,
    T_SWEEP_JOB,
    override_params,
    read_job_records,
    read_sweep_file,
    run_name,
    sweep_link_tags,
    sweep_run_name,
    write_job_record,
    write_private_json,
)
from wattlog.pareto import pareto_mask
from wattlog.redact import redact_overrides, redact_text, redact_uri

SWEEP_CALLBACK_TARGET = SWEEP_CALLBACK_TARGETS[0]
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ENERGY_KEY = keys.TOTAL_J
SUMMARY_METRICS = (
    keys.TOTAL_J,
    keys.EMISSIONS_G,
    keys.stage_j_per_sample("train"),
    keys.stage_j_per_sample("test"),
)
MAX_UNLINKED_WARNINGS = 20

__all__ = [
    "SWEEP_FILE",
    "EnergySweepCallback",
    "absolute_tracking_uri",
    "overrides_as_params",
    "override_params",
    "read_sweep_file",
    "run_name",
    "summary_rows",
    "sweep_link_tags",
    "sweep_run_name",
]


def absolute_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (jobs may run in another cwd); others unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        rel = uri[len(prefix) :]
        if rel and rel != ":memory:":
            return prefix + str(Path(rel).resolve())
    return uri


def overrides_as_params(overrides: list[str]) -> dict[str, str]:
    """``["+a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}`` (redacted; keys made valid MLflow param names).

    Prefer :func:`override_params`, whose ``override.`` prefix cannot collide with wattlog's params.
    """
    return override_params(overrides, prefix="")


class EnergySweepCallback(Callback):
    """Hydra callback: opens a parent MLflow run per multirun and summarises its children's energy.

    Enable with ``hydra/callbacks=energy_sweep`` (the packaged config) or in ``hydra.callbacks``.
    Each job's run joins the sweep by itself: its ``EnergyMonitor`` tags the run it logs into (whatever
    built the ``MLFlowLogger``: ``hydra.utils.instantiate``, the app, or
    :func:`wattlog.integrations.hydra.make_mlflow_logger`) with :func:`sweep_link_tags`, read from
    ``<hydra.sweep.dir>/.wattlog/sweep.json``. At the end the children are found by
    ``mlflow.parentRunId`` and by ``energy.sweep_id`` (in any experiment of the store), and a warning
    names each job (recorded in ``.wattlog/jobs/``) whose run is not linked.

    Logged to the parent run (every value redacted: no credential from a URI or an override):
        - params ``sweep.dir``, ``sweep.overrides``, ``sweep.metric``, ``sweep.mode`` and one param per
          sweep override under ``override.`` (``override.model.lr`` = ``0.1,0.01``);
        - tags ``wattlog.role=sweep``, ``energy.sweep_id``, ``energy.overrides``,
          ``wattlog.best_by_energy``, ``wattlog.best_by_metric`` (child run ids);
        - metrics ``sweep/n_runs``, ``sweep/n_pareto``, ``sweep/n_unlinked`` (jobs without a linked
          run), ``sweep/total_j``, ``sweep/emissions_g``;
        - artifacts ``sweep/summary.csv`` (one row per child: run, overrides, ``energy/total_j``,
          ``energy/emissions_g``, ``energy/j_per_sample``, ``energy/test_j_per_sample``, the metric,
          ``on_front``), ``sweep/pareto.csv`` (the front, by ascending energy), ``sweep/pareto.png``.
          Runs of older wattlog versions that logged ``energy/total_kwh`` are read in joules.

    Failures warn (Hydra would turn a raised error into a warning anyway); under
    ``WATTLOG_STRICT=1`` they raise ``SinkError``. When a failed job aborts the multirun (Hydra then
    skips ``on_multirun_end``), the parent is summarised and ended as FAILED at interpreter exit.

    Args:
        experiment_name: MLflow experiment of the parent (and of jobs using ``make_mlflow_logger``).
        tracking_uri: MLflow tracking URI; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
        metric: the objective metric the jobs log (e.g. ``val_acc``).
        mode: ``max`` when a larger metric is better, ``min`` when smaller is.
        run_name: name of the parent run; default ``sweep <sweep dir name>``.
        payback_baseline: overrides that mark the baseline jobs of a compression sweep, e.g.
            ``compress=none``: then every child gets ``energy/payback_samples`` against the baselines'
            mean ``energy/test_j_per_sample`` (or the tag ``energy.payback=never``/``baseline``), the
            summary gains ``energy/make_j``, ``saved_j_per_sample``, ``energy/payback_samples``,
            ``payback`` and ``delta_<metric>`` and is ranked by payback (baseline first), the parent gets
            ``wattlog.best_by_payback`` and the chart labels each point with its payback.
    """

    def __init__(
        self,
        experiment_name: str = "Default",
        tracking_uri: str | None = None,
        metric: str = "val_loss",
        mode: str = "min",
        run_name: str | None = None,
        payback_baseline: str | None = None,
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
        self.payback_baseline = str(payback_baseline or "").split()
        if any("=" not in item for item in self.payback_baseline):
            raise ConfigError("hydra.callbacks.energy_sweep.payback_baseline", payback_baseline,
                              "space-separated overrides of the baseline jobs, e.g. 'compress=none'")
        self.parent_run_id: str | None = None
        self.sweep_id: str | None = None
        self.sweep_dir: Path | None = None
        self._ended = False

    # ------------------------------------------------------------------ Hydra hooks

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the parent run and write ``<sweep dir>/.wattlog/sweep.json`` for the jobs."""
        try:
            self._start(config)
        except Exception as exc:  # noqa: BLE001 - failure policy: warn, or raise when strict
            degrade(f"could not open the sweep's parent MLflow run: {redact_text(str(exc))}", exc, error=SinkError)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In the job's process: record the job (``.wattlog/jobs/<num>.json``), so an unlinked one is named."""
        self._record_job(config, None)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        """In the job's process: record how the job ended."""
        self._record_job(config, job_return)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Read the children back, log the summary and Pareto front to the parent, end it."""
        self._ended = True
        atexit.unregister(self._at_exit)
        try:
            self._finish(config)
        except Exception as exc:  # noqa: BLE001 - failure policy: warn, or raise when strict
            degrade(f"could not summarise the sweep into MLflow: {redact_text(str(exc))}", exc, error=SinkError)

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
            message = f"wattlog: could not end the sweep's parent run: {redact_text(str(exc))}"
            warnings.warn(message, WattlogWarning, stacklevel=1)

    # ------------------------------------------------------------------ internals

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _record_job(self, config: DictConfig, job_return: Any) -> None:
        try:
            hc = OmegaConf.select(config, "hydra", default=None)
            if hc is None or OmegaConf.select(hc, "mode", default=None) is None:
                return
            if str(getattr(hc.mode, "name", hc.mode)) != "MULTIRUN":
                return
            num = OmegaConf.select(hc, "job.num", default=None)
            overrides = [str(o) for o in (OmegaConf.select(hc, "overrides.task", default=None) or [])]
            status = "running" if job_return is None else str(getattr(job_return.status, "name", job_return.status))
            write_job_record(_abs_sweep_dir(config), num, overrides, status)
        except Exception as exc:  # noqa: BLE001 - a missing job record only weakens the unlinked-job warning
            degrade(f"could not record the sweep job: {redact_text(str(exc))}", exc, error=SinkError)

    def _start(self, config: DictConfig) -> None:
        sweep_dir = _abs_sweep_dir(config)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.sweep_dir = sweep_dir
        overrides = redact_overrides(str(o) for o in config.hydra.overrides.task)
        client = self._client()
        experiment_id = _experiment_id(client, self.experiment_name)
        sweep_id = uuid.uuid4().hex[:16]
        run = client.create_run(
            experiment_id,
            run_name=redact_text(self.run_name or f"sweep {sweep_dir.name}"),
            tags={
                T_ROLE: "sweep",
                T_SWEEP_ID: sweep_id,
                "energy.sweep_dir": str(sweep_dir),
                T_OVERRIDES: json.dumps(overrides)[:5000],
            },
        )
        self.parent_run_id, self.sweep_id = run.info.run_id, sweep_id
        atexit.register(self._at_exit)
        from mlflow.entities import Param

        params = {
            "sweep.dir": str(sweep_dir),
            "sweep.overrides": " ".join(overrides),
            "sweep.metric": self.metric,
            "sweep.mode": self.mode,
            **override_params(overrides),
        }
        client.log_batch(self.parent_run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        shown_uri = redact_uri(self.tracking_uri)
        record = {
            "wattlog_sweep": SWEEP_FORMAT,
            "parent_run_id": self.parent_run_id,
            "sweep_id": sweep_id,
            "tracking_uri": shown_uri,  # no credentials, ever: jobs read their own environment
            "tracking_uri_redacted": shown_uri != self.tracking_uri,
            "experiment_name": self.experiment_name,
            "experiment_id": experiment_id,
            "metric": self.metric,
            "mode": self.mode,
            "overrides": overrides,
        }
        write_private_json(sweep_dir / SWEEP_FILE, record)

    def _finish(self, config: DictConfig | None, status: str = "FINISHED") -> None:
        if self.parent_run_id is None:  # e.g. a callback instance rebuilt in another process
            assert config is not None
            sweep_dir = _abs_sweep_dir(config)
            info = read_sweep_file(sweep_dir / SWEEP_FILE)
            if info is None:
                raise SinkError(f"no parent run: {sweep_dir / SWEEP_FILE} is missing")
            self.parent_run_id, self.sweep_dir = info["parent_run_id"], sweep_dir
            self.sweep_id = info.get("sweep_id")
        client = self._client()
        final_status, status = status, "FAILED"
        try:
            parent = client.get_run(self.parent_run_id)
            self.sweep_id = self.sweep_id or parent.data.tags.get(T_SWEEP_ID)
            jobs = read_job_records(self.sweep_dir) if self.sweep_dir is not None else []
            children = _search_children(client, parent.info.experiment_id, self.parent_run_id, self.sweep_id,
                                        n_jobs=len(jobs))
            unlinked = _unlinked_jobs(jobs, children)
            rows = summary_rows(children, self.metric)
            mark_front(rows, self.metric, self.mode)
            if self.payback_baseline:
                self._add_payback(client, children, rows)
            out_dir = (self.sweep_dir or Path(".")) / "wattlog"
            out_dir.mkdir(parents=True, exist_ok=True)
            front = sorted((r for r in rows if r["on_front"]), key=lambda r: r[ENERGY_KEY])
            write_csv(rows, out_dir / "summary.csv")
            write_csv(front, out_dir / "pareto.csv")
            for name in ("summary.csv", "pareto.csv"):
                client.log_artifact(self.parent_run_id, str(out_dir / name), artifact_path="sweep")
            self._log_bests(client, rows, len(unlinked))
            _warn_unlinked(unlinked)
            status = final_status
            try:
                _plot_pareto(rows, self.metric, self.mode, out_dir / "pareto.png")
                client.log_artifact(self.parent_run_id, str(out_dir / "pareto.png"), artifact_path="sweep")
            except Exception as exc:  # noqa: BLE001 - the tables are logged; the chart is optional
                degrade(f"could not draw sweep/pareto.png: {exc}", exc, error=SinkError)
        finally:
            client.set_terminated(self.parent_run_id, status=status)

    def _add_payback(self, client: Any, children: list[Any], rows: list[dict[str, Any]]) -> None:
        """Payback columns and ranking of the summary (:func:`wattlog.payback.add_payback`), and each
        child's ``energy/payback_samples`` or ``energy.payback`` tag."""
        from mlflow.entities import Metric, RunTag

        make = {run.info.run_id: payback.make_energy_j(run.data.metrics) for run in children}
        for row in rows:
            row[keys.MAKE_J] = make[row["run_id"]]
        wanted = [item.split("=", 1) for item in self.payback_baseline]
        payback.add_payback(rows, lambda r: all(str(r.get(k, "")) == v for k, v in wanted), self.metric)
        now_ms = int(time.time() * 1000)
        for row in rows:
            values, tags = payback.mlflow_fields(row[keys.PAYBACK_SAMPLES], is_baseline=row["baseline"])
            if values or tags:
                client.log_batch(row["run_id"], metrics=[Metric(k, v, now_ms, 0) for k, v in values.items()],
                                 tags=[RunTag(k, v) for k, v in tags.items()])

    def _log_bests(self, client: Any, rows: list[dict[str, Any]], n_unlinked: int) -> None:
        from mlflow.entities import Metric, RunTag

        tags = []
        by_energy = best_run(rows, ENERGY_KEY, "min")
        by_metric = best_run(rows, self.metric, self.mode)
        if by_energy is not None:
            tags.append(RunTag("wattlog.best_by_energy", by_energy))
        if by_metric is not None:
            tags.append(RunTag("wattlog.best_by_metric", by_metric))
        by_payback = best_run(rows, keys.PAYBACK_SAMPLES, "min") if self.payback_baseline else None
        if by_payback is not None:
            tags.append(RunTag("wattlog.best_by_payback", by_payback))
        values = {
            "sweep/n_runs": float(len(rows)),
            "sweep/n_pareto": float(sum(bool(r["on_front"]) for r in rows)),
            "sweep/n_unlinked": float(n_unlinked),
            "sweep/total_j": _nansum(r[keys.TOTAL_J] for r in rows),
            "sweep/emissions_g": _nansum(r[keys.EMISSIONS_G] for r in rows),
        }
        now_ms = int(time.time() * 1000)
        metrics = [Metric(k, v, now_ms, 0) for k, v in values.items()]
        client.log_batch(self.parent_run_id, metrics=metrics, tags=tags)


def _experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing; safe when several sweeps create it at once."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:  # another process created it between the two calls (unique name)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _abs_sweep_dir(config: DictConfig) -> Path:
    sweep_dir = Path(str(config.hydra.sweep.dir))
    if not sweep_dir.is_absolute():
        cwd = OmegaConf.select(config, "hydra.runtime.cwd", default=None) or os.getcwd()
        sweep_dir = Path(str(cwd)) / sweep_dir
    return sweep_dir


# ---------------------------------------------------------------------- children


def _search(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _search_children(
    client: Any, experiment_id: str, parent_run_id: str, sweep_id: str | None = None, n_jobs: int = 0
) -> list[Any]:
    """Every run of the sweep, oldest first: tagged ``mlflow.parentRunId = parent_run_id`` or
    ``energy.sweep_id = sweep_id`` (the parent itself excluded). Runs in other experiments are searched
    too when the parent's experiment holds fewer runs than the sweep recorded jobs."""
    found: dict[str, Any] = {}
    filters = [f"tags.`{T_PARENT_RUN_ID}` = '{parent_run_id}'"]
    if sweep_id:
        filters.append(f"tags.`{T_SWEEP_ID}` = '{sweep_id}'")
    experiment_ids = [experiment_id]
    for filter_string in filters:
        for run in _search(client, experiment_ids, filter_string):
            found.setdefault(run.info.run_id, run)
    found.pop(parent_run_id, None)
    if sweep_id and len(found) < n_jobs:  # a job whose logger used another experiment of the same store
        others = [e.experiment_id for e in client.search_experiments() if e.experiment_id != experiment_id]
        for i in range(0, len(others), 100):
            for run in _search(client, others[i : i + 100], filters[1]):
                found.setdefault(run.info.run_id, run)
    return sorted(found.values(), key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _job_num(run: Any) -> str:
    tags = run.data.tags
    return str(tags.get(T_SWEEP_JOB, tags.get(LEGACY_T_JOB_NUM, "")))


def _unlinked_jobs(jobs: list[dict[str, Any]], children: list[Any]) -> list[dict[str, Any]]:
    linked = {_job_num(c) for c in children}
    return [j for j in jobs if str(j["num"]) not in linked]


def _warn_unlinked(unlinked: list[dict[str, Any]]) -> None:
    for job in unlinked[:MAX_UNLINKED_WARNINGS]:
        overrides = " ".join(redact_overrides(job.get("overrides") or [])) or "no overrides"
        failed = " (the job failed)" if job.get("status") == "FAILED" else ""
        warnings.warn(
            f"wattlog: sweep job #{job['num']} ({overrides}){failed} has no MLflow run linked to the sweep: "
            "it is not in the summary or the Pareto front. Its run needs an EnergyMonitor (energy is not "
            "'off') logging to the sweep's tracking server, or a logger from make_mlflow_logger.",
            WattlogWarning,
            stacklevel=3,
        )
    if len(unlinked) > MAX_UNLINKED_WARNINGS:
        warnings.warn(f"wattlog: {len(unlinked) - MAX_UNLINKED_WARNINGS} more sweep jobs have no linked run",
                      WattlogWarning, stacklevel=3)


# ---------------------------------------------------------------------- summary (pure functions)


def _nan(value: Any) -> float:
    return float(value) if value is not None else math.nan


def _nansum(values: Any) -> float:
    return float(sum(v for v in values if isinstance(v, float) and math.isfinite(v)))


def summary_rows(runs: list[Any], metric: str) -> list[dict[str, Any]]:
    """One dict per child run: ids, status, overrides (joined and one column per key), energy, metric.

    Energies are joules (:data:`wattlog.keys.TOTAL_J` ...), read from ``energy/total_kwh`` for runs of
    older wattlog versions; overrides and run names are redacted.
    """
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        try:
            overrides = json.loads(tags.get(T_OVERRIDES, tags.get(LEGACY_T_OVERRIDES, "[]")))
            overrides = redact_overrides(str(o) for o in overrides) if isinstance(overrides, list) else []
        except ValueError:
            overrides = []
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run_name": redact_text(run.info.run_name or ""),
            "status": run.info.status,
            "job_num": _job_num(run),
            "overrides": " ".join(overrides),
            "energy.estimated": tags.get(keys.T_ESTIMATED, ""),
        }
        for item in overrides:
            key, sep, value = item.partition("=")
            if sep:
                row.setdefault(key.lstrip("+~"), value)
        for key in SUMMARY_METRICS:
            value = keys.read_j(metrics, key) if key.endswith("_j") else metrics.get(key)
            row[key] = _nan(value)
        row[metric] = _nan(metrics.get(metric))
        rows.append(row)
    return rows


def mark_front(rows: list[dict[str, Any]], metric: str, mode: str) -> None:
    """Set ``row["on_front"]``: on the Pareto front of (best ``metric``, least ``energy/total_j``)."""
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
            "label": [(str(r["run_name"]) or f"#{r['job_num']}") + (f" (payback {r['payback']})" if "payback" in r
                                                                     else "") for r in rows],
            "energy_j": [r[ENERGY_KEY] for r in rows],
            metric: [r[metric] for r in rows],
            "pareto": [bool(r["on_front"]) for r in rows],
            "estimated": ["" if e in ("", "none") else e for e in est],
        }
    )
    plot_pareto(
        df, metric, mode, path, energy_col="energy_j", label_col="label", title="sweep: metric vs energy"
    )

