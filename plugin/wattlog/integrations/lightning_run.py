"""What the Lightning callback needs to know about a Trainer: its run, its sinks, its GPUs, its step.

Kept apart from the callback so that the callback stays wiring. No import of lightning here:
everything is read off the trainer duck-typed (``lightning.pytorch`` and ``pytorch_lightning``).
"""

from __future__ import annotations

from typing import Any, Callable

from wattlog.integrations.runs import RunTarget, primary_sink, resolve_run
from wattlog.options import MonitorOptions

__all__ = ["RunTarget", "StepCounters", "build_sink", "find_run", "full_batches", "gpu_selection", "logged_step",
           "stage_fn", "uses_cuda"]

NO_RUN_HINT = (
    "add an MLFlowLogger to the Trainer (Trainer(logger=MLFlowLogger(experiment_name=..., "
    "tracking_uri='sqlite:///mlflow.db'))) or start one with mlflow.start_run() before fit"
)


def _is_mlflow_logger(logger: Any) -> bool:
    return type(logger).__name__ == "MLFlowLogger"


def find_run(trainer: Any, options: MonitorOptions) -> RunTarget:
    """The trainer's ``MLFlowLogger`` run, else MLflow's active run, else a local ``energy/`` folder.

    Raises:
        NoRunError: no MLflow run and ``require_mlflow=True`` or strict mode.
    """
    for logger in getattr(trainer, "loggers", []) or []:
        if _is_mlflow_logger(logger):
            return RunTarget(logger.run_id, getattr(logger, "_tracking_uri", None), None)
    return resolve_run(options, getattr(trainer, "default_root_dir", None), who="EnergyMonitor", hint=NO_RUN_HINT)


def build_sink(trainer: Any, target: RunTarget, options: MonitorOptions, on_error: Callable[..., None]) -> Any:
    """The sink of one stage: the MLflow spool (or the local folder) plus the trainer's other loggers."""
    from wattlog.sinks.base import LoggerSink, MultiSink

    primary = primary_sink(target, options, getattr(trainer, "default_root_dir", None))
    others = [lg for lg in getattr(trainer, "loggers", []) or [] if not _is_mlflow_logger(lg)]
    return MultiSink([primary, LoggerSink(others, on_error)]) if others else primary


def gpu_selection(trainer: Any, options: MonitorOptions) -> Any:
    """The GPUs this process trains on: its CUDA root device, ``"none"`` on CPU/MPS, else the option."""
    if options.gpus != "auto":
        return options.gpus
    root = getattr(getattr(trainer, "strategy", None), "root_device", None)
    if root is None:
        return "auto"
    return [root.index or 0] if getattr(root, "type", "") == "cuda" else "none"


def uses_cuda(trainer: Any) -> bool:
    root = getattr(getattr(trainer, "strategy", None), "root_device", None)
    return root is not None and getattr(root, "type", "") == "cuda"


def logged_step(trainer: Any) -> int:
    """The step at which Lightning logs the current train batch's metrics (before it increments)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step) if step is not None else max(0, int(trainer.global_step) - 1)


class StepCounters:
    """Lightning's own counters of the running fit, read in the batch hooks as plain attributes.

    ``optimizer_steps.completed`` is ``trainer.global_step`` and ``epoch_loop._batches_that_stepped``
    is :func:`logged_step`, without the half-dozen properties behind ``trainer.global_step`` (a few
    microseconds per read in a fit, where the caches are cold). Any other layout (another Lightning
    version, a test double) reads the public properties instead.
    """

    __slots__ = ("optimizer_steps", "epoch_loop")

    def __init__(self, trainer: Any) -> None:
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        module = getattr(trainer, "lightning_module", None)
        try:
            if module is None or module.automatic_optimization:
                total = loop.automatic_optimization.optim_progress.optimizer.step.total  # type: ignore[union-attr]
            else:
                total = loop.manual_optimization.optim_step_progress.total  # type: ignore[union-attr]
            ok = total.completed == trainer.global_step and isinstance(loop._batches_that_stepped, int)  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            ok = False
        self.optimizer_steps = total if ok else _Property(trainer, "global_step")
        self.epoch_loop = loop if ok else _Property(trainer, None)


def ends_step(loop: Any) -> bool:
    """Whether the train batch the loop just ran ended an optimizer step, read before the loop counts it
    (validation within the epoch runs first): Lightning's own test, ``not _should_accumulate()``."""
    should_accumulate = getattr(loop, "_should_accumulate", None)
    return not should_accumulate() if callable(should_accumulate) else True


_BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def full_batches(trainer: Any) -> tuple[int, int]:
    """``(batch_size, n)``: the train batches at index ``< n`` of this epoch each hold exactly
    ``batch_size`` samples (as :func:`wattlog.batch.count_samples` counts them), or ``(0, 0)`` when
    that cannot be known without looking at each batch.

    Known only for the plain case, where torch builds every batch itself: one map-style ``DataLoader``
    (not a subclass) with torch's own ``BatchSampler`` and ``default_collate``, and no batch-transfer hook
    of the module or datamodule that could reshape a batch. Then every batch but the epoch's last is
    ``batch_size`` samples (the sampler's length is this rank's share under DDP).
    """
    try:
        from torch.utils.data import BatchSampler, DataLoader, IterableDataset
        from torch.utils.data._utils.collate import default_collate

        loaders = trainer.fit_loop._combined_loader.flattened
        if len(loaders) != 1 or type(loaders[0]) is not DataLoader:
            return 0, 0
        loader = loaders[0]
        sampler = loader.batch_sampler
        if (type(sampler) is not BatchSampler or loader.collate_fn is not default_collate
                or isinstance(loader.dataset, IterableDataset) or not isinstance(sampler.batch_size, int)):
            return 0, 0
        for owner in (trainer.lightning_module, getattr(trainer, "datamodule", None)):
            if owner is not None and any(_overrides(owner, hook) for hook in _BATCH_HOOKS):
                return 0, 0
        return sampler.batch_size, len(sampler.sampler) // sampler.batch_size
    except Exception:  # noqa: BLE001 - an unknown layout: count every batch
        return 0, 0


def _overrides(owner: Any, hook: str) -> bool:
    """``owner`` defines ``hook`` itself (below the Lightning class that declares it), or on the instance."""
    if hook in vars(owner):
        return True
    for cls in type(owner).__mro__:
        if hook in vars(cls):
            return not cls.__module__.startswith(("lightning.", "pytorch_lightning."))
    return False


class _Property:
    """The fallback of :class:`StepCounters`: ``completed`` and ``_batches_that_stepped`` as properties."""

    __slots__ = ("_trainer", "_name")

    def __init__(self, trainer: Any, name: str | None) -> None:
        self._trainer, self._name = trainer, name

    @property
    def completed(self) -> int:
        return int(getattr(self._trainer, self._name or "global_step"))

    @property
    def _batches_that_stepped(self) -> int:
        return logged_step(self._trainer)


def stage_fn(trainer: Any) -> str:
    """``fit``, ``validate``, ``test`` or ``predict``: what the trainer is running."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return str(getattr(fn, "value", fn) or "")


def sweep_tags(trainer: Any = None) -> dict[str, str]:
    """The tags that link this job's run into its wattlog Hydra sweep (``{}`` outside one).

    When the trainer's ``MLFlowLogger`` was given no ``run_name`` (MLflow then draws a random one, the
    same in every job once the app seeds ``random``), also ``mlflow.runName``: the job's differing
    override values (:func:`wattlog.integrations.sweep_context.run_name`).
    """
    from wattlog.integrations.sweep_context import sweep_link_tags, sweep_run_name

    tags = sweep_link_tags()
    unnamed = [lg for lg in getattr(trainer, "loggers", []) or []
               if _is_mlflow_logger(lg) and getattr(lg, "_run_name", "") is None]
    name = sweep_run_name() if tags and unnamed else None
    if name:
        tags["mlflow.runName"] = name
    return tags


def link_disabled_run(trainer: Any) -> None:
    """For a disabled monitor in a sweep: tag the trainer's MLflow run through its own logger (rank 0)."""
    tags = sweep_tags() if int(getattr(trainer, "global_rank", 0)) == 0 else {}
    if not tags:
        return
    for logger in getattr(trainer, "loggers", []) or []:
        if _is_mlflow_logger(logger):
            for key, value in tags.items():
                logger.experiment.set_tag(logger.run_id, key, value)


def show_in_progress_bar(trainer: Any, text: Callable[[], dict[str, str]]) -> None:
    """Add ``text()`` (strings such as ``"212 W"``) to the trainer's progress bar, read at its refresh.

    ``LightningModule.log`` takes numbers only (the bar would print ``0.000`` or a cut exponent) and
    costs about a millisecond on the training thread; the bar's ``get_metrics`` takes strings.
    """
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or getattr(bar, "_wattlog_text", None) is not None:
        if bar is not None:
            bar._wattlog_text = text
        return
    original = bar.get_metrics
    bar._wattlog_text = text

    def get_metrics(*args: Any, **kwargs: Any) -> dict[str, Any]:
        metrics = original(*args, **kwargs)
        try:
            metrics.update(bar._wattlog_text())
        except Exception:  # noqa: BLE001 - the bar must never fail the run
            pass
        return metrics

    bar.get_metrics = get_metrics


def callback_bases() -> tuple[type, ...]:
    """The ``Callback`` class of each installed Lightning namespace (``lightning.pytorch``, ``pytorch_lightning``)."""
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
