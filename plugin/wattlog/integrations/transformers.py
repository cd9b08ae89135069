"""EnergyCallback: the Hugging Face ``transformers.Trainer`` callback. Wiring only, over :class:`LoopEnergy`.

Use it with ``TrainingArguments(report_to="mlflow")``: it logs into the run the Trainer's
``MLflowCallback`` uses (MLflow's active run, which honours ``MLFLOW_RUN_ID``), else ``MLFLOW_RUN_ID``,
else a local ``energy/`` folder under ``output_dir`` (one warning; an error with ``require_mlflow=True``
or ``WATTLOG_STRICT=1``). Logged keys, the same as :class:`wattlog.EnergyMonitor`'s:

- per optimizer step (all its gradient-accumulation micro-batches), at ``state.global_step`` (the step
  at which the Trainer logs ``loss``), every ``log_every_n_steps`` (default 1; the Trainer's own rule
  ``global_step % n == 0``, so with ``n = logging_steps`` energy and ``loss`` share their steps):
  ``energy/step_j``, ``energy/power_w``, ``energy/total_j``, ``energy/emissions_g``, with a GPU ``energy/gpu_power_w`` (``energy/gpu{i}_power_w`` with ``per_device``);
- at the end of ``train()`` and of a standalone ``evaluate()``/``predict()``, at ``state.global_step``
  (or the key's next free step): ``energy/{gpu,cpu,ram}_j``, ``energy/{train,val,predict}_j``,
  ``energy/j_per_sample``, ``energy/{val,predict}_j_per_sample``, ``energy/avg_power_w``,
  ``energy/duration_s``, ``energy/j_to_target`` (``target`` metric, with or without the ``eval_`` prefix),
  ``energy/idle_power_w``, ``energy/dynamic_j``;
- params ``energy.*``, tags ``energy.estimated``, ``energy.degraded``, ``energy.partial``,
  ``energy.attempts``; artifacts ``energy/trace.csv`` and ``energy/power.png``.

Stages: evaluation inside ``train()`` counts as ``val``; ``evaluate()`` on its own is a ``val`` stage,
``predict()`` a ``predict`` stage. Transformers calls no callback before the first batch of a standalone
``evaluate()``/``predict()``, so that batch is not measured (evaluation inside ``train()`` is whole).
Samples: ``per_device_train_batch_size x gradient_accumulation_steps`` per optimizer step (per rank),
``per_device_eval_batch_size`` per evaluation batch. DDP (accelerate, torchrun): each rank measures
its own GPU, CPU and RAM once per node, rank 0 logs the job's sums into one run; the collective runs
at the Trainer's logging steps (``logging_steps``). Transformers has no exception hook: after a
failed ``train()`` the session is closed when the callback is garbage-collected or at exit.
"""

from __future__ import annotations

import os
import sys
import weakref
from typing import Any

from wattlog.integrations.loop import LoopEnergy, Placement
from wattlog.options import MonitorOptions

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised without transformers
    raise ImportError("EnergyCallback needs transformers: pip install 'wattlog[transformers]'") from exc

NO_RUN_HINT = ("pass TrainingArguments(report_to='mlflow') (with MLFLOW_TRACKING_URI set), or start a run with "
               "mlflow.start_run() around trainer.train()")


class EnergyCallback(TrainerCallback):
    """Log per-step GPU/CPU/RAM energy, power and CO2e of a ``transformers.Trainer`` run into MLflow.

    Args:
        **options: see :class:`wattlog.options.MonitorOptions` (``gpus``, ``cpu``, ``ram``, ``carbon``
            or ``country``/``carbon_intensity``/``pue``, ``log_every_n_steps``, ``sync_cuda``,
            ``per_device``, ``target``, ``idle_baseline_s``, ``require_mlflow``, ``spool_dir``, ...).
            ``progress_bar`` and ``batch_size_fn`` have no effect here.

    Raises:
        ConfigError: a bad option, before any hardware is touched.
    """

    def __init__(self, **options: Any) -> None:
        self.options = MonitorOptions.from_kwargs(**options)
        if self.options.enabled:
            from wattlog.session import preload

            preload(self.options.cpu)  # imports only: the first stage's set-up then starts measuring sooner
        self._loop: LoopEnergy | None = None
        self._training = False
        self._standalone: str | None = None  # "val"/"predict": a standalone evaluate()/predict() is measured

    def __getstate__(self) -> dict[str, Any]:  # deepcopy, pickling: the options, never a live session
        return {**self.__dict__, "_loop": None, "_training": False, "_standalone": None}

    # -- train ---------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loop = self._loop_for(args, state)
        loop.end(state.global_step, collective=False)  # a stage a failed train()/evaluate() left open
        self._training = loop.begin(fallback_run_id=os.environ.get("MLFLOW_RUN_ID"), idle=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._training:
            self._loop.mark("train", samples=args.per_device_train_batch_size * args.gradient_accumulation_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._training:
            self._loop.step_done(state.global_step)
            self._evaluation_follows(state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._training:
            self._evaluation_follows(state, control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._training:
            self._training = False
            self._loop.end(state.global_step)

    # -- evaluate / predict --------------------------------------------------------------------

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._training:
            self._loop.mark("val", state.global_step, args.per_device_eval_batch_size)
            return
        if self._standalone is None and self.options.enabled:
            self._begin_standalone(args, state)
        if self._standalone is not None:
            self._loop.mark(self._standalone, state.global_step, args.per_device_eval_batch_size)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if self._loop is not None:
            self._loop.observe(metrics, prefix="eval_")
        if self._training:
            self._loop.mark("other")  # checkpointing and the rest until the next step
        else:
            self._end_standalone(state)

    def on_predict(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        self._end_standalone(state)

    # -- helpers -------------------------------------------------------------------------------

    def _loop_for(self, args: Any, state: Any) -> LoopEnergy:
        if self._loop is None:
            placement = Placement(int(args.process_index), int(args.world_size), int(args.local_process_index),
                                  args.device)
            self._loop = LoopEnergy(self.options, placement, root_dir=args.output_dir, who="EnergyCallback",
                                    hint=NO_RUN_HINT, first_step=1)  # global_step counts from 1
            weakref.finalize(self, self._loop.close)  # no exception hook in transformers: close when dropped
        self._loop.drain_every = max(1, int(getattr(state, "logging_steps", 0) or args.logging_steps or 50))
        return self._loop

    def _evaluation_follows(self, state: Any, control: Any) -> None:
        if control.should_evaluate:  # DefaultFlowCallback (always first) decided: evaluation runs next
            self._loop.mark("val", state.global_step)

    def _begin_standalone(self, args: Any, state: Any) -> None:
        loop = self._loop_for(args, state)
        fallback = os.environ.get("MLFLOW_RUN_ID") or loop.run_id  # evaluate() after train(): the train's run
        if loop.begin(fallback_run_id=fallback):
            self._standalone = _calling_stage()

    def _end_standalone(self, state: Any) -> None:
        if self._standalone is not None:
            self._standalone = None
            self._loop.end(state.global_step)


def _calling_stage() -> str:
    """``"predict"`` when ``Trainer.predict`` is on the stack, else ``"val"`` (``evaluate``).

    Transformers tells callbacks which loop runs only when it ends (``on_evaluate`` / ``on_predict``);
    the stage must be known at its first batch. Read once per standalone stage, never per batch.
    """
    frame = sys._getframe(1)
    for _ in range(16):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            break
        if frame.f_code.co_name in ("predict", "evaluate") and hasattr(frame.f_locals.get("self"), "callback_handler"):
            return "predict" if frame.f_code.co_name == "predict" else "val"
    return "val"
