"""LoopEnergy: one run's energy session for step loops (Hugging Face ``Trainer``, Lightning Fabric, plain PyTorch).

The logic the thin adapters share, kept out of their hooks: find the run, build the stage's sink,
choose the GPUs, set up DDP collectives and CUDA-event boundaries, and map the loop's calls onto
:class:`wattlog.session.EnergySession`. No torch, transformers or mlflow import at module level.

Steps are the loop's own: :meth:`LoopEnergy.step_done` takes the step at which the framework logs
that optimizer step's metrics (HF: ``state.global_step``; a plain loop: whatever it passes to
``mlflow.log_metric(..., step=)``), so ``energy/step_j`` overlays the loss exactly.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

from wattlog.errors import ConfigError, WattlogWarning, degrade
from wattlog.integrations import runs
from wattlog.ledger import StepLabel
from wattlog.options import MonitorOptions
from wattlog.session import EnergySession

STAGES = {"train": "train", "fit": "train", "val": "val", "eval": "val", "evaluate": "val", "validate": "val",
          "validation": "val", "test": "test", "predict": "predict", "other": "other", "idle": "other"}
"""Stage names an adapter or user may pass, and the stage each is accounted as."""

DDP_DRAIN_EVERY = 50
"""Under DDP without a framework logging cadence: the steps at which every rank checks in with its pump
(the first starts it; the pump itself gathers every 0.25 s, off the training thread)."""


def stage_name(stage: str) -> str:
    """The accounted stage of a user-facing name (``"eval"`` -> ``"val"``).

    Raises:
        ConfigError: an unknown stage name.
    """
    if not isinstance(stage, str) or stage.lower() not in STAGES:
        raise ConfigError("stage", stage, sorted(STAGES))
    return STAGES[stage.lower()]


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its global rank, the job's size, its rank on the node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None  # a torch.device, "cuda:1", a CUDA index, or None (unknown)


def current_placement(device: Any = None) -> Placement:
    """This process's placement from an initialised ``torch.distributed`` (else a single process).

    ``LOCAL_RANK`` (set by torchrun, accelerate and Fabric) gives the rank on the node. Without
    ``device``, the current CUDA device when torch is in use with CUDA, else CPU.
    """
    import os

    torch = sys.modules.get("torch")
    rank, world = 0, 1
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
    if device is None and torch is not None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return Placement(rank, world, local, device)


def cuda_index(device: Any) -> int | None:
    """The CUDA index of ``device`` (torch.device, ``"cuda:1"``, ``"cuda"``, int), None for a non-CUDA device."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    kind = getattr(device, "type", None)
    if kind is not None:
        return (device.index or 0) if kind == "cuda" else None
    text = str(device)
    if text.startswith("cuda"):
        return int(text.split(":", 1)[1]) if ":" in text else 0
    return None


