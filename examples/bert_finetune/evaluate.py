"""The compression job: load the fine-tuned checkpoint, prune, quantise, and measure the result.

MLflow (experiment ``cfg.mlflow.experiment``): ``test_acc``, ``test_loss``, ``model_size_mb``,
``sparsity``, ``params_total``, ``params_nonzero``, ``recovery_steps``, ``test_latency_ms_per_sample``,
``test_samples`` and EnergyMonitor's test keys (``energy/test_j_per_sample``, ``energy/test_j``...).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from examples.bert_finetune import compress, tracking
from examples.bert_finetune.data import load_splits
from examples.bert_finetune.model import load_classifier, load_tokenizer
from examples.bert_finetune.train import build_trainer
from wattlog.errors import ConfigError

log = logging.getLogger(__name__)


def compress_run_name(cfg: DictConfig) -> str:
    """Default run name, e.g. ``l1_unstructured0.5-int8_dynamic`` or ``none-none``."""
    if cfg.mlflow.get("run_name"):
        return str(cfg.mlflow.run_name)
    p = cfg.prune
    prune = p.name if p.name == "none" else f"{p.name}{p.amount:g}"
    if p.name == "structured":
        prune += f"{p.get('granularity', 'heads')}"
    if p.get("finetune_steps", 0):
        prune += f"+ft{p.finetune_steps}"
    return f"{prune}-{cfg.quantize.name}"


def check(cfg: DictConfig) -> str:
    """Validate the compression options against the device; returns the device type."""
    device = compress.resolve_device_type(str(cfg.trainer.accelerator))
    compress.check_compatible(cfg.prune.name, float(cfg.prune.get("amount", 0.0)), cfg.quantize.name, device,
                              str(cfg.prune.get("granularity", "heads")))
    return device


def warmup(model: Any, data: Any, batches: int, device: str) -> None:
    """Run ``batches`` unmetered forward passes on the first test batches (kernel selection, caches)."""
    import torch  # noqa: PLC0415

    if batches <= 0:
        return
    model.to(device)
    with torch.inference_mode():
        for i, batch in enumerate(data.test_dataloader()):
            if i >= batches:
                break
            model(**{k: v.to(device) for k, v in batch.items()})


def evaluate(cfg: DictConfig, logger: Any) -> dict[str, float]:
    """Compress the checkpoint ``cfg.checkpoint_dir`` per ``cfg.prune``/``cfg.quantize`` and test it."""
    import lightning.pytorch as pl  # noqa: PLC0415

    from examples.bert_finetune.module import LatencyTimer, SentimentClassifier, SentimentData  # noqa: PLC0415

    device = check(cfg)
    ckpt = Path(cfg.checkpoint_dir).expanduser().resolve()
    if not (ckpt / "config.json").is_file():
        raise ConfigError("checkpoint_dir", str(ckpt),
                          "a fine-tuned model directory: run `python -m examples.bert_finetune` first")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    callbacks = tracking.energy_callbacks(cfg)
    splits = load_splits(cfg.data)
    tokenizer = load_tokenizer(str(ckpt))
    data = SentimentData(splits, tokenizer, cfg.data.max_length, cfg.data.batch_size, cfg.data.eval_batch_size, 0)
    model = load_classifier(str(ckpt), cfg.model.num_labels).eval()
    size_before = compress.model_size_mb(model)

    p = cfg.prune
    steps = int(p.get("finetune_steps", 0) or 0)
    recovery = (data.train_dataloader(), steps, float(cfg.optim.lr)) if steps and p.name != "none" else None
    pruned = compress.prune_model(model, p.name, float(p.get("amount", 0.0)), str(p.get("granularity", "heads")),
                                  recovery)
    model = compress.quantize_model(model, cfg.quantize.name, device)
    total, nonzero = compress.count_params(model)
    stats = {
        "model_size_mb": compress.model_size_mb(model),
        "model_size_mb_before": size_before,
        "sparsity": pruned.sparsity,
        "params_total": float(total),
        "params_nonzero": float(nonzero),
        "recovery_steps": float(steps if recovery else 0),
    }
    logger.log_metrics(stats)

    warmup(model, data, int(cfg.get("eval", {}).get("warmup_batches", 1)), device)
    timer = LatencyTimer()
    trainer = build_trainer(cfg, logger, [*callbacks, timer], precision="32-true")
    trainer.test(SentimentClassifier(model), datamodule=data, verbose=False)
    metrics = {**stats, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
    log.info("%s: test_acc=%.4f size=%.1f MB sparsity=%.3f latency=%.2f ms/sample", compress_run_name(cfg),
             metrics.get("test_acc", float("nan")), stats["model_size_mb"], pruned.sparsity, timer.ms_per_sample)
    return metrics
