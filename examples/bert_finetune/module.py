"""Lightning pieces of the BERT example: the data module, the classifier module, a latency timer.

MLflow keys logged by :class:`SentimentClassifier`: ``train_loss`` (per step), ``val_loss``,
``val_acc`` (per validation), ``test_loss``, ``test_acc`` (per test). :class:`LatencyTimer` logs
``test_latency_ms_per_sample`` and ``test_samples``.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from examples.bert_finetune.data import Splits


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, texts: list[str], labels: list[int]) -> None:
        self.texts, self.labels = texts, labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], self.labels[i]


class SentimentData(pl.LightningDataModule):
    """Tokenises each batch on the fly (dynamic padding up to ``max_length``)."""

    def __init__(
        self,
        splits: Splits,
        tokenizer: Any,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.splits, self.tokenizer = splits, tokenizer
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.num_workers = num_workers

    def collate(self, items: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*items, strict=True)
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        enc = dict(enc)
        enc["labels"] = torch.tensor(labels, dtype=torch.long)
        return enc

    def _loader(self, split: tuple[list[str], list[int]], batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            _Pairs(*split), batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits.train, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits.val, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits.test, self.eval_batch_size, shuffle=False)


class SentimentClassifier(pl.LightningModule):
    """Wraps a Hugging Face sequence classifier; AdamW with linear warm-up and decay."""

    def __init__(self, model: torch.nn.Module, lr: float = 5e-5, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**batch)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self(batch)
        n = batch["labels"].shape[0]
        acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}_loss", out.loss.float(), batch_size=n, on_step=on_step, on_epoch=not on_step,
                 prog_bar=True)
        if stage != "train":
            self.log(f"{stage}_acc", acc, batch_size=n, on_epoch=True, prog_bar=True)
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim <= 1]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.warmup_ratio)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LatencyTimer(pl.Callback):
    """Wall time of the test batches (forward + metrics), per sample.

    Logs ``test_latency_ms_per_sample`` and ``test_samples`` at the end of the test epoch. On CUDA it
    synchronises once per batch so the time covers the GPU work.
    """

    def __init__(self) -> None:
        self.total_s = 0.0
        self.samples = 0
        self._t0 = 0.0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total_s, self.samples = 0.0, 0

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._sync(pl_module)
        self.total_s += time.perf_counter() - self._t0
        self.samples += int(batch["labels"].shape[0])

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.samples:
            pl_module.log("test_latency_ms_per_sample", 1000.0 * self.total_s / self.samples)
            pl_module.log("test_samples", float(self.samples))

    @property
    def ms_per_sample(self) -> float:
        """Mean milliseconds per test sample of the last test epoch (NaN before one ran)."""
        return 1000.0 * self.total_s / self.samples if self.samples else float("nan")
