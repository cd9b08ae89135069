"""EnergyMonitor: the Lightning callback. Wiring only: each hook makes 1-3 calls into an EnergySession.

Works with ``lightning.pytorch`` and ``pytorch_lightning`` (the class derives from the ``Callback`` of
each installed namespace). Logged keys (see :mod:`wattlog.session` and :mod:`wattlog.keys`), into the
trainer's ``MLFlowLogger`` run, else MLflow's active run, else a local ``energy/`` folder under
``default_root_dir`` (one warning); the trainer's other loggers get the per-step keys too:

- per train step, at Lightning's step for that batch, every ``log_every_n_steps``:
  ``energy/step_j``, ``energy/power_w``, ``energy/total_j``, ``energy/emissions_g``, and with a GPU
  ``energy/gpu_power_w`` (``energy/gpu{i}_power_w`` with ``per_device=True``);
- at the end of each stage (the trainer's global step, or the key's next free step):
  ``energy/{gpu,cpu,ram}_j``, ``energy/{train,val,test,predict}_j``, ``energy/j_per_sample``,
  ``energy/{val,test,predict}_j_per_sample``, ``energy/avg_power_w``, ``energy/duration_s``,
  ``energy/j_to_target``, ``energy/idle_power_w``, ``energy/dynamic_j``, ``energy/rerun_j``;
- params ``energy.*`` (methods, GPU model and count, carbon intensity, PUE; for a run that evaluates
  another run's checkpoint ``energy.checkpoint_train_j`` and ``energy.checkpoint_run_id``), tags
  ``energy.estimated``, ``energy.degraded``, ``energy.partial``, ``energy.attempts``; artifacts
  ``energy/trace.csv`` and ``energy/power.png``.

Lifecycle: one session per (trainer, run), alive across the trainer's stages; a monitor reused for
another trainer or run starts a fresh session. A checkpoint restores the totals only when a fit
resumes into the run that wrote it; ``validate/test/predict(ckpt_path=...)`` never rewinds them.
"""

from __future__ import annotations

import re
import warnings
import weakref
from time import perf_counter
from typing import Any

from wattlog.errors import ConfigError, WattlogWarning, degrade
from wattlog.integrations import lightning_run as run
from wattlog.ledger import StepLabel
from wattlog.options import MonitorOptions
from wattlog.session import EnergySession, preload


