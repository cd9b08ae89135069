"""The fine-tune job: train a sequence classifier with EnergyMonitor, test it, save the checkpoint.

MLflow (run in experiment ``cfg.mlflow.experiment``): ``train_loss``, ``val_loss``, ``val_acc``,
``test_loss``, ``test_acc``, ``train_samples``, the ``energy/*`` keys of EnergyMonitor, the resolved
config as params, tag ``checkpoint_dir``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from examples.bert_finetune import tracking
from examples.bert_finetune.data import load_splits
from examples.bert_finetune.model import load_classifier, load_tokenizer

log = logging.getLogger(__name__)


def model_short_name(name: str) -> str:
    """``minilm``, ``bert-base-uncased``, or the last path component of a local checkpoint."""
    return Path(str(name).rstrip("/")).name or str(name)


def finetune_run_name(cfg: DictConfig) -> str:
    """Default run name, e.g. ``minilm-p32-n512-e1``."""
    if cfg.mlflow.get("run_name"):
        return str(cfg.mlflow.run_name)
    n = cfg.data.max_train_samples if cfg.data.max_train_samples is not None else "all"
    return f"{model_short_name(cfg.model.name)}-p{cfg.trainer.precision}-n{n}-e{cfg.trainer.max_epochs}"


def build_trainer(cfg: DictConfig, logger: Any, callbacks: list[Any], **overrides: Any) -> Any:
    """A Lightning ``Trainer`` from ``cfg.trainer`` (no checkpointing: the job saves the HF model)."""
    import lightning.pytorch as pl  # noqa: PLC0415

    t = cfg.trainer
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator, devices=t.devices, precision=t.precision, max_epochs=t.max_epochs,
        max_steps=t.max_steps, log_every_n_steps=t.log_every_n_steps, val_check_interval=t.val_check_interval,
        limit_val_batches=t.get("limit_val_batches", 1.0), logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=t.get("progress_bar", True),
        num_sanity_val_steps=0, deterministic=False,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def finetune(cfg: DictConfig, logger: Any) -> dict[str, float]:
    """Fine-tune ``cfg.model.name`` on ``cfg.data``; returns the final metrics (``val_acc``, ``test_acc``...)."""
    import lightning.pytorch as pl  # noqa: PLC0415

    from examples.bert_finetune.module import SentimentClassifier, SentimentData  # noqa: PLC0415

    for group in ("prune", "quantize"):
        if cfg[group].name != "none":
            from wattlog.errors import ConfigError  # noqa: PLC0415

            raise ConfigError(f"{group}.name", cfg[group].name, "none with task=finetune (use task=compress)")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    callbacks = tracking.energy_callbacks(cfg)  # bad energy config fails before any loading
    splits = load_splits(cfg.data)
    tokenizer = load_tokenizer(cfg.model.name)
    data = SentimentData(splits, tokenizer, cfg.data.max_length, cfg.data.batch_size, cfg.data.eval_batch_size,
                         cfg.data.num_workers)
    module = SentimentClassifier(load_classifier(cfg.model.name, cfg.model.num_labels), cfg.optim.lr,
                                 cfg.optim.weight_decay, cfg.optim.warmup_ratio)
    logger.log_metrics({"train_samples": float(len(splits.train[0]))})
    trainer = build_trainer(cfg, logger, callbacks)
    module.model.train()  # from_pretrained returns eval mode; Lightning keeps the mode it finds
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.test(module, datamodule=data, verbose=False)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    out = Path(cfg.checkpoint_dir).expanduser().resolve()
    module.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.experiment.set_tag(logger.run_id, "checkpoint_dir", str(out))
    log.info("saved fine-tuned model to %s; test_acc=%.4f", out, metrics.get("test_acc", float("nan")))
    return metrics