class LoopEnergy:
    """One run's energy for a step loop: the adapters' shared driver (see the module docstring).

    Args:
        options: validated monitor options.
        placement: rank, world size, local rank and device of this process.
        root_dir: parent of the local ``energy/`` folder (no MLflow run) and of the default spool.
        run_id, tracking_uri: an explicit MLflow run; default the active run.
        drain_every: under DDP, check in with the session's pump when ``step % drain_every == 0``.
        first_step: the number of the loop's first step (1 for Hugging Face's ``global_step``).
        who, hint: for the "no MLflow run" warning and error.
    """

    def __init__(self, options: MonitorOptions, placement: Placement, *, root_dir: str | None = None,
                 run_id: str | None = None, tracking_uri: str | None = None, drain_every: int = DDP_DRAIN_EVERY,
                 who: str = "wattlog", hint: str = "start one with mlflow.start_run()", first_step: int = 0) -> None:
        self.options = options
        self.placement = placement
        self.root_dir = root_dir
        self.session: EnergySession | None = None
        self.target: runs.RunTarget | None = None
        self._run_id, self._tracking_uri = run_id, tracking_uri
        self.drain_every = max(1, int(drain_every))
        self.first_step = int(first_step)
        self._who, self._hint = who, hint
        self._cuda_marks: Any = None
        self._warned_no_run = False
        self._stage_open = False

    @property
    def run_id(self) -> str | None:
        """The MLflow run this session logs into (None: a local folder, or not rank 0)."""
        return self.target.run_id if self.target is not None else None

    @property
    def measuring(self) -> bool:
        return self.session is not None and self.session.measuring

    def begin(self, fallback_run_id: str | None = None, idle: bool = False) -> bool:
        """A stage starts: resolve the run, (re)use its session, open the stage's sink and meter.

        Returns False when the options disable measuring. A different run than the last stage's gets
        a fresh session (fresh totals); ``idle`` measures ``idle_baseline_s`` first (once per session).
        """
        if not self.options.enabled:
            return False
        if self.measuring:
            return True
        p = self.placement
        target = (runs.resolve_run(self.options, self.root_dir, run_id=self._run_id, fallback_run_id=fallback_run_id,
                                   tracking_uri=self._tracking_uri, who=self._who, hint=self._hint)
                  if p.rank == 0 else runs.RunTarget(None, None, None))
        if self.session is None or target != self.target:
            self._new_session(target)
        session = self.session
        assert session is not None
        session.open(runs.primary_sink(target, self.options, self.root_dir) if p.rank == 0 else None)
        self._stage_open = True
        if idle and self.options.idle_baseline_s > 0 and session.idle_power_w is None:
            session.measure_idle(self.options.idle_baseline_s)
        self._start_cuda_marks()
        return True

    # -- the training thread's calls (microseconds) --------------------------------------------

    def mark(self, stage: str, step: int | None = None, samples: int = 0) -> None:
        """What follows is a batch (or stretch) of ``stage``; train steps get their step from :meth:`step_done`."""
        self._mark(StepLabel(stage, None if stage == "train" else step, int(samples)))

    def step_done(self, step: int) -> None:
        """The open train step ended; its metrics are logged at ``step``. Drains at logging boundaries."""
        session = self.session
        if session is None or not session.measuring:
            return
        due = session.is_log_step(step)
        if self.options.sync_cuda and due:
            self._synchronize()
        self._mark(None, step)
        if self.placement.world_size == 1 or step % self.drain_every == 0:
            session.log_step()

    def observe(self, metrics: Any, prefix: str = "") -> None:
        """Metric values: the target's metric (or ``prefix`` + it) counts for ``energy/j_to_target``."""
        name = self.options.target.metric
        if self.session is None or name is None or not metrics:
            return
        value = metrics.get(name, metrics.get(prefix + name))
        if value is not None:
            self.session.observe_metric(float(value))

    def end(self, step: int, collective: bool = True) -> None:
        """End of the stage: summary at ``step``, params, tags, artifacts; then nothing stays open."""
        self._stop_cuda_marks()
        session = self.session
        if session is None or not self._stage_open:
            return
        self._stage_open = False
        try:
            if session.measuring:
                session.end_stage(int(step), collective=collective)
        finally:
            session.suspend()

    def fail(self, exc: BaseException, step: int) -> None:
        """The loop raised: stop collecting from other ranks, log what this rank has, close."""
        if self.session is not None and self.session.collectives is not None:
            self.session.collectives.stop(f"the run failed ({type(exc).__name__}); other ranks' energy since the "
                                          "last logging boundary is missing")
        self.end(step, collective=False)

    def close(self) -> None:
        """Release everything (idempotent)."""
        self._stop_cuda_marks()
        if self.session is not None:
            self.session.close()

    # -- internals ---------------------------------------------------------------------------

    def _new_session(self, target: runs.RunTarget) -> None:
        if self.session is not None:
            self.session.close()
        p = self.placement
        if target.run_id is None and p.rank == 0 and not self._warned_no_run:
            self._warned_no_run = True
            warnings.warn(f"wattlog: no MLflow run: energy is measured and written to {target.local_dir}. To log "
                          f"into MLflow, {self._hint}", WattlogWarning, stacklevel=4)
        collectives = None
        if p.world_size > 1:
            from wattlog.integrations.distributed import TorchCollectives

            collectives = TorchCollectives(p.rank, p.world_size, self.options.collective_timeout_s, degrade)
        from wattlog.integrations.sweep_context import sweep_link_tags

        self.target = target
        self.session = EnergySession(self.options, gpus=self._gpus(), host=p.local_rank == 0,
                                     log_every_n_steps=self.options.log_every_n_steps or 1, first_step=self.first_step,
                                     collectives=collectives,
                                     link_tags=sweep_link_tags() if p.rank == 0 else None)

    def _gpus(self) -> Any:
        if self.options.gpus != "auto" or self.placement.device is None:
            return self.options.gpus
        index = cuda_index(self.placement.device)
        return [index] if index is not None else "none"

    def _uses_cuda(self) -> bool:
        return cuda_index(self.placement.device) is not None and "torch" in sys.modules

    def _mark(self, label: Any, step: int | None = None) -> None:
        session = self.session
        if session is None:
            return
        if self._cuda_marks is not None:
            self._cuda_marks.mark(label, step)
        elif step is None:
            session.mark(label)
        else:
            session.step_completed(step)

    def _start_cuda_marks(self) -> None:
        if not self.options.sync_cuda and self._uses_cuda() and self.session is not None:
            from wattlog.integrations.cuda_marks import CudaBoundaries

            self._cuda_marks = CudaBoundaries(self.session)
            self._cuda_marks.start()

    def _stop_cuda_marks(self) -> None:
        if self._cuda_marks is not None:  # its queued boundaries reach the session first
            self._cuda_marks.stop()
            self._cuda_marks = None

    def _synchronize(self) -> None:
        if self._uses_cuda():
            import torch

            torch.cuda.synchronize()
