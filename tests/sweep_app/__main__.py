"""``python -m tests.sweep_app [overrides]``: a project with its own ``logger`` config, no wattlog logger.

``link``: ``monitor`` (default) relies on the EnergyMonitor to link the run into the sweep;
``app`` adds a small callback that sets :func:`wattlog.integrations.lightning_run.sweep_tags` itself
(what the monitor does at setup) unless ``energy=off``; ``none`` adds nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="app")
def main(cfg: DictConfig) -> Any:
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, TensorDataset

    from wattlog.integrations.hydra import instantiate_energy
    from wattlog.integrations.lightning_run import sweep_tags

    class Link(pl.Callback):
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            logger = trainer.logger
            for key, value in sweep_tags(trainer).items():
                logger.experiment.set_tag(logger.run_id, key, value)

    class Tiny(pl.LightningModule):
        def __init__(self, hidden: int, lr: float) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
            self.lr = lr

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    pl.seed_everything(0)  # as projects do: MLflow's random run names are then the same in every job
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    logger = instantiate(cfg.logger)
    callbacks = [*instantiate_energy(cfg)]
    if cfg.link == "app" and callbacks:  # energy=off: no monitor, so nothing links the run
        callbacks.append(Link())
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=callbacks, accelerator="cpu", devices=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1, default_root_dir=str(cfg.root_dir))
    trainer.fit(Tiny(int(cfg.hidden), float(cfg.lr)), data, data)
    value = logger.experiment.get_run(logger.run_id).data.metrics.get("val_loss")
    return float(value) if value is not None else math.nan


if __name__ == "__main__":
    main()
