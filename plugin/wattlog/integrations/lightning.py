"""EnergyMonitor: the Lightning callback that logs per-step power, energy and CO2e into MLflow.

Works with ``lightning.pytorch`` and ``pytorch_lightning`` (the class derives from the
``Callback`` of each namespace that is installed). The callback is only wiring: the meter
(``wattlog.meter``) measures, the ledger (``wattlog.ledger``) does the arithmetic and the sink
(``wattlog.sinks.mlflow``) writes off the training thread.

Logged keys (MLflow run of the trainer's ``MLFlowLogger``, else the active run):

- per train step, every ``log_every_n_steps`` (``step=trainer.global_step``):
  ``energy/step_j``, ``energy/power_w``, ``energy/gpu_power_w``, ``energy/total_kwh``,
  ``energy/emissions_g``; with ``per_device=True`` also ``energy/gpu{i}_power_w``.
- at the end of fit/validate/test/predict: ``energy/{gpu,cpu,ram}_kwh``,
  ``energy/{train,val,test,predict}_kwh``, ``energy/j_per_sample``,
  ``energy/{test,predict}_j_per_sample``, ``energy/avg_power_w``, ``energy/duration_s``,
  ``energy/kwh_to_target`` (when ``target`` was reached); with ``idle_baseline_s`` also
  ``energy/idle_power_w`` and ``energy/dynamic_kwh``.
- params ``energy.gpu_model``, ``energy.gpu_count``, ``energy.gpu_method``, ``energy.cpu_method``,
  ``energy.ram_method``, ``energy.carbon_intensity_g_per_kwh``, ``energy.carbon_source``, ``energy.pue``;
  tags ``energy.estimated`` and, if anything degraded, ``energy.degraded``.
- artifacts ``energy/trace.csv`` and ``energy/power.png``.
- run attempts (see below): tags ``energy.attempts`` and ``energy.attempt.{n}``; summary
  ``energy/rerun_kwh`` once the run was resumed; tag ``energy.partial`` when other ranks' energy
  could not be collected (a rank died or stalled).

Run attempts (kill and resume). Every ``fit`` start is an *attempt* with a fresh uuid; the
checkpointed state lists the attempts, so a run resumed from ``last.ckpt`` into the same MLflow run
(``MLFlowLogger(run_id=...)``) is attempt 2, 3, ... ``energy/total_kwh`` continues from the
checkpoint's total. The steps after the checkpoint that a killed attempt had logged are re-run;
MLflow cannot delete points, so the history keeps the *first* value logged for each step: the
resumed attempt does not log per-step keys for steps up to the killed attempt's last logged step
(found in the spool and the run's history), and the killed attempt's spooled points are delivered
as they are (by the resumed sink, which reuses the spool, or by ``wattlog sync``). Each (key, step)
thus has exactly one point. The energy the killed attempt spent after the checkpoint (as far as it
logged it) is not in ``energy/total_kwh``; it is reported as ``energy/rerun_kwh``.

Distributed collectives go through a dedicated gloo group with a timeout
(``collective_timeout_s``); on a timeout or error wattlog stops collecting, warns once, tags
``energy.partial`` and logs rank 0's own measurements from then on: a dead or stalled rank never
makes the other ranks hang in a wattlog collective.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from wattlog.errors import ConfigError, NoRunError, SourceUnavailable, WattlogError, degrade, strict_mode
from wattlog.ledger import EnergyLedger, StepAggregator, StepLabel, StepRecord

REPORT_INTERVAL_S = 0.5
"""Single-process runs: how often the reporter thread turns measured steps into MLflow points."""


def _callback_bases() -> tuple[type, ...]:
    bases: list[type] = []
    try:
        from lightning.pytorch import Callback as LCallback

        bases.append(LCallback)
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as PLCallback

        bases.append(PLCallback)
    except ImportError:
        pass
    if not bases:
        raise ImportError("EnergyMonitor needs Lightning: pip install 'wattlog[lightning]'")
    return tuple(bases)


def default_batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dimension of the first tensor found (0 if none)."""
    stack = [batch]
    while stack:
        item = stack.pop(0)
        shape = getattr(item, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return 0


def _validate_target(target: Any) -> dict[str, Any] | None:
    if target is None:
        return None
    if isinstance(target, (list, tuple)) and len(target) in (2, 3):
        target = dict(zip(("metric", "value", "mode"), target))
    if not isinstance(target, dict) or "metric" not in target or "value" not in target:
        raise ConfigError("target", target, "None or {'metric': name, 'value': number, 'mode': 'max'|'min'}")
    mode = target.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError("target.mode", mode, ("max", "min"))
    metric, value = target["metric"], target["value"]
    if not (isinstance(metric, str) and metric.strip()):
        raise ConfigError("target.metric", metric, "the name of a logged metric, e.g. 'val_acc'")
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ConfigError("target.value", value, "a finite number")
    return {"metric": metric, "value": float(value), "mode": mode}


def _check_number(name: str, value: Any, low: float, high: float = math.inf, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low <= value <= high):
        allowed = f"a number in [{low}, {high}]" + (" or None" if allow_none else "")
        raise ConfigError(name, value, allowed)


class _EnergyMonitorImpl:
    """Log per-step GPU/CPU/RAM energy, power and CO2e of a Lightning run into MLflow.

    Args:
        gpus: ``"auto"`` (the GPUs of this process), ``"none"``, or CUDA device indices.
        cpu: ``"auto"`` (RAPL, else estimate), ``"rapl"``, ``"estimate"`` or ``"none"``.
        ram: ``"auto"`` (RAPL dram, else estimate), ``"rapl"``, ``"estimate"`` or ``"none"``.
        country, region: where the energy is drawn, for the carbon intensity (ISO3 country,
            US state, Canadian province, Nordic zone); world average when unset.
        carbon_intensity: gCO2e/kWh, overrides the lookup.
        pue: data-centre power usage effectiveness (>= 1).
        log_every_n_steps: log a point every n train steps (default: the trainer's).
        sample_interval_s: the sampler's cadence.
        sync_cuda: synchronise CUDA at logging boundaries for exact windows.
        per_device: also log ``energy/gpu{i}_power_w`` per GPU (global index in the job).
        target: ``{"metric": "val_acc", "value": 0.85, "mode": "max"}``: log the energy spent
            until the metric first reached the value as ``energy/kwh_to_target``.
        idle_baseline_s: measure idle power this long before fit; logs ``energy/dynamic_kwh``.
        progress_bar: show live ``W`` and ``kWh`` in Lightning's progress bar.
        batch_size_fn: samples in a batch (default: leading dimension of the first tensor).
        require_gpu_counter: fail unless every GPU has NVML's energy counter.
        spool_dir: where unsent points are spooled (default ``$WATTLOG_SPOOL_DIR`` or
            ``<trainer.default_root_dir>/.wattlog/spool``).
        artifacts: log ``energy/trace.csv`` and ``energy/power.png``.
        powercap_root: the powercap sysfs root (tests use a fake tree).
        collective_timeout_s: timeout of wattlog's own DDP collectives (a gloo group created at
            setup); on timeout wattlog logs rank 0's measurements only, tagged ``energy.partial``.
    """

    def __init__(
        self,
        gpus: str | Sequence[int] = "auto",
        cpu: str = "auto",
        ram: str = "auto",
        country: str | None = None,
        region: str | None = None,
        carbon_intensity: float | None = None,
        pue: float = 1.0,
        log_every_n_steps: int | None = None,
        sample_interval_s: float = 0.02,
        sync_cuda: bool = False,
        per_device: bool = False,
        target: dict[str, Any] | None = None,
        idle_baseline_s: float = 0.0,
        progress_bar: bool = True,
        batch_size_fn: Callable[[Any], int] | None = None,
        require_gpu_counter: bool = False,
        spool_dir: str | os.PathLike[str] | None = None,
        artifacts: bool = True,
        powercap_root: str = "/sys/class/powercap",
        collective_timeout_s: float = 120.0,
    ) -> None:
        from wattlog.carbon import validate_pue
        from wattlog.sources import validate_choices

        if isinstance(gpus, (list, tuple)):
            gpus = list(gpus)
        elif not isinstance(gpus, str) and hasattr(gpus, "__iter__"):  # e.g. an OmegaConf ListConfig
            gpus = list(gpus)
        validate_choices(gpus, cpu, ram)
        validate_pue(pue)
        _check_number("carbon_intensity", carbon_intensity, 0.0, allow_none=True)
        _check_number("sample_interval_s", sample_interval_s, 0.001, 10.0)
        _check_number("idle_baseline_s", idle_baseline_s, 0.0, 3600.0)
        _check_number("collective_timeout_s", collective_timeout_s, 1.0, 86400.0)
        if log_every_n_steps is not None and not (
            isinstance(log_every_n_steps, int) and not isinstance(log_every_n_steps, bool) and log_every_n_steps >= 1
        ):
            raise ConfigError("log_every_n_steps", log_every_n_steps, "None or an integer >= 1")
        for name, value in (("sync_cuda", sync_cuda), ("per_device", per_device), ("progress_bar", progress_bar),
                            ("require_gpu_counter", require_gpu_counter), ("artifacts", artifacts)):
            if not isinstance(value, bool):
                raise ConfigError(name, value, "True or False")
        for name, value in (("country", country), ("region", region)):
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ConfigError(name, value, "None or a non-empty string")
        for name, value in (("spool_dir", spool_dir), ("powercap_root", powercap_root)):
            if value is None and name == "spool_dir":
                continue
            if not (isinstance(value, (str, os.PathLike)) and os.fspath(value)):
                raise ConfigError(name, value, ("None or " if name == "spool_dir" else "") + "a non-empty path")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ConfigError("batch_size_fn", batch_size_fn, "None or a callable(batch) -> int")
        self.gpus = gpus
        self.cpu = cpu
        self.ram = ram
        self.country = country
        self.region = region
        self.carbon_intensity = carbon_intensity
        self.pue = float(pue)
        self.log_every_n_steps = log_every_n_steps
        self.sample_interval_s = float(sample_interval_s)
        self.sync_cuda = sync_cuda
        self.per_device = per_device
        self.target = _validate_target(target)
        self.idle_baseline_s = float(idle_baseline_s)
        self.progress_bar = progress_bar
        self.batch_size_fn = batch_size_fn or default_batch_size
        self.require_gpu_counter = require_gpu_counter
        self.spool_dir = spool_dir
        self.artifacts = artifacts
        self.powercap_root = powercap_root
        self.collective_timeout_s = float(collective_timeout_s)
        # run state
        self._meter: Any = None
        self._sink: Any = None
        self._ledger: EnergyLedger | None = None
        self._aggregator: StepAggregator | None = None
        self._choices: list[Any] = []
        self._intensity: Any = None
        self._loaded_state: dict[str, Any] | None = None
        self._label: StepLabel | None = None
        self._rank = 0
        self._world_size = 1
        self._cuda_marks: Any = None
        self._warned: set[str] = set()
        self._idle_power_w: float | None = None
        self._params_logged = False
        self._last_progress: dict[str, float] = {}
        self._progress_shown_s = 0.0
        self._mark_cost_s = 0.0
        self._marks = 0
        self._log_every = 1
        self._unsent: list[StepRecord] = []
        self._open_train_labels: list[StepLabel] = []
        self._tracking_uri: str | None = None
        self._run_id: str | None = None
        self._group: Any = None
        self._partial: str | None = None
        self._attempt_id = uuid.uuid4().hex
        self._resumed = False
        self._lock = threading.RLock()  # ledger, aggregator and meter drains: training thread vs reporter
        self._reporter: _Reporter | None = None
        self._other_logger_points: deque[tuple[int, dict[str, float]]] = deque()

    # -- set-up ------------------------------------------------------------------------------

    def _resolve_run(self, trainer: Any) -> tuple[str, str | None]:
        for logger in getattr(trainer, "loggers", []) or []:
            if type(logger).__name__ == "MLFlowLogger":
                return logger.run_id, getattr(logger, "_tracking_uri", None)
        import mlflow

        run = mlflow.active_run()
        if run is not None:
            return run.info.run_id, mlflow.get_tracking_uri()
        raise NoRunError(
            "EnergyMonitor found no MLflow run: add an MLFlowLogger to the Trainer "
            "(Trainer(logger=MLFlowLogger(experiment_name=..., tracking_uri='sqlite:///mlflow.db'))) "
            "or start one with mlflow.start_run() before fit."
        )

    def _gpu_selection(self, trainer: Any) -> str | list[int]:
        if self.gpus != "auto":
            return self.gpus
        root = getattr(trainer.strategy, "root_device", None)
        if root is not None and getattr(root, "type", "") == "cuda":
            return [root.index or 0]
        if root is not None and getattr(root, "type", "") != "cuda":
            return "none"  # CPU/MPS training: no GPU of ours to measure
        return "auto"

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from wattlog.carbon import lookup_intensity
        from wattlog.meter import EnergyMeter
        from wattlog.sources import select_sources

        self._log_every = self.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50) or 50)
        self._rank = int(getattr(trainer, "global_rank", 0))
        self._world_size = int(getattr(trainer, "world_size", 1))
        local_rank = int(getattr(trainer, "local_rank", 0))
        self._intensity = lookup_intensity(self.country, self.region, self.carbon_intensity)
        cpu, ram = (self.cpu, self.ram) if local_rank == 0 else ("none", "none")  # CPU/RAM once per node
        gpus = self._gpu_selection(trainer)
        if self.require_gpu_counter and gpus == "none":
            raise SourceUnavailable(
                "require_gpu_counter=True (the `nvml` config) but this trainer runs on "
                f"{getattr(trainer.strategy, 'root_device', 'CPU')}, not a CUDA GPU: train on a GPU "
                "(accelerator='gpu') or use energy=default / energy=estimate"
            )
        self._choices = select_sources(
            gpus, cpu, ram,
            require_gpu_counter=self.require_gpu_counter, powercap_root=self.powercap_root,
        )
        if self._rank == 0 and self._sink is None:
            run_id, tracking_uri = self._resolve_run(trainer)
            self._run_id, self._tracking_uri = run_id, tracking_uri
            from wattlog.sinks.mlflow import MlflowSink

            spool = self.spool_dir or os.environ.get("WATTLOG_SPOOL_DIR") or os.path.join(
                getattr(trainer, "default_root_dir", "."), ".wattlog", "spool")
            self._sink = MlflowSink(run_id, tracking_uri=tracking_uri, spool_dir=spool)
            self._sink.start()
        self._meter = EnergyMeter([c.source for c in self._choices if c.source is not None], self.sample_interval_s)
        domains = self._meter.start()
        self._drained_j: dict[str, float] = {}
        self._make_group()
        prefix = f"r{self._rank}." if self._world_size > 1 else ""
        local_kinds = {prefix + d.name: d.kind for d in domains}
        all_kinds = self._gather(local_kinds)
        kinds: dict[str, str] = {}
        gpu_order: list[str] = []
        for rank_kinds in all_kinds:
            kinds.update(rank_kinds)
            gpu_order.extend(name for name, kind in rank_kinds.items() if kind == "gpu")
        if self._ledger is None:
            self._ledger = EnergyLedger(kinds, self._intensity.g_per_kwh, self.pue, self._world_size,
                                        self.per_device, gpu_order)
            if self._loaded_state:
                self._ledger.load_state_dict(self._loaded_state)
        else:
            self._ledger.domain_kinds.update(kinds)
        self._aggregator = StepAggregator(prefix, self._rank)
        if self.idle_baseline_s > 0 and stage == "fit" and self._idle_power_w is None:
            with self._meter.window("idle") as idle:
                time.sleep(self.idle_baseline_s)
            self._idle_power_w = self._sum_gathered(idle.power_w)
        if self._world_size == 1:  # DDP drains at logging boundaries instead: the collective needs every rank
            self._reporter = _Reporter(self, trainer)
            self._reporter.start()
        if self.sync_cuda is False and self._uses_cuda(trainer):
            from wattlog.integrations.cuda_marks import CudaBoundaries

            self._cuda_marks = CudaBoundaries(self._meter)
            self._cuda_marks.start()

    @staticmethod
    def _uses_cuda(trainer: Any) -> bool:
        root = getattr(trainer.strategy, "root_device", None)
        return root is not None and getattr(root, "type", "") == "cuda"

    # -- boundaries (training thread: microseconds) ------------------------------------------

    def _mark(self, label: StepLabel | None) -> None:
        t0 = time.perf_counter()
        self._label = label
        if self._cuda_marks is not None:
            self._cuda_marks.mark(label)
        else:
            self._meter.mark(label, t0)
        self._mark_cost_s += time.perf_counter() - t0
        self._marks += 1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.sync_cuda and self._is_log_step(trainer.global_step + 1):
            self._synchronize(trainer)
        label = StepLabel("train", None, self.batch_size_fn(batch))
        self._open_train_labels.append(label)
        self._step_before = trainer.global_step
        self._mark(label)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        stepped = trainer.global_step != getattr(self, "_step_before", None)
        if stepped:  # an optimizer step completed: it owns every batch since the last one (accumulation)
            for label in self._open_train_labels:
                label.step = trainer.global_step
            self._open_train_labels.clear()
        if stepped and self._is_log_step(trainer.global_step):
            if self.sync_cuda:
                self._synchronize(trainer)
            if self._reporter is None:
                self._log_boundary(trainer)
            else:  # single process: the reporter thread drains; surface its errors and feed other loggers here
                self._reporter.raise_error()
                self._log_other_loggers(trainer)
        if self.progress_bar and self._last_progress:
            now_s = time.perf_counter()
            if now_s - self._progress_shown_s >= 1.0:  # LightningModule.log costs ~1 ms: once a second
                self._progress_shown_s = now_s
                pl_module.log("W", self._last_progress["power_w"], prog_bar=True, logger=False)
                pl_module.log("kWh", self._last_progress["total_kwh"], prog_bar=True, logger=False)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Start a run attempt (after Lightning restored the checkpoint, if any); rank 0 only, no collective.

        Logs tags ``energy.attempts`` and ``energy.attempt.{n}``; on a resume, reconciles the steps
        the previous attempt logged after the checkpoint (see the module docstring).
        """
        if self._rank != 0 or self._ledger is None or self._sink is None:
            return
        start_step = int(trainer.global_step)
        self._attempt_id = uuid.uuid4().hex  # a fresh id per fit start
        n = self._ledger.begin_attempt(self._attempt_id, start_step)
        tag = f"id={self._attempt_id} start_step={start_step}"
        if self._resumed:
            self._resumed = False
            last, wasted_kwh = self._ledger.reconcile_rerun(self._previous_totals(start_step), start_step)
            if last > start_step:
                tag += f" rerun_steps={start_step + 1}-{last} rerun_kwh={wasted_kwh:.6g}"
        self._sink.set_tags({"energy.attempts": n, f"energy.attempt.{n}": tag})

    def _previous_totals(self, start_step: int) -> dict[int, float]:
        """``energy/total_kwh`` by step (> ``start_step``) logged by earlier attempts: spool and run history."""
        from wattlog.sinks import spool as _spool
        from wattlog.sinks.spool import Point

        by_step: dict[int, float] = {}
        path = self._sink.spool_path
        try:
            if path.exists():
                header, offset = _spool.read_header(path)
                for _seq, rec, _a, _b in _spool.iter_records_from(path, offset):
                    if type(rec) is Point and rec.key == "energy/total_kwh" and rec.step > start_step:
                        by_step[rec.step] = rec.value
        except (OSError, ValueError) as exc:
            self._degrade(f"resume: cannot read the spool {path} ({exc}); re-run steps may get two points",
                          exc)
        try:
            from wattlog.sinks.sync import default_client_factory, resolve_uri

            client = default_client_factory(resolve_uri(self._tracking_uri))
            for m in client.get_metric_history(self._run_id, "energy/total_kwh"):
                if m.step > start_step:
                    by_step.setdefault(int(m.step), float(m.value))
        except Exception as exc:  # noqa: BLE001 - MLflow down at resume: the spool is the fallback
            self._degrade(f"resume: cannot read the run's energy/total_kwh history ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); re-run steps may get two points", exc)
        return by_step

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._mark(StepLabel("val", trainer.global_step))

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self._label is not None and self._label.stage == "val":
            self._label.samples += self.batch_size_fn(batch)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.target is not None and not getattr(trainer, "sanity_checking", False):
            value = trainer.callback_metrics.get(self.target["metric"])
            if value is not None and self._rank == 0 and self._ledger is not None:
                self._drain(trainer, collective=False)
                self._ledger.observe_metric(float(value), self.target["value"], self.target["mode"])
        fn = getattr(trainer.state, "fn", None)
        if getattr(fn, "value", fn) == "validate":
            self._finish(trainer, collective=True)
        else:
            self._mark(StepLabel("other"))

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._mark(StepLabel("test", batch_idx, self.batch_size_fn(batch)))

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._mark(StepLabel("predict", batch_idx, self.batch_size_fn(batch)))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer, collective=True)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer, collective=True)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer, collective=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._world_size > 1 and self._partial is None:
            self._partial = (f"the fit failed ({type(exception).__name__}); other ranks' energy since the "
                             "last logging boundary is missing")
        self._finish(trainer, collective=False)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._finish(trainer, collective=False)
        if self._sink is not None:  # the writer keeps retrying; at exit the rest stays in the spool for `wattlog sync`
            self._sink.flush(timeout_s=10.0)

    # -- logging -----------------------------------------------------------------------------

    def _is_log_step(self, step: int) -> bool:
        return step > 0 and step % self._log_every == 0

    def _log_boundary(self, trainer: Any) -> None:
        self._drain(trainer, collective=True)

    def _drain(self, trainer: Any, collective: bool, final: bool = False) -> None:
        """Move resolved segments into the ledger; rank 0 logs the due points."""
        with self._lock:
            self._drain_locked(trainer, collective, final)

    def _drain_locked(self, trainer: Any, collective: bool, final: bool) -> None:
        if self._meter is None or self._aggregator is None or self._ledger is None:
            return
        try:
            segments = self._meter.close() if final else self._meter.drain()
        except WattlogError as exc:
            self._degrade(str(exc), exc)
            segments = []
        self._warned.update(self._meter.degraded)
        for seg in segments:
            for name, joules in seg.energy_j.items():
                self._drained_j[name] = self._drained_j.get(name, 0.0) + joules
        self._unsent += self._aggregator.add(segments)
        if final:
            self._unsent += self._aggregator.finish()
        if self._world_size > 1 and not collective and self._rank != 0:
            return  # non-zero ranks contribute through the next collective
        records, self._unsent = self._unsent, []
        if collective and self._world_size > 1:
            gathered = self._gather([r.to_dict() for r in records])
            records = [StepRecord.from_dict(d) for rank_records in gathered for d in rank_records]
        if self._rank != 0:
            return
        points = self._ledger.add(records)
        if final:
            points += self._ledger.flush_pending()
        self._emit(trainer, points)

    def _emit(self, trainer: Any, points: list[tuple[int, dict[str, float]]]) -> None:
        from wattlog.sinks.mlflow import Point

        due = [(step, m) for step, m in points if self._is_log_step(step)]
        if not due or self._sink is None:
            return
        now_ms = int(time.time() * 1000)
        self._sink.log_points([Point(k, float(v), step, now_ms) for step, m in due for k, v in m.items()])
        self._last_progress = {"power_w": due[-1][1]["energy/power_w"], "total_kwh": due[-1][1]["energy/total_kwh"]}
        if any(type(lg).__name__ != "MLFlowLogger" for lg in getattr(trainer, "loggers", []) or []):
            self._other_logger_points.extend(due)
            if threading.current_thread() is threading.main_thread() or self._reporter is None:
                self._log_other_loggers(trainer)

    def _log_other_loggers(self, trainer: Any) -> None:
        """Give TensorBoard/CSV/W&B loggers the same points, on the training thread (they aren't thread-safe)."""
        while self._other_logger_points:
            step, metrics = self._other_logger_points.popleft()
            for logger in getattr(trainer, "loggers", []) or []:
                if type(logger).__name__ == "MLFlowLogger":
                    continue
                try:
                    logger.log_metrics(metrics, step=step)
                except Exception as exc:  # noqa: BLE001 - another logger must not stop training
                    self._degrade(f"{type(logger).__name__}.log_metrics failed: {exc}", exc)

    def _finish(self, trainer: Any, collective: bool) -> None:
        """Close the meter, account what it measured and log the run data.

        ``collective=False`` (teardown, exceptions): no DDP collective, so a failed rank can't hang it.
        """
        if self._meter is None:
            return
        if self._reporter is not None:
            reporter, self._reporter = self._reporter, None
            reporter.stop()
        if self._cuda_marks is not None:  # its queued boundaries must reach the meter first
            self._cuda_marks.stop()
            self._cuda_marks = None
        self._drain(trainer, collective=collective, final=True)
        self._log_other_loggers(trainer)
        self._meter = None
        if reporter_error := getattr(self, "_pending_reporter_error", None):
            self._pending_reporter_error = None
            self._reporter_failed(reporter_error)
        if self._rank == 0:
            try:
                self._log_run_data(trainer)
            except WattlogError:
                raise  # strict mode: the sink's own policy decided to raise
            except Exception as exc:  # noqa: BLE001 - never kill the training at its very end
                self._degrade(f"logging the run's summary/params/artifacts failed: {exc}", exc)

    def _log_run_data(self, trainer: Any) -> None:
        assert self._ledger is not None and self._sink is not None
        summary = self._ledger.summary("all")
        if self._idle_power_w is not None:
            summary["energy/idle_power_w"] = self._idle_power_w
            dynamic_j = self._ledger.state.total_j - self._idle_power_w * self._ledger.state.duration_s
            summary["energy/dynamic_kwh"] = max(0.0, dynamic_j) / 3.6e6
        self._sink.log_summary_metrics(summary, step=int(trainer.global_step))
        if not self._params_logged:
            self._sink.log_params(self._params())
            self._params_logged = True
        if self.artifacts:  # before the tags, so that a failed artifact shows in energy.degraded
            self._log_artifacts()
        tags = {"energy.estimated": self._estimated_kinds() or "none"}
        degraded = self._degraded_reasons()
        if degraded:
            tags["energy.degraded"] = "; ".join(degraded)[:4000]
        if self._partial:
            tags["energy.partial"] = self._partial[:4000]
        self._sink.set_tags(tags)

    def _params(self) -> dict[str, object]:
        by_kind = {c.kind: c for c in self._choices}
        gpu = by_kind.get("gpu")
        prov = gpu.source.provenance() if gpu is not None and gpu.source is not None else {}
        gpu_count = sum(1 for k in self._ledger.domain_kinds.values() if k == "gpu") if self._ledger else 0
        return {
            "energy.gpu_model": prov.get("gpu_model", "none"),
            "energy.gpu_count": gpu_count,
            "energy.gpu_method": gpu.method if gpu else "none",
            "energy.cpu_method": by_kind["cpu"].method if "cpu" in by_kind else "none",
            "energy.ram_method": by_kind["ram"].method if "ram" in by_kind else "none",
            "energy.carbon_intensity_g_per_kwh": self._intensity.g_per_kwh,
            "energy.carbon_source": self._intensity.source,
            "energy.pue": self.pue,
        }

    def _estimated_kinds(self) -> str:
        return ",".join(c.kind for c in self._choices if c.estimated)

    def _degraded_reasons(self) -> list[str]:
        return sorted(self._warned)

    def _log_artifacts(self) -> None:
        assert self._ledger is not None and self._sink is not None
        if not self._ledger.trace.rows:
            return
        with tempfile.TemporaryDirectory(prefix="wattlog-") as tmp:
            trace_path = os.path.join(tmp, "trace.csv")
            self._ledger.trace.write_csv(trace_path)  # streamed from the trace file: O(1) memory
            self._sink.log_artifact(trace_path, "energy")
            rows = self._ledger.trace.plot_rows()  # at most 5,000 contiguous bins of steps
            try:
                from wattlog.plots import plot_power_trace

                png = plot_power_trace(rows, os.path.join(tmp, "power.png"))
                self._sink.log_artifact(str(png), "energy")
            except Exception as exc:  # noqa: BLE001 - a chart must not fail the run (matplotlib missing or broken)
                self._degrade(f"power.png skipped: {type(exc).__name__}: {exc}", exc)

    # -- distributed -------------------------------------------------------------------------

    def _make_group(self) -> None:
        """Create wattlog's gloo group with ``collective_timeout_s`` (setup: every rank gets here)."""
        if self._world_size <= 1 or self._group is not None:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        from datetime import timedelta

        try:
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.collective_timeout_s))
        except Exception as exc:  # noqa: BLE001 - gloo missing: fall back to the default group
            self._group = None
            self._degrade(f"cannot create a gloo group for wattlog's collectives ({exc}); using the default "
                          "group, whose timeout is the strategy's", exc)

    def _gather(self, obj: Any) -> list[Any]:
        """All ranks' objects, in rank order (one collective; every rank must call it).

        Bounded by ``collective_timeout_s``: on a timeout or error (a rank died or stalled) wattlog
        stops collecting for the rest of the run, warns once and returns only this rank's object;
        rank 0 then logs its own measurements and the run is tagged ``energy.partial``.
        """
        if self._world_size <= 1 or self._partial is not None:
            return [obj]
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        try:
            dist.all_gather_object(out, obj, group=self._group)
        except Exception as exc:  # noqa: BLE001 - DistBackendError / RuntimeError: timeout, peer gone
            self._stop_collecting(f"a wattlog collective failed on rank {self._rank} ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); from here on "
                                  "rank 0 logs its own measurements only", exc)
            return [obj]
        return out

    def _stop_collecting(self, reason: str, exc: BaseException | None = None) -> None:
        self._partial = reason
        if self._ledger is not None:
            self._ledger.world_size = 1  # account rank 0's records as they come; pending ones at the end
        if self._sink is not None:  # at once: the job may yet be killed before its end
            self._sink.set_tags({"energy.partial": reason[:4000]})
        self._degrade(reason, exc)

    def _sum_gathered(self, value: float) -> float:
        return float(sum(self._gather(value)))

    def _synchronize(self, trainer: Any) -> None:
        if self._uses_cuda(trainer):
            import torch

            torch.cuda.synchronize()

    # -- failure policy, resume --------------------------------------------------------------

    def _reporter_failed(self, error: BaseException) -> None:
        """Strict mode, or a wattlog error already judged by the policy: raise. Else warn; the stage's
        final drain on the training thread still accounts everything measured."""
        if isinstance(error, WattlogError) or strict_mode():
            raise error
        self._degrade(f"the reporter thread failed ({type(error).__name__}: {error}); points are logged at the end",
                      error)

    def _degrade(self, reason: str, exc: BaseException | None = None) -> None:
        from wattlog.sinks.spool import redact_text

        reason = redact_text(reason)  # exception texts can carry tracking URIs with credentials
        if reason in self._warned:
            return
        self._warned.add(reason)
        degrade(reason, exc)

    def state_dict(self) -> dict[str, Any]:
        """The running totals, so a resumed run continues them.

        Includes the energy measured up to the latest sample that has not yet been attributed
        to a step (attribution lags the sampler by a few steps), so a checkpoint taken mid-fit
        is complete for this process. Under DDP, other ranks' energy since the last logging
        boundary is not included.
        """
        if self._ledger is None:
            return dict(self._loaded_state or {})
        with self._lock:
            return self._state_dict_locked()

    def _state_dict_locked(self) -> dict[str, Any]:
        assert self._ledger is not None
        state = self._ledger.state_dict()
        if self._meter is not None:
            prefix = f"r{self._rank}." if self._world_size > 1 else ""
            kind_j = dict(state["kind_j"])  # type: ignore[arg-type]
            unattributed_j = 0.0
            for name, joules in self._meter.energy_j().items():
                extra_j = max(0.0, joules - self._drained_j.get(name, 0.0))
                kind = self._ledger.domain_kinds.get(prefix + name, "other")
                kind_j[kind] = kind_j.get(kind, 0.0) + extra_j
                unattributed_j += extra_j
            state["kind_j"] = kind_j
            state["total_j"] = float(state["total_j"]) + unattributed_j  # type: ignore[arg-type]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict)
        self._resumed = True
        if self._ledger is not None:
            self._ledger.load_state_dict(self._loaded_state)

    @property
    def mark_cost_us(self) -> float:
        """Mean training-thread cost of recording a boundary, in microseconds."""
        return 1e6 * self._mark_cost_s / self._marks if self._marks else 0.0


