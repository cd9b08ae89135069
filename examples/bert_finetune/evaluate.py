"""The compression job: load the fine-tuned checkpoint, prune (and recover) or distil, quantise, measure.

Making a variant that needs training is a metered Lightning fit of its own, in the variant's run: the
recovery fine-tune of a pruned model (``prune.finetune_steps``) is the stage ``recover``
(``energy/recover_j``), the distillation of a student (``distill=student``) the stage ``distill``
(``energy/distill_j``). Then the same trainer meters ``trainer.test``.

MLflow (experiment ``cfg.mlflow.experiment``): ``test_acc``, ``test_loss``, ``model_size_mb``,
``sparsity``, ``params_total``, ``params_nonzero``, ``recovery_steps``, ``distill_steps``,
``encoder_layers``, ``test_latency_ms_per_sample``, ``test_samples``, ``energy/make_j`` (the make stage's
energy; 0 for post-training compression) and EnergyMonitor's keys (``energy/test_j_per_sample``,
``energy/test_j``, ``energy/recover_j`` or ``energy/distill_j``...).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from examples.bert_finetune import compress, distill, tracking
from examples.bert_finetune.data import load_splits
from examples.bert_finetune.model import load_classifier, load_tokenizer
from examples.bert_finetune.train import build_trainer
from wattlog import keys
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
    if p.name != "none" and p.get("finetune_steps", 0):
        prune += f"+ft{p.finetune_steps}"
    d = cfg.get("distill") or {"name": "none"}
    if d["name"] != "none":
        prune = f"distill{d['layers']}L+kd{d['steps']}"
    return f"{prune}-{cfg.quantize.name}"


def check(cfg: DictConfig) -> str:
    """Validate the compression options against the device; returns the device type."""
    device = compress.resolve_device_type(str(cfg.trainer.accelerator))
    compress.check_compatible(cfg.prune.name, float(cfg.prune.get("amount", 0.0)), cfg.quantize.name, device,
                              str(cfg.prune.get("granularity", "heads")))
    d = cfg.get("distill") or {"name": "none"}
    if d["name"] not in ("none", "student"):
        raise ConfigError("distill.name", d["name"], ("none", "student"))
    if d["name"] == "student":
        if cfg.prune.name != "none":
            raise ConfigError("prune.name", cfg.prune.name, "none with distill=student (distil, or prune: not both)")
        distill.check_options(d.get("layers"), d.get("temperature"), d.get("alpha"), d.get("steps"))
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


def _make_stage(cfg: DictConfig, model: Any, data: Any) -> tuple[str, Any, int, Any]:
    """Prune (masks kept) or build the student: ``(stage, LightningModule to fit or None, steps, model)``."""
    from examples.bert_finetune.module import SentimentClassifier  # noqa: PLC0415

    p, d, o = cfg.prune, cfg.get("distill") or {"name": "none"}, cfg.optim
    if d["name"] == "student":
        student = distill.student_from_teacher(model, int(d["layers"]))
        module = distill.DistillClassifier(student, model, float(d["temperature"]), float(d["alpha"]),
                                           float(o.lr), float(o.weight_decay), float(o.warmup_ratio))
        return "distill", module, int(d["steps"]), student
    steps = int(p.get("finetune_steps", 0) or 0) if p.name != "none" else 0
    return "recover", SentimentClassifier(model, float(o.lr), float(o.weight_decay), float(o.warmup_ratio)) \
        if steps else None, steps, model


def _fit_energy_j(callbacks: list[Any]) -> float | None:
    """Energy of the fit just run, from the EnergyMonitor's running totals (None with energy=off)."""
    for cb in callbacks:
        if hasattr(cb, "fit_stage"):
            return float((cb.state_dict().get("stage_j") or {}).get("train", 0.0))
    return None


def evaluate(cfg: DictConfig, logger: Any) -> dict[str, float]:
    """Compress the checkpoint ``cfg.checkpoint_dir`` per ``cfg.prune``/``cfg.distill``/``cfg.quantize`` and test it."""
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
    pruned = compress.apply_masks(model, p.name, float(p.get("amount", 0.0)), str(p.get("granularity", "heads")))
    stage, make_module, steps, model = _make_stage(cfg, model, data)
    timer = LatencyTimer()
    epochs = -(-steps // max(1, len(data.train_dataloader())))  # enough epochs for `steps` (ceil)
    trainer = build_trainer(cfg, logger, [*callbacks, timer], precision="32-true", max_steps=steps or -1,
                            max_epochs=max(1, epochs), limit_val_batches=0)
    make_j: float | None = 0.0 if callbacks else None
    if make_module is not None:
        for cb in callbacks:
            cb.fit_stage = stage
        model.train()
        with warnings.catch_warnings():  # the distillation teacher is in eval mode on purpose
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            trainer.fit(make_module, datamodule=data)
        model.eval()
        make_j = _fit_energy_j(callbacks)
    pruned = compress.make_permanent(model, pruned)
    model = compress.quantize_model(model, cfg.quantize.name, device)
    total, nonzero = compress.count_params(model)
    stats = {
        "model_size_mb": compress.model_size_mb(model),
        "model_size_mb_before": size_before,
        "sparsity": pruned.sparsity,
        "params_total": float(total),
        "params_nonzero": float(nonzero),
        "recovery_steps": float(steps if stage == "recover" and make_module is not None else 0),
        "distill_steps": float(steps if stage == "distill" else 0),
        "encoder_layers": float(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0),
    }
    if make_j is not None:
        stats[keys.MAKE_J] = make_j
    logger.log_metrics(stats)

    warmup(model, data, int(cfg.get("eval", {}).get("warmup_batches", 1)), device)
    trainer.test(SentimentClassifier(model), datamodule=data, verbose=False)
    metrics = {**stats, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
    log.info("%s: test_acc=%.4f size=%.1f MB sparsity=%.3f latency=%.2f ms/sample make=%s J", compress_run_name(cfg),
             metrics.get("test_acc", float("nan")), stats["model_size_mb"], pruned.sparsity, timer.ms_per_sample,
             f"{make_j:.1f}" if make_j is not None else "n/a")
    return metrics
