"""A tiny Lightning model and trainer factory shared by the callback tests."""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, TensorDataset


def make_module(namespace: str = "lightning", step_sleep_s: float = 0.0, log: bool = True):
    """``(pl, module)``: a tiny regressor; with ``log=False`` it calls no ``self.log``."""
    if namespace == "lightning":
        import lightning.pytorch as pl
    else:
        import pytorch_lightning as pl

    class TinyRegressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            if step_sleep_s:
                time.sleep(step_sleep_s)
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            if log:
                self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            if log:
                self.log("val_loss", loss)
                self.log("val_acc", 1.0 / (1.0 + loss))

        def test_step(self, batch, batch_idx):
            x, y = batch
            if log:
                self.log("test_loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def forward(self, x):
            return self.layer(x)

        def predict_step(self, batch, batch_idx):
            return self.layer(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return pl, TinyRegressor()


def loader(n: int = 64, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def metric_history(uri: str, run_id: str, key: str):
    from mlflow import MlflowClient

    return MlflowClient(uri).get_metric_history(run_id, key)


def spawnable_module():
    """A module-level (picklable) LightningModule, for ``strategy="ddp_spawn"``."""
    return _Spawnable()


try:
    import lightning.pytorch as _pl

    class _Spawnable(_pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            time.sleep(0.02)
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)
except ImportError:  # pragma: no cover - lightning not installed
    pass