class EnergyMonitor(*run.callback_bases()):  # type: ignore[misc]
    """Log per-step GPU/CPU/RAM energy, power and CO2e of a Lightning run into MLflow.

    Args:
        fit_stage: the name of the fit stage in the summary keys (also settable as the attribute
            before the fit): ``recover`` logs ``energy/recover_j`` and ``energy/recover_j_per_sample``
            instead of ``energy/train_j`` and ``energy/j_per_sample`` (a second, named fit in a run).
        **options: see :class:`wattlog.options.MonitorOptions` (``gpus``, ``cpu``, ``ram``,
            ``cpu_scope``, ``carbon`` or ``country``/``region``/``carbon_intensity``/``pue``,
            ``log_every_n_steps``, ``sync_cuda``, ``per_device``, ``target``, ``idle_baseline_s``,
            ``progress_bar``, ``batch_size_fn``, ``require_mlflow``, ``spool_dir``, ...).

    Raises:
        ConfigError: a bad option (named, with the allowed values), before any hardware is touched.
    """

    def __init__(self, fit_stage: str = "train", **options: Any) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(fit_stage)) or fit_stage in ("val", "test", "predict", "other"):
            raise ConfigError("fit_stage", fit_stage, "a lowercase name other than val/test/predict, e.g. 'recover'")
        self.fit_stage = str(fit_stage)
        self.options = MonitorOptions.from_kwargs(**options)
        if self.options.enabled:
            preload(self.options.cpu)  # imports only: the fit's set-up then starts measuring sooner
        self._count = self.options.count_samples()
        self._session: EnergySession | None = None
        self._owner: tuple[Any, Any] | None = None  # (weakref to the trainer, run id or local folder)
        self._target: run.RunTarget | None = None
        self._restored: dict[str, Any] | None = None
        self._cuda_marks: Any = None
        # the stage's train-batch boundaries, one of the two set while a stage measures: steps that end on
        # the host append to the session's append_boundary; with sync_cuda or CUDA-event marks steps end on
        # the device, through _device_mark (the CUDA marks' mark, or the session's)
        self._append_mark: Any = None
        self._device_mark: Any = None
        self._counters: run.StepCounters | None = None  # the running fit's loop counters
        self._epoch_loop: Any = None  # counters.epoch_loop, read on the hot path
        self._step_before = -1  # device path: optimizer steps completed when the open train batch started
        # this epoch's train batches at index < _full_batches hold _batch_size samples (run.full_batches), so
        # the hot path counts only every 64th of them, to check; the others, and every batch when (0, 0)
        self._batch_size = self._full_batches = 0
        self._train_labels: dict[int, StepLabel] = {}  # device path: one label object per batch size
        self._warned_no_run = False
        self._warned_samples = False

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn, deepcopy: the options, never a live session
        return {**self.__dict__, "_session": None, "_owner": None, "_target": None, "_cuda_marks": None,
                "_append_mark": None, "_device_mark": None, "_counters": None, "_epoch_loop": None}

    # -- stages ------------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.options.enabled:
            run.link_disabled_run(trainer)  # energy=off: no measurement, but the run still joins its sweep
            return
        self._session = session = self._session_for(trainer)
        session.open(run.build_sink(trainer, self._target, self.options, session.report_degraded)
                     if session.rank == 0 else None)
        if self.options.progress_bar:
            run.show_in_progress_bar(trainer, self._progress_text)
        if self.options.idle_baseline_s > 0 and stage == "fit" and self._session.idle_power_w is None:
            self._session.measure_idle(self.options.idle_baseline_s)
        self._start_cuda_marks(trainer)
        self._bind_stage()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._session is not None:
            self._apply_restored(trainer, fit=True)
            self._bind_counters(trainer)  # after the restore: the loop's counters as they run

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._session is not None and self.options.batch_size_fn is None:  # the epoch's loader, maybe reloaded
            self._batch_size, self._full_batches = run.full_batches(trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if run.stage_fn(trainer) == "validate":
            self._apply_restored(trainer, fit=False)
        self._report_step_counter(in_validation=True)
        self._mark(StepLabel("other" if trainer.sanity_checking else "val", trainer.global_step))

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._apply_restored(trainer, fit=False)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._apply_restored(trainer, fit=False)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        value = trainer.callback_metrics.get(self.options.target.metric or "")
        if self._session is not None and value is not None and not trainer.sanity_checking:
            self._session.observe_metric(float(value))
        if run.stage_fn(trainer) == "validate":
            self._end_stage(trainer)
        else:
            self._mark(StepLabel("other"))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_stage(trainer)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_stage(trainer)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_stage(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._session is not None and self._session.collectives is not None:
            self._session.collectives.stop(f"the run failed ({type(exception).__name__}); other ranks' energy "
                                           "since their pumps' last round is missing")
        self._end_stage(trainer, collective=False)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._stop_cuda_marks()
        self._counters = self._epoch_loop = None  # they hold the trainer's loops
        if self._session is not None:
            self._session.suspend()

    # -- batches (training thread: microseconds) ---------------------------------------------
    # One append per train batch: (time, (logged step, samples)). The step counter in it tells the
    # aggregator where optimizer steps end (when it changes), so a step's end is its next batch's start
    # (or the next other boundary: validation, the stage's end). The time after a step's last hook belongs
    # to that step anyway (StepAggregator), so attribution is the same as with a hook at the batch's end.

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        append = self._append_mark
        if append is None:  # energy=off, not set up, or steps that end on the device
            if self._device_mark is not None:
                self._train_batch_start_on_device(trainer, batch, batch_idx)
            return
        loop = self._epoch_loop or self._bind_counters(trainer).epoch_loop
        n = self._batch_size if 0 < batch_idx & 63 and batch_idx < self._full_batches else (
            self._train_samples(batch, batch_idx))
        append((perf_counter(), (loop._batches_that_stepped, n)))  # session.train_batch_started, inlined
        if self._session.awaits_log_step:  # type: ignore[union-attr]
            self._session.log_step()  # type: ignore[union-attr]  # the pump's start, or what it raised

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        counters = self._counters  # sync_cuda or CUDA-event marks: the step ends here, on the device
        if self._device_mark is None or counters is None:
            return
        if counters.optimizer_steps.completed != self._step_before:
            self._step_before = counters.optimizer_steps.completed
            self._end_train_step_on_device(trainer, counters.epoch_loop._batches_that_stepped)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._mark(StepLabel("other" if trainer.sanity_checking else "val", trainer.global_step, self._samples(batch)))

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._mark(StepLabel("test", batch_idx, self._samples(batch)))

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._mark(StepLabel("predict", batch_idx, self._samples(batch)))

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The running totals and the run they belong to (what a checkpoint carries)."""
        if self._session is None:
            return dict(self._restored or {})
        return {**self._session.state_dict(), "run_id": self._target.run_id if self._target else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # applied when the stage starts: see _apply_restored

    # -- helpers -----------------------------------------------------------------------------

    def _session_for(self, trainer: Any) -> EnergySession:
        rank, world = int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))
        target = run.find_run(trainer, self.options) if rank == 0 else run.RunTarget(None, None, None)
        key = target.run_id or "local"
        if self._session is not None and self._owner is not None and self._owner[0]() is trainer and (
                self._owner[1] == key):
            return self._session
        if self._session is not None:  # reused for another trainer or run: a fresh session
            self._session.close()
        if target.run_id is None and rank == 0 and not self._warned_no_run:
            self._warned_no_run = True
            warnings.warn(f"wattlog: no MLflow run: energy is measured and written to {target.local_dir} and the "
                          f"trainer's other loggers. To log into MLflow, {run.NO_RUN_HINT}", WattlogWarning, stacklevel=2)
        from wattlog.integrations.distributed import TorchCollectives

        collectives = TorchCollectives(rank, world, self.options.collective_timeout_s, degrade) if world > 1 else None
        self._target, self._owner = target, (weakref.ref(trainer), key)
        log_every = self.options.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50) or 50)
        return EnergySession(self.options, gpus=run.gpu_selection(trainer, self.options),
                             host=int(getattr(trainer, "local_rank", 0)) == 0, log_every_n_steps=log_every,
                             collectives=collectives, link_tags=run.sweep_tags(trainer) if rank == 0 else None,
                             fit_stage=self.fit_stage)

    def _apply_restored(self, trainer: Any, fit: bool) -> None:
        state, self._restored = self._restored, None
        session = self._session
        if session is None:
            return
        same_run = bool(state) and state.get("run_id") == (self._target.run_id if self._target else None)
        start_step = int(trainer.global_step)  # the first step this fit logs (its loop counters restore later)
        if fit and state and same_run:
            session.resume(state, start_step)
        elif fit:
            session.begin_attempt(start_step)
        if state and not same_run:
            session.record_checkpoint(state, state.get("run_id"))

    def _samples(self, batch: Any) -> int:
        return self._count(batch) or self._no_samples(batch)

    def _train_samples(self, batch: Any, batch_idx: int) -> int:
        """A train batch's samples, counted; where they were predicted (:func:`run.full_batches`), a check."""
        n = self._count(batch) or self._no_samples(batch)
        if batch_idx < self._full_batches and n != self._batch_size:
            if n and batch_idx:
                warnings.warn(f"wattlog: train batch {batch_idx} holds {n} samples, not the loader's batch size "
                              f"{self._batch_size}: counting every batch from now on (the J/sample of up to 63 "
                              "batches before it may be off)", WattlogWarning, 3)
            self._batch_size = self._full_batches = 0
        return n

    def _no_samples(self, batch: Any) -> int:
        if not self._warned_samples:  # J/sample keys need it: say once how to fix it
            self._warned_samples = True
            warnings.warn(f"wattlog: cannot count the samples in a batch of type {type(batch).__name__}; the "
                          "J/sample keys are left out. Pass EnergyMonitor(batch_size_fn=...)", WattlogWarning, 3)
        return 0

    def _train_label(self, samples: int) -> StepLabel:
        """One label object per batch size (a train batch's label is made once, not per step)."""
        return self._train_labels.setdefault(samples, StepLabel("train", None, samples))

    def _bind_counters(self, trainer: Any) -> run.StepCounters:
        """The fit's loop counters (also for a batch hook called without ``on_train_start``: tests, loops)."""
        self._counters = counters = run.StepCounters(trainer)
        self._epoch_loop = counters.epoch_loop
        self._step_before = counters.optimizer_steps.completed  # no step of this fit has ended yet
        return counters

    def _bind_stage(self) -> None:
        """The stage's hot-path calls, fixed once it is set up: steps that end on the host append their
        boundaries to the session's queue; with ``sync_cuda`` or CUDA-event marks they go through those."""
        session = self._session
        assert session is not None
        if self._cuda_marks is None and not self.options.sync_cuda:
            self._append_mark, self._device_mark = session.append_boundary, None
        else:
            self._append_mark = None
            self._device_mark = self._cuda_marks.mark if self._cuda_marks is not None else session.mark

    def _synchronize_if_due(self, trainer: Any, step: int) -> None:
        if self.options.sync_cuda and self._session is not None and self._session.is_log_step(step):
            self._synchronize(trainer)

    def _end_train_step_on_device(self, trainer: Any, step: int) -> None:
        """A train step ends with ``sync_cuda`` (synchronize at logging boundaries) or CUDA-event marks."""
        session = self._session
        if session is None:
            return
        due = session.is_log_step(step)
        if due and self.options.sync_cuda:
            self._synchronize(trainer)
        self._mark(None, step)
        if due:
            session.log_step()

    def _report_step_counter(self, in_validation: bool = False) -> None:
        """At a boundary other than a train batch, the loop's logged-step counter (host path): the last train
        batch's step is numbered if it ended one. Validation within the epoch runs before the loop counts
        the batch's step (``in_validation``): its count is then the one the loop is about to reach."""
        loop, append = self._epoch_loop, self._append_mark
        if loop is not None and append is not None:
            logged = loop._batches_that_stepped + (1 if in_validation and run.ends_step(loop) else 0)
            append((perf_counter(), (logged, None)))

    def _train_batch_start_on_device(self, trainer: Any, batch: Any, batch_idx: int) -> None:
        counters = self._counters or self._bind_counters(trainer)
        self._step_before = counters.optimizer_steps.completed
        self._synchronize_if_due(trainer, counters.epoch_loop._batches_that_stepped)
        n = self._train_samples(batch, batch_idx)
        self._device_mark(self._train_labels.get(n) or self._train_label(n))

    def _mark(self, label: Any, step: int | None = None) -> None:
        if self._session is None:
            return
        if self._cuda_marks is not None:
            self._cuda_marks.mark(label, step)
        elif step is None:
            self._session.mark(label)
        else:
            self._session.step_completed(step)

    def _end_stage(self, trainer: Any, collective: bool = True) -> None:
        if self._session is not None and self._session.measuring:
            self._report_step_counter()
        self._stop_cuda_marks()
        if self._session is not None and self._session.measuring:
            self._session.end_stage(int(trainer.global_step), collective=collective)

    def _progress_text(self) -> dict[str, str]:
        """``{"power": "212 W", "energy": "4.57 kJ"}`` for the progress bar (read on its own refresh)."""
        from wattlog.render import progress_bar_text

        progress = self._session.progress if self._session is not None else {}
        return progress_bar_text(progress["power_w"], progress["total_j"]) if progress else {}

    def _start_cuda_marks(self, trainer: Any) -> None:
        if not self.options.sync_cuda and run.uses_cuda(trainer) and self._session is not None:
            from wattlog.integrations.cuda_marks import CudaBoundaries

            self._cuda_marks = CudaBoundaries(self._session)
            self._cuda_marks.start()

    def _stop_cuda_marks(self) -> None:
        self._append_mark = self._device_mark = None  # the stage is over: train batches mark nothing more
        if self._cuda_marks is not None:  # its queued boundaries reach the session first
            self._cuda_marks.stop()
            self._cuda_marks = None

    @staticmethod
    def _synchronize(trainer: Any) -> None:
        if run.uses_cuda(trainer):
            import torch

            torch.cuda.synchronize()