def _make_class() -> type:
    bases = _callback_bases()
    namespace = {k: v for k, v in _EnergyMonitorImpl.__dict__.items() if k not in ("__dict__", "__weakref__")}
    namespace["__module__"] = __name__
    namespace["__qualname__"] = "EnergyMonitor"
    return type("EnergyMonitor", bases, namespace)


EnergyMonitor = _make_class()


class _Reporter:
    """Single-process runs: drain the meter into the ledger and the sink every REPORT_INTERVAL_S.

    Keeps that work (interpolation, per-step arithmetic, building points) off the training thread,
    which then only records boundaries. An error raised here (strict mode) is re-raised on the
    training thread at the next logging boundary or at the end of the stage.
    """

    def __init__(self, monitor: Any, trainer: Any) -> None:
        self._monitor = monitor
        self._trainer = trainer
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="wattlog-reporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(REPORT_INTERVAL_S):
            try:
                self._monitor._drain(self._trainer, collective=False)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self._error = exc
                return

    def raise_error(self) -> None:
        """On the training thread: apply the failure policy to what the reporter hit."""
        if self._error is not None:
            error, self._error = self._error, None
            self._monitor._reporter_failed(error)

    def stop(self) -> None:
        """Stop and join; a pending error is kept for the caller to raise after the final drain."""
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            self._monitor._pending_reporter_error, self._error = self._error, None
