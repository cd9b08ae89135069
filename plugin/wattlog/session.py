"""EnergySession: meter -> step records -> ledger -> Sink, for ONE run (framework-free).

Every integration (Lightning, Hugging Face, Fabric, plain loops) is a thin adapter over this class.
It imports no torch, lightning, mlflow or hydra. The training thread calls:

- :meth:`mark` when a batch starts and :meth:`step_completed` when an optimizer step ends, or
  :meth:`train_batch_started` alone for loops that count their logged steps: O(1) appends to the
  meter's boundary deque, in one ordered stream, so a drain at any time sees either no record for a
  step or a complete one;
- :meth:`log_step` at logging boundaries: the first starts the stage's :class:`~wattlog.pump.Pump`, which
  drains resolved records into points and appends them to the sink off the training thread (under DDP it
  also runs the collective that gathers every rank's records, so none runs on the training thread);
- :meth:`end_stage` at the end of fit/validate/test/predict: stops measuring, logs the summary,
  params, tags and artifacts, and waits (bounded) for the sink to store them.

Lifecycle: :meth:`open` (a stage starts: sink and meter) ... :meth:`end_stage` ... :meth:`suspend`
(the stage's sink is closed, by a ``wattlog-finish`` thread once ``power.png`` is in it; no thread,
process or file stays open past that), then :meth:`open` again with a
new sink for the next stage of the same run (the totals continue), or :meth:`close`. A next stage
that opens while the last one's chart is still drawn, with a sink to the same destination, takes the
last stage's sink over instead of waiting (:class:`~wattlog.finisher.StageFinisher`): that sink then
stays open until the later stage's end. A stage with a source that sees every process (RAPL, a
``system``-scope estimate: ``sees_helper_processes``) waits instead, before it starts measuring, so
that the chart process's energy is not billed to it.

Logged keys (see :mod:`wattlog.keys`): per train step ``energy/step_j``, ``energy/power_w``,
``energy/total_j``, ``energy/emissions_g``, ``energy/gpu_power_w`` (GPU measured) and
``energy/gpu{i}_power_w`` (``per_device``); per stage the summary of
:meth:`wattlog.ledger.EnergyLedger.summary`; params ``energy.gpu_model``, ``energy.gpu_count``,
``energy.{gpu,cpu,ram}_method``, ``energy.carbon_intensity_g_per_kwh``, ``energy.carbon_source``,
``energy.pue``; tags ``energy.estimated``, ``energy.degraded``, ``energy.partial``; artifacts
``energy/trace.csv`` and ``energy/power.png``.

Steps: a per-step point is logged at the step given to :meth:`step_completed` when
``(step - first_step + 1) % log_every_n_steps == 0`` (Lightning's rule for its 0-based steps;
``first_step=1`` for loops that count from 1, such as Hugging Face's ``global_step``). A summary key is logged at the step
given to :meth:`end_stage`, or, when that key already has a point at or after it, at the next free
step: so every (key, step) has exactly one point and every key's steps increase.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

from wattlog import keys
from wattlog.errors import SourceUnavailable, WattlogError, degrade, strict_mode
from wattlog.ledger import EnergyLedger, StepAggregator, StepEnd, StepLabel, StepRecord
from wattlog.options import MonitorOptions
from wattlog.finisher import StageFinisher
from wattlog.sinks.base import split_primary
from wattlog.sinks.spool import Point

_perf_counter = time.perf_counter

__all__ = ["Collectives", "EnergySession", "StepEnd", "StepLabel"]

DRAIN_INTERVAL_S = 0.25
"""The time between two rounds of the pump (drains; under DDP, gathers of every rank's records)."""

PUMP_STOP_MARGIN_S = 5.0
"""Under DDP, a stage end waits for the pump's last round up to the collective timeout plus this."""

SHORT_RUN_RESOLUTIONS = 2
"""A run measured for less than this many of its coarsest source's resolution is tagged ``energy.short_run``
(its total then rests on one or two samples of an estimate's utilisation, and per-step values on none)."""


def preload(cpu: str = "auto") -> None:
    """Import wattlog's modules that a stage's set-up needs (the meter, the sources, the pump, the sinks,
    the carbon tables' reader) and, when the CPU may be estimated (``cpu`` is ``auto`` or ``estimate``),
    index the CPU TDP table (a package data file): no hardware, ``/proc`` or ``/sys`` is read. Adapters
    call it when they are constructed, so that a first stage's set-up starts measuring sooner (~50 ms of
    imports, ~15 ms of table). psutil is left to the first stage: its import reads ``/proc/stat``."""
    import importlib

    for module in ("wattlog.meter", "wattlog.pump", "wattlog.carbon", "wattlog.sources.nvml",
                   "wattlog.sources.estimate", "wattlog.sources.rapl", "wattlog.sinks.mlflow"):
        try:
            importlib.import_module(module)
        except ImportError:  # an optional dependency: its source says so when it is asked for
            pass
    if cpu in ("auto", "estimate"):
        from wattlog.sources.estimate import preload_tdp_table

        preload_tdp_table()


def _drop(item: Any) -> None:
    """``append_boundary`` of a session that is not measuring."""


class Collectives(Protocol):
    """How ranks exchange objects (the Lightning adapter implements it with torch.distributed)."""

    rank: int
    world_size: int
    partial: str | None

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order (one collective; every rank calls it)."""


class EnergySession:
    """Measure one run and write it to a sink.

    Args:
        options: validated monitor options.
        gpus: the GPUs to measure (``"auto"``, ``"none"`` or CUDA indices), as the adapter resolved them.
        host: measure CPU and RAM here (local rank 0 only, so a node is counted once).
        log_every_n_steps: per-step points every n steps.
        first_step: the number of the loop's first step (0 for Lightning, 1 for Hugging Face).
        collectives: for DDP; None in a single process.
        link_tags: tags set on the run when it is first opened (e.g. the links into a Hydra sweep).
        on_degrade: called with every degradation reason (after the policy's warning).
        fit_stage: the fit stage's name in the summary keys (``recover``: ``energy/recover_j``).
    """

    def __init__(
        self,
        options: MonitorOptions,
        *,
        gpus: str | Sequence[int] = "auto",
        host: bool = True,
        log_every_n_steps: int = 1,
        first_step: int = 0,
        collectives: Collectives | None = None,
        link_tags: dict[str, str] | None = None,
        on_degrade: Callable[[str], None] | None = None,
        fit_stage: str = "train",
    ) -> None:
        self.options = options
        self.fit_stage = fit_stage
        self.sink: Any = None
        self.gpus = gpus
        self.host = host
        self.log_every = max(1, int(log_every_n_steps))
        self.first_step = int(first_step)
        self.collectives = collectives
        self.rank = collectives.rank if collectives else 0
        self.world_size = collectives.world_size if collectives else 1
        self.ledger: EnergyLedger | None = None
        self.progress: dict[str, float] = {}
        self.idle_power_w: float | None = None
        self._on_degrade = on_degrade
        self._link_tags = dict(link_tags or {})
        self._choices: list[Any] = []
        self._tagged_short = False
        self._sent_tags: dict[str, str] = {}  # what this stage's sink was told at its start, or since
        self._intensity: Any = None
        self._meter: Any = None
        self._aggregator: StepAggregator | None = None
        self._prefix = f"r{self.rank}." if self.world_size > 1 else ""
        self._drained_j: dict[str, float] = {}
        self._unsent: list[StepRecord] = []  # DDP: this rank's records waiting for the next collective
        self._last_step: dict[str, int] = {}
        self._last_value: dict[str, float] = {}
        self._degraded: list[str] = []
        self._params_logged = False
        self._closed = False
        self._chart: Any = None  # the stage's power.png (rows, estimated kinds), drawn at its end
        self._finisher = StageFinisher()  # draws it and closes the stage's sink, off the training thread
        self._pump: Any = None  # the stage's wattlog.pump.Pump, started by the first log_step()
        self.awaits_log_step = True  # hot paths call log_step() at a boundary only while this is True: no pump
        # started yet for the stage, or the pump kept an exception for the training thread
        self._append: Callable[[tuple[float, Hashable]], None] = _drop  # the stage's meter.append_boundary
        self._lock = threading.RLock()  # meter drains, aggregator, ledger and sink: pump vs training thread

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def measuring(self) -> bool:
        return self._meter is not None

    def open(self, sink: Any) -> None:
        """A stage starts: start ``sink`` (rank 0) and the meter; the first call also logs the params.

        Raises:
            SourceUnavailable: a source that was explicitly asked for cannot measure here.
        """
        if self._closed:
            raise WattlogError("EnergySession.open() after close()")
        if self._meter is not None:
            return
        from wattlog.meter import EnergyMeter

        if not self._choices:
            self._select_sources()
        if any(c.source is not None and c.source.sees_helper_processes for c in self._choices):
            self._finisher.wait()  # the last stage's chart process would be billed to this stage
        meter = EnergyMeter([c.source for c in self._choices if c.source is not None], self.options.sample_interval_s)
        domains = meter.start()  # before the sink starts its delivery process: measure from the first hook
        # the last stage's sink if it is still drawing its chart (once the meter runs: never left adopted)
        sink = self._finisher.adopt(sink)
        if self.rank == 0 and self.sink is None:
            try:
                sink.start()
            except BaseException:
                meter.close()
                self._finisher.release(sink)
                raise
            self.sink = sink
        self._meter, self._drained_j = meter, {}
        self._append = meter.append_boundary
        kinds = {self._prefix + d.name: d.kind for d in domains}
        if self.ledger is None:
            self._init_ledger(kinds)
        self._aggregator = StepAggregator(self._prefix, self.rank)
        if self.rank == 0 and not self._params_logged:
            self.sink.log_params(self._params())
        if self.rank == 0:  # the tags known now; the stage's end sends only those that changed
            tags = self._tags(measured=False)
            self.sink.set_tags(tags if self._params_logged else {**self._link_tags, **tags})
            self._sent_tags = {k: str(v) for k, v in tags.items()}
            self._params_logged = True

    def measure_idle(self, seconds: float) -> float:
        """Measure idle power for ``seconds`` (before training); logged as ``energy/idle_power_w``."""
        with self._meter.window("idle") as idle:
            time.sleep(seconds)
        total = [idle.power_w]
        if self.collectives is not None:
            total = self.collectives.gather(idle.power_w)
        self.idle_power_w = float(sum(total))
        return self.idle_power_w

    def stop(self, collective: bool = True) -> None:
        """Stop measuring: the final reading's records are accounted (and logged if due)."""
        if self._meter is None:
            return
        collective = self._stop_pump(collective)
        meter, self._meter, self._append = self._meter, None, _drop
        with self._lock:
            self._drain(meter.close(), collective=collective, final=True)
            self._note_meter(meter)

    def suspend(self) -> None:
        """Between stages: stop measuring and close the stage's sink (bounded by ``delivery_timeout_s``).

        The stage's ``power.png`` is drawn from here on (after the stage end's flush), on a
        ``wattlog-finish`` thread that then closes the primary sink (:class:`~wattlog.finisher.StageFinisher`):
        the caller does not wait for the drawing, and a next stage of the same run takes the sink over
        instead of waiting (unless a source of it sees every process, see :meth:`open`). :meth:`close` waits for it; so does strict mode, here, so that a failed chart
        raises to the caller.
        """
        try:
            self.stop(collective=False)
        finally:
            if self.ledger is not None:
                self.ledger.trace.suspend()
            sink, self.sink = self.sink, None
            chart, self._chart = self._chart, None
            primary, others = split_primary(sink)
            try:
                for other in others:  # the trainer's other loggers: closed here, on the caller's thread
                    other.close(self.options.delivery_timeout_s)
            finally:
                self._finisher.finish(primary, None if chart is None else lambda s: self._draw_chart(chart, s),
                                      lambda s: s.close(self.options.delivery_timeout_s),
                                      background=chart is not None and not strict_mode())

    def wait_finished(self) -> None:
        """Wait until the last stage's sink is closed (its chart drawn and delivered): see :meth:`suspend`."""
        self._finisher.wait()

    def close(self) -> None:
        """Suspend and release everything (the trace file is deleted); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.suspend()
        finally:
            self.wait_finished()
            if self.ledger is not None:
                self.ledger.trace.close()

    # -- the training thread's calls ---------------------------------------------------------

    def mark(self, label: Hashable, time_s: float | None = None) -> None:
        """A boundary: what follows is ``label`` (a :class:`StepLabel`). O(1), microseconds."""
        if self._meter is not None:
            self._meter.mark(label, time_s)

    def step_completed(self, step: int, time_s: float | None = None) -> None:
        """The open train step ended and its metrics are logged at ``step``. O(1)."""
        if self._meter is not None:
            self._meter.mark(StepEnd(step), time_s)

    @property
    def append_boundary(self) -> Callable[[tuple[float, Hashable]], None]:
        """The stage's :attr:`wattlog.meter.EnergyMeter.append_boundary` (``append((perf_counter(),
        label))``: :meth:`mark` without a Python call), bound once per stage; once the stage stops it
        drops what it is given."""
        return self._append

    def train_batch_started(self, logged_step: int, samples: int) -> None:
        """A train batch of ``samples`` starts, which the loop logs at ``logged_step``; the previous train
        batch ended an optimizer step when its ``logged_step`` differs (:class:`~wattlog.ledger.StepAggregator`).
        Then :meth:`log_step` while it is awaited (:attr:`awaits_log_step`: the pump's start, or a failure
        to raise). The Lightning callback inlines it: one append of ``(perf_counter(), (logged_step,
        samples))`` per batch."""
        self._append((_perf_counter(), (logged_step, samples)))
        if self.awaits_log_step:
            self.log_step()

    def is_log_step(self, step: int) -> bool:
        return (step - self.first_step + 1) % self.log_every == 0

    def log_step(self) -> None:
        """At a logging boundary: the first starts the pump; later ones raise what the pump raised.

        The pump drains every ``DRAIN_INTERVAL_S`` on its own thread, so points keep their own steps and
        the training thread pays well under a microsecond here. Under DDP every rank must call it (the
        pumps' rounds are collectives); a stage with no logging boundary gathers once, at its end.
        """
        if self._pump is not None:
            self.awaits_log_step = False
            self._checked(self._pump.check)
        elif self._meter is not None:
            from wattlog.pump import Pump

            self._pump = Pump(self._take, self._account, self._exchange_round if self.world_size > 1 else None,
                              DRAIN_INTERVAL_S, on_error=self._pump_failed).start()
            self.awaits_log_step = False

    def _pump_failed(self) -> None:
        self.awaits_log_step = True  # the next logging boundary raises it (pump thread)

    def drain(self, collective: bool = False) -> None:
        """Account every resolved record and log the points that are due.

        Under DDP, ``collective=True`` gathers every rank's records (every rank must call it);
        with ``collective=False`` other ranks keep theirs for the next collective.
        """
        if self._meter is None:
            return
        if collective and self._pump is not None:
            raise WattlogError("EnergySession.drain(collective=True) while the pump runs the collectives")
        with self._lock:
            self._drain(self._read_meter(), collective=collective, final=False)

    def observe_metric(self, value: float) -> None:
        """Record the energy to the target the first time ``value`` reaches it (rank 0)."""
        target = self.options.target
        if target.metric is None or self.ledger is None or self.rank != 0:
            return
        with self._lock:
            self.drain()
            self.ledger.observe_metric(float(value), float(target.value), target.mode)  # type: ignore[arg-type]

    def end_stage(self, step: int, collective: bool = True) -> None:
        """End of fit/validate/test/predict: stop measuring, log summary, params, tags, artifacts.

        Args:
            step: the documented summary step (the trainer's global step).
            collective: False after a failure on some rank (no collective that could hang).
        """
        self.stop(collective=collective)
        if self.rank != 0 or self.ledger is None or self.sink is None:
            return
        try:
            summary = self.ledger.summary()
            for train_key, stage_key in keys.fit_stage_keys(self.fit_stage).items():
                if train_key in summary:
                    summary[stage_key] = summary.pop(train_key)
            if self.idle_power_w is not None:
                summary[keys.IDLE_POWER_W] = self.idle_power_w
                dynamic_j = self.ledger.state.total_j - self.idle_power_w * self.ledger.state.duration_s
                summary[keys.DYNAMIC_J] = max(0.0, dynamic_j)
            changed = {k: v for k, v in summary.items() if self._last_value.get(k) != v}
            self._emit([(step, changed)], force=True)
            if self.options.artifacts:  # before the tags, so that a failed artifact shows in energy.degraded
                self._log_artifacts()
            self._set_changed_tags(self.sink)
            self.sink.flush(self.options.delivery_timeout_s)
        except WattlogError:
            raise  # strict mode: the policy already decided
        except Exception as exc:  # noqa: BLE001 - never kill the training at its very end
            self._degrade(f"logging the run's summary/tags/artifacts failed: {exc}", exc)

    # -- resume and provenance ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Running totals for a checkpoint, including measured energy not yet attributed to a step."""
        with self._lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        if self.ledger is None:
            return {}
        state = self.ledger.state_dict()
        if self._meter is not None:
            kind_j = dict(state["kind_j"])  # type: ignore[arg-type]
            extra_total_j = 0.0
            for name, joules in self._meter.energy_j().items():
                extra_j = max(0.0, joules - self._drained_j.get(name, 0.0))
                kind = self.ledger.domain_kinds.get(self._prefix + name, "other")
                kind_j[kind] = kind_j.get(kind, 0.0) + extra_j
                extra_total_j += extra_j
            state["kind_j"] = kind_j
            state["total_j"] = float(state["total_j"]) + extra_total_j  # type: ignore[arg-type]
        return state

    def resume(self, state: dict[str, Any], start_step: int) -> None:
        """Continue the totals of ``state`` (a fit resumed into the same run) as a new attempt.

        Steps the killed attempt logged at or after ``start_step`` keep their first points
        (MLflow cannot delete points); the energy it spent on them is ``energy/rerun_j``.
        """
        if self.ledger is None:
            return
        with self._lock:
            self.ledger.load_state_dict(state)
            self.begin_attempt(start_step, resumed=True)

    def begin_attempt(self, start_step: int, resumed: bool = False) -> None:
        """Tag a fit attempt: ``energy.attempts`` and ``energy.attempt.{n}`` (rank 0)."""
        if self.ledger is None or self.rank != 0 or self.sink is None:
            return
        attempt_id = uuid.uuid4().hex
        n = self.ledger.begin_attempt(attempt_id, start_step)
        tag = f"id={attempt_id} start_step={start_step}"
        if resumed:
            previous = self.sink.logged_values(keys.TOTAL_J, 0)
            last, wasted_j = self.ledger.reconcile_rerun(previous, start_step)
            if last >= start_step:
                tag += f" rerun_steps={start_step}-{last} rerun_j={wasted_j:.6g}"
        self.sink.set_tags({keys.T_ATTEMPTS: n, keys.attempt_tag(n): tag})

    def record_checkpoint(self, state: dict[str, Any], run_id: str | None) -> None:
        """A new run evaluating a checkpoint: the checkpoint's training energy as provenance params."""
        if self.rank != 0 or not state or self.sink is None:
            return
        stage_j = state.get("stage_j") or {}
        train_j = float(stage_j.get("train", state.get("total_j", 0.0)))  # type: ignore[union-attr]
        params: dict[str, object] = {keys.P_CHECKPOINT_TRAIN_J: f"{train_j:.6g}"}
        if run_id:
            params[keys.P_CHECKPOINT_RUN_ID] = run_id
        self.sink.log_params(params)

    # -- internals ---------------------------------------------------------------------------

    def _select_sources(self) -> None:
        from wattlog.carbon import lookup_intensity
        from wattlog.sources import select_sources

        o = self.options
        self._intensity = lookup_intensity(o.carbon.country, o.carbon.region, o.carbon.intensity_g_per_kwh)
        cpu, ram = (o.cpu, o.ram) if self.host else ("none", "none")
        if o.require_gpu_counter and self.gpus == "none":
            raise SourceUnavailable(
                "require_gpu_counter=True (the `nvml` config) but this run trains on no CUDA GPU: "
                "train on a GPU (accelerator='gpu') or use energy=default / energy=estimate")
        self._choices = select_sources(self.gpus, cpu, ram, require_gpu_counter=o.require_gpu_counter,
                                       powercap_root=o.powercap_root, cpu_scope=o.cpu_scope, ram_scope=o.cpu_scope)

    def _init_ledger(self, local_kinds: dict[str, str]) -> None:
        all_kinds = [local_kinds] if self.collectives is None else self.collectives.gather(local_kinds)
        kinds: dict[str, str] = {}
        gpu_order: list[str] = []
        for rank_kinds in all_kinds:
            kinds.update(rank_kinds)
            gpu_order.extend(name for name, kind in rank_kinds.items() if kind == "gpu")
        self.ledger = EnergyLedger(kinds, self._intensity.g_per_kwh, self.options.carbon.pue, self.world_size,
                                   self.options.per_device, gpu_order)

    def _read_meter(self) -> list[Any]:
        """The meter's resolved segments (a meter failure degrades and yields none)."""
        try:
            segments = self._meter.drain()
        except WattlogError as exc:
            self._degrade(str(exc), exc)
            segments = []
        self._note_meter(self._meter)
        return segments

    def _take(self) -> list[StepRecord]:
        """Pump thread: this rank's new records (and, under DDP, those an earlier drain kept for it)."""
        with self._lock:
            if self._meter is None:  # a round that outlived stop()'s wait: the final drain has it all
                return []
            records = self._records(self._read_meter(), final=False)
            mine, self._unsent = self._unsent + records, []
            return mine

    def _exchange_round(self, payload: tuple[list[StepRecord], bool]) -> list[tuple[list[StepRecord], bool]]:
        """Pump thread, DDP: every rank's round (records and stop request), one collective."""
        assert self.collectives is not None
        records, stopping = payload
        gathered = self.collectives.gather(([r.to_dict() for r in records], stopping))
        return [([StepRecord.from_dict(d) for d in dicts], asked) for dicts, asked in gathered]

    def _account(self, records: list[StepRecord]) -> None:
        """Pump thread: rank 0 accounts every rank's records and logs the points that are due."""
        with self._lock:
            points = self._note_partial()
            if self.rank == 0:
                self._log_points(points + self.ledger.add(records))  # type: ignore[union-attr]

    def _stop_pump(self, collective: bool) -> bool:
        """Wait for the pump's last round; whether the final drain may still run a collective."""
        pump, self._pump = self._pump, None
        self.awaits_log_step = True
        if pump is None:
            return collective
        timeout_s = self.options.collective_timeout_s + PUMP_STOP_MARGIN_S if self.world_size > 1 else 30.0
        if self._checked(lambda: pump.stop(timeout_s), default=True) or self.collectives is None:
            return collective
        self.collectives.stop(f"wattlog's pump on rank {self.rank} did not finish its last collective in "
                              f"{timeout_s:g} s; from here on rank 0 logs its own measurements only")
        return False

    def _checked(self, call: Callable[[], Any], default: Any = None) -> Any:
        """``call()``, where a pump failure that the policy has not yet judged degrades (it raises only in
        strict mode): the pump is gone, and the stage's final drain on this thread accounts what it left."""
        try:
            return call()
        except WattlogError:
            raise  # the failure policy already decided (strict mode)
        except Exception as exc:  # noqa: BLE001 - never kill the training for a bookkeeping thread
            self._degrade(f"wattlog's pump thread failed ({type(exc).__name__}: {exc}); points are drained at "
                          "the end of the stage", exc)
            return default

    def _records(self, segments: list[Any], final: bool) -> list[StepRecord]:
        assert self._aggregator is not None
        for seg in segments:
            for name, joules in seg.energy_j.items():
                self._drained_j[name] = self._drained_j.get(name, 0.0) + joules
        records = self._aggregator.add(segments)
        if final:
            records += self._aggregator.finish()
        return records

    def _log_points(self, points: list[tuple[int, dict[str, float]]]) -> None:
        self._emit([(step, m) for step, m in points if self.is_log_step(step)])

    def _drain(self, segments: list[Any], collective: bool, final: bool) -> None:
        assert self.ledger is not None
        records = self._records(segments, final)
        if self.world_size > 1:
            records = self._exchange(records, collective)
            if records is None:
                return
        points = self.ledger.add(records)
        if final:
            points += self.ledger.flush_pending()
        self._log_points(points)

    def _exchange(self, records: list[StepRecord], collective: bool) -> list[StepRecord] | None:
        """DDP: rank 0 gets every rank's records at a collective; None on other ranks."""
        self._unsent += records
        if not collective and self.rank != 0:
            return None
        mine, self._unsent = self._unsent, []
        if not collective:
            return mine
        assert self.collectives is not None
        gathered = self.collectives.gather([r.to_dict() for r in mine])
        points = self._note_partial()
        if self.rank != 0:
            return None
        self._log_points(points)
        return [StepRecord.from_dict(d) for rank_records in gathered for d in rank_records]

    def _note_partial(self) -> list[tuple[int, dict[str, float]]]:
        """Once collecting has stopped: account rank 0's records as they come, and first the steps that
        wait for other ranks' records (in step order, so no later step's point precedes them)."""
        if self.collectives is None or self.collectives.partial is None or self.ledger is None:
            return []
        if self.ledger.world_size == 1:
            return []
        self.ledger.world_size = 1
        return self.ledger.flush_pending()

    def _emit(self, points: list[tuple[int, dict[str, float]]], force: bool = False) -> None:
        """Log ``(step, metrics)``; ``force`` moves a key to its next free step instead of dropping it."""
        if self.rank != 0 or not points or self.sink is None:
            return
        now_ms = int(time.time() * 1000)
        out: list[Point] = []
        for step, metrics in points:
            for key, value in metrics.items():
                last = self._last_step.get(key)
                at = step
                if last is not None and at <= last:
                    if not force:
                        continue  # an earlier attempt or stage already has this step
                    at = last + 1
                self._last_step[key] = at
                self._last_value[key] = float(value)
                out.append(Point(key, float(value), at, now_ms))
            if keys.POWER_W in metrics and not force:
                self.progress = {"power_w": metrics[keys.POWER_W], "total_j": metrics[keys.TOTAL_J]}
        if out:
            self.sink.log_points(out)

    def _params(self) -> dict[str, object]:
        by_kind = {c.kind: c for c in self._choices}
        gpu = by_kind.get("gpu")
        prov = gpu.source.provenance() if gpu is not None and gpu.source is not None else {}
        gpu_count = sum(1 for k in self.ledger.domain_kinds.values() if k == "gpu") if self.ledger else 0
        return {
            keys.P_GPU_MODEL: prov.get("gpu_model", "none"),
            keys.P_GPU_COUNT: gpu_count,
            keys.P_GPU_METHOD: gpu.method if gpu else "none",
            keys.P_CPU_METHOD: by_kind["cpu"].method if "cpu" in by_kind else "none",
            keys.P_RAM_METHOD: by_kind["ram"].method if "ram" in by_kind else "none",
            keys.P_INTENSITY: self._intensity.g_per_kwh,
            keys.P_CARBON_SOURCE: self._intensity.source,
            keys.P_PUE: self.options.carbon.pue,
        }

    def _tags(self, measured: bool = True) -> dict[str, object]:
        """The run's tags; ``measured=False``: only those known before anything is measured (no short_run)."""
        estimated = ",".join(c.kind for c in self._choices if c.estimated)
        tags: dict[str, object] = {keys.T_ESTIMATED: estimated or "none"}
        if self._degraded:
            tags[keys.T_DEGRADED] = "; ".join(sorted(set(self._degraded)))[:4000]
        partial = self.collectives.partial if self.collectives is not None else None
        if partial:
            tags[keys.T_PARTIAL] = partial[:4000]
        if not measured:
            return tags
        short = self._short_run()
        if short or self._tagged_short:
            tags[keys.T_SHORT_RUN] = short or "no"
            self._tagged_short = bool(short)
        return tags

    def _set_changed_tags(self, sink: Any) -> None:
        """The tags that differ from what ``sink`` already holds (usually none: one MLflow write saved at the
        stage's end, where the training thread waits for every write)."""
        changed = {k: v for k, v in self._tags().items() if self._sent_tags.get(k) != str(v)}
        if changed:
            sink.set_tags(changed)
            self._sent_tags.update({k: str(v) for k, v in changed.items()})

    def _short_run(self) -> str:
        """Why the run is too short for its coarsest method to resolve, or ``""``."""
        coarse = max((c for c in self._choices if c.source is not None),
                     key=lambda c: c.source.resolution_s, default=None)
        if coarse is None or self.ledger is None or coarse.source.resolution_s <= 0:
            return ""
        duration_s, resolution_s = self.ledger.state.duration_s, coarse.source.resolution_s
        if duration_s >= SHORT_RUN_RESOLUTIONS * resolution_s:
            return ""
        return (f"{duration_s:.2f} s measured, under {SHORT_RUN_RESOLUTIONS} x the {resolution_s:g} s "
                f"{coarse.kind} {coarse.method} interval: energy differences between such runs are mostly noise")

    def _log_artifacts(self) -> None:
        assert self.ledger is not None
        if not self.ledger.trace.rows:
            return
        with tempfile.TemporaryDirectory(prefix="wattlog-") as tmp:
            trace_path = os.path.join(tmp, keys.TRACE_CSV)
            self.ledger.trace.write_csv(trace_path)
            self.sink.log_artifact(trace_path, keys.ARTIFACT_DIR)
        estimated = ",".join(c.kind for c in self._choices if c.estimated) or None
        self._chart = (self.ledger.trace.plot_rows(), estimated)  # drawn once the stage's sink is flushed

    def _draw_chart(self, chart: Any, sink: Any) -> None:
        """Draw the stage's power.png (``chart``: its rows and estimated kinds) into ``sink``; a failed
        chart degrades, and is tagged."""
        from wattlog.artifacts import draw_into

        error = draw_into(sink, *chart, self.options.delivery_timeout_s)
        if error is not None:  # a chart must not fail the run (matplotlib missing or broken)
            self._degrade(f"power.png skipped: {type(error).__name__}: {error}", error)
            if not self._finisher.adopted(sink):  # else the running stage's end sends the tag, to all sinks
                self._set_changed_tags(sink)

    def _note_meter(self, meter: Any) -> None:
        for reason in meter.degraded:
            if reason not in self._degraded:
                self._degraded.append(reason)  # the meter already applied the policy (warned or raised)

    def _degrade(self, reason: str, exc: BaseException | None = None) -> None:
        from wattlog.sinks.spool import redact_text

        reason = redact_text(reason)
        if reason in self._degraded:
            return
        self._degraded.append(reason)
        if self._on_degrade is not None:
            self._on_degrade(reason)
        degrade(reason, exc)

    def report_degraded(self, reason: str, exc: BaseException | None = None) -> None:
        """For adapters: apply the failure policy to ``reason`` once, and tag the run with it."""
        self._degrade(reason, exc)
