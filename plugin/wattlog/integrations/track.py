"""``wattlog.track()``: per-step energy of a Lightning Fabric or plain PyTorch loop, in an MLflow run.

Example::

    import mlflow, wattlog

    with mlflow.start_run(), wattlog.track() as energy:
        for step, batch in enumerate(loader):
            loss = train_step(batch)
            mlflow.log_metric("loss", loss, step=step)
            energy.step(step)                # this step ended; the next one starts now
        with energy.stage("eval"):           # counted as val, not as a training step
            evaluate()

Logged keys (the same as :class:`wattlog.EnergyMonitor`'s), into ``run_id``, else MLflow's active
run, else ``MLFLOW_RUN_ID``, else a local ``energy/`` folder under ``root_dir`` (one warning):

- per step, at the step passed to :meth:`Tracker.step`, every ``log_every_n_steps`` (default 1;
  Lightning's rule ``(step + 1) % n == 0``): ``energy/step_j``, ``energy/power_w``, ``energy/total_j``,
  ``energy/emissions_g``, with a GPU ``energy/gpu_power_w`` (``energy/gpu{i}_power_w`` with ``per_device``);
- when the ``with`` block ends, at the last step + 1 (or the key's next free step): ``energy/{gpu,cpu,ram}_j``,
  ``energy/{train,val,test,predict}_j``, ``energy/j_per_sample`` (``samples`` given to ``step``),
  ``energy/{val,test,predict}_j_per_sample``, ``energy/avg_power_w``, ``energy/duration_s``,
  ``energy/j_to_target`` (see :meth:`Tracker.observe`), ``energy/idle_power_w``, ``energy/dynamic_j``;
- params ``energy.*``, tags ``energy.estimated``/``energy.degraded``/``energy.partial``/``energy.attempts``,
  artifacts ``energy/trace.csv`` and ``energy/power.png``.

DDP (Fabric, torchrun): enter ``track()`` after the process group is initialised (after
``fabric.launch()``); each rank measures its own GPU, rank 0 logs the job's sums into one run, and
every rank must call :meth:`Tracker.step` with the same steps (a collective every 50 steps).
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

from wattlog.integrations.loop import LoopEnergy, current_placement, stage_name
from wattlog.options import MonitorOptions

__all__ = ["Tracker", "track"]

NO_RUN_HINT = "wrap the loop in mlflow.start_run(), or pass wattlog.track(run_id=...)"


class Tracker:
    """What ``with wattlog.track() as energy`` gives: :meth:`step`, :meth:`stage`, :meth:`observe`."""

    def __init__(self, options: MonitorOptions, run_id: str | None, tracking_uri: str | None, device: Any,
                 root_dir: str | None) -> None:
        self.options = options
        self._args = (run_id, tracking_uri, device, root_dir)
        self._loop: LoopEnergy | None = None
        self._stage = "train"
        self._last_step = -1
        self._done_run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        """The MLflow run the energy goes (or went) to (None: a local folder, another rank, or not entered)."""
        return self._loop.run_id if self._loop is not None else self._done_run_id

    def __enter__(self) -> Tracker:
        run_id, tracking_uri, device, root_dir = self._args
        self._loop = LoopEnergy(self.options, current_placement(device), root_dir=root_dir, run_id=run_id,
                                tracking_uri=tracking_uri, who="wattlog.track()", hint=NO_RUN_HINT)
        if self._loop.begin(fallback_run_id=os.environ.get("MLFLOW_RUN_ID"), idle=True):
            self._loop.mark("train")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        self._done_run_id = loop.run_id
        try:
            if exc is not None:
                loop.fail(exc, self._last_step + 1)
            else:
                loop.end(self._last_step + 1)
        finally:
            loop.close()

    def step(self, step: int, samples: int = 0) -> None:
        """Training step ``step`` ended (its metrics are logged at ``step``); the next step starts now.

        Args:
            step: the step at which the loop logs this step's metrics (increasing).
            samples: the step's samples, for ``energy/j_per_sample``.
        """
        loop = self._loop
        if loop is None:
            return
        if samples:
            loop.mark("train", samples=samples)  # joins the open step's record
        loop.step_done(int(step))
        self._last_step = int(step)
        loop.mark("train")  # the next step (after the last one: train energy of no step, no point)

    def stage(self, name: str, samples: int = 0) -> _StageScope:
        """From now on the loop runs ``name`` (``"train"``, ``"eval"``/``"val"``, ``"test"``, ``"predict"``,
        ``"other"``); as a ``with`` block, the previous stage resumes at its end.

        Raises:
            ConfigError: an unknown stage name.
        """
        stage = stage_name(name)
        scope = _StageScope(self, self._stage)
        self._enter(stage, samples)
        return scope

    def observe(self, name: str, value: float) -> None:
        """A metric value; with ``target={"metric": name, ...}`` it can set ``energy/j_to_target``."""
        if self._loop is not None:
            self._loop.observe({name: value})

    def _enter(self, stage: str, samples: int = 0) -> None:
        self._stage = stage
        if self._loop is not None:
            self._loop.mark(stage, self._last_step + 1, samples)


class _StageScope:
    def __init__(self, tracker: Tracker, previous: str) -> None:
        self._tracker, self._previous = tracker, previous

    def __enter__(self) -> Tracker:
        return self._tracker

    def __exit__(self, *exc: object) -> None:
        self._tracker._enter(self._previous)


def track(run_id: str | None = None, *, tracking_uri: str | None = None, device: Any = None,
          root_dir: str | None = None, **options: Any) -> Tracker:
    """Measure the energy of the loop inside ``with track() as energy:`` (see the module docstring).

    Args:
        run_id: the MLflow run to log into (default: the active run, else ``MLFLOW_RUN_ID``).
        tracking_uri: the store of ``run_id`` (default: MLflow's current tracking URI).
        device: the device this process trains on (torch.device, ``"cuda:1"``, index); default the
            current CUDA device when torch uses CUDA, else CPU (no GPU measured).
        root_dir: where the local ``energy/`` folder and the spool go (default: the working directory).
        **options: see :class:`wattlog.options.MonitorOptions`.

    Raises:
        ConfigError: a bad option, before any hardware is touched.
        NoRunError: (on entering) no MLflow run and ``require_mlflow=True`` or strict mode.
    """
    return Tracker(MonitorOptions.from_kwargs(**options), run_id, tracking_uri, device, root_dir)
