"""The toy job: a small MLP regressing random linear data, with energy logged into MLflow.

The two wattlog lines are ``make_mlflow_logger(cfg)`` (a child of the sweep's parent run inside
an energy sweep) and ``instantiate_energy(cfg)`` (``[]`` with ``energy=off``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from wattlog.integrations.hydra import instantiate_energy, make_mlflow_logger


class ToyRegressor(pl.LightningModule):
    """MLP ``n_features -> hidden -> 1``; logs ``train_loss``, ``val_loss``, ``val_r2`` (and ``test_*``)."""

    def __init__(self, n_features: int, hidden: int, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _eval(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        x, y = batch  # the whole split is one batch, so R^2 is exact
        pred = self(x)
        sse = torch.sum((pred - y) ** 2)
        sst = torch.sum((y - y.mean()) ** 2)
        self.log(f"{prefix}_loss", sse / len(y))
        self.log(f"{prefix}_r2", 1.0 - sse / sst)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_data(cfg: DictConfig) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of ``y = x @ w + noise`` (seeded)."""
    gen = torch.Generator().manual_seed(int(cfg.seed))
    n = int(cfg.data.n_train) + int(cfg.data.n_val)
    x = torch.randn(n, int(cfg.data.n_features), generator=gen)
    w = torch.randn(int(cfg.data.n_features), generator=gen)
    y = x @ w + float(cfg.data.noise) * torch.randn(n, generator=gen)
    n_train = int(cfg.data.n_train)
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train:], y[n_train:])
    return (
        DataLoader(train, batch_size=int(cfg.data.batch_size), shuffle=True, generator=gen),
        DataLoader(val, batch_size=len(val)),
    )


def _final_metric(logger: Any, key: str) -> float:
    """The run's last value of ``key`` as stored in MLflow (what the sweep callback reads)."""
    value = logger.experiment.get_run(logger.run_id).data.metrics.get(key)
    return float(value) if value is not None else math.nan


def run(cfg: DictConfig) -> float | tuple[float, float]:
    """Fit, validate and test the toy model.

    Returns:
        ``cfg.objective.metric`` (e.g. ``val_r2``); with ``objective.return_energy`` the pair
        ``(metric, energy/total_j)`` for a multi-objective Optuna sweep.
    """
    logger = make_mlflow_logger(cfg)  # before seeding: MLflow's random run names use `random`
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    train_loader, val_loader = make_data(cfg)
    model = ToyRegressor(int(cfg.data.n_features), int(cfg.model.hidden), float(cfg.model.lr))
    trainer = pl.Trainer(
        max_epochs=int(cfg.train.max_epochs),
        accelerator=str(cfg.train.accelerator),
        devices=1,
        logger=logger,
        callbacks=[*instantiate_energy(cfg)],  # [] with energy=off
        log_every_n_steps=int(cfg.train.log_every_n_steps),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(cfg.train.progress_bar),
        default_root_dir=str(cfg.train.root_dir),
    )
    trainer.fit(model, train_loader, val_loader)
    trainer.test(model, val_loader, verbose=False)
    metric = _final_metric(logger, str(cfg.objective.metric))
    if cfg.objective.return_energy:
        return metric, _final_metric(logger, "energy/total_j")
    return metric
