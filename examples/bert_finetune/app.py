"""The Hydra app of the BERT example: ``python -m examples.bert_finetune [task=finetune|compress] ...``.

``task=finetune`` (default) fine-tunes and saves ``checkpoint_dir``; ``task=compress`` evaluates a pruned
(and recovered), distilled and/or quantised copy of it. In a ``-m`` sweep a failing job (for example ``quantize=fp16`` on a CPU) is
recorded as a FAILED run tagged ``wattlog.error`` and the sweep goes on; a single run re-raises.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from wattlog.errors import ConfigError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_NAME = "bert_finetune"
TASKS = ("finetune", "compress")


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from hydra.types import RunMode  # noqa: PLC0415

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _task(cfg: DictConfig) -> tuple[Callable[[DictConfig, Any], dict[str, float]], str]:
    if cfg.task == "finetune":
        from examples.bert_finetune.train import finetune, finetune_run_name  # noqa: PLC0415

        return finetune, finetune_run_name(cfg)
    if cfg.task == "compress":
        from examples.bert_finetune.evaluate import compress_run_name, evaluate  # noqa: PLC0415

        return evaluate, compress_run_name(cfg)
    raise ConfigError("task", cfg.task, TASKS)


def quiet_libraries() -> None:
    """Keep the job's log to warnings and the app's own progress: Lightning's info lines ("GPU available:
    False", "💡 Tip: ...", "`Trainer.fit` stopped") and transformers' weight-loading bars are left out."""
    import importlib.util  # noqa: PLC0415

    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            importlib.import_module(name)  # its import sets its logger to INFO: import first, then quieten
            logging.getLogger(name).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    # Lightning 2.6's own use of a deprecated torch pytree API: nothing a user of this app can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def run_task(cfg: DictConfig, *, reraise: bool | None = None) -> dict[str, Any]:
    """Run ``cfg.task`` in its own MLflow run; returns its metrics, or ``{"status": "FAILED", ...}``.

    Args:
        cfg: the composed ``bert_finetune`` config.
        reraise: re-raise a job's exception after recording it; default: only outside a multirun.
    """
    from examples.bert_finetune import tracking  # noqa: PLC0415

    quiet_libraries()
    task, run_name = _task(cfg)
    logger = tracking.make_logger(cfg, run_name, tags={"task": str(cfg.task)})
    tracking.log_config(logger, cfg)
    try:
        metrics = task(cfg, logger)
    except Exception as exc:
        tracking.mark_failed(logger, exc)
        if reraise if reraise is not None else not _in_multirun():
            raise
        log.error("job %s failed, recorded as FAILED run %s (the sweep continues): %s", run_name,
                  logger.run_id, exc)
        return {"status": "FAILED", "error": f"{type(exc).__name__}: {exc}", "run_id": logger.run_id}
    return {"status": "FINISHED", "run_id": logger.run_id, **metrics}
