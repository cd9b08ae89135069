"""wattlog.autolog(): Lightning and HF Trainers created afterwards get the energy integration once; disable undoes it."""

from __future__ import annotations

import pytest

import wattlog
from wattlog.errors import ConfigError

OPTS = {"gpus": [0], "cpu": "none", "ram": "none", "artifacts": False}


@pytest.fixture
def autologged():
    patched = wattlog.autolog(**OPTS)
    yield patched
    wattlog.autolog(disable=True)


def test_lightning_trainer_gets_one_monitor(autologged, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from wattlog import EnergyMonitor

    assert "lightning.pytorch.Trainer" in autologged
    kw = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    plain = pl.Trainer(**kw)
    assert sum(isinstance(cb, EnergyMonitor) for cb in plain.callbacks) == 1
    mine = EnergyMonitor(gpus="none")
    explicit = pl.Trainer(callbacks=[mine], **kw)
    monitors = [cb for cb in explicit.callbacks if isinstance(cb, EnergyMonitor)]
    assert monitors == [mine]  # no duplicate next to the user's own
    wattlog.autolog(disable=True)
    assert not any(isinstance(cb, EnergyMonitor) for cb in pl.Trainer(**kw).callbacks)


def test_bad_option_fails_at_autolog_and_patches_nothing():
    with pytest.raises(ConfigError, match="cpu"):
        wattlog.autolog(cpu="gpu")


@pytest.mark.slow  # a real HF Trainer run
def test_hf_trainer_created_without_a_callback_logs_energy(autologged, tmp_path, mlflow_uri, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import mlflow
    from fakes.nvml import FakeGpu, FakeNvml
    from hf_helpers import TokenDataset, energy_history, tiny_bert, training_args
    from transformers import Trainer

    from wattlog.integrations.transformers import EnergyCallback

    FakeNvml([FakeGpu(power_w=400.0)]).install(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(mlflow_uri)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=3), train_dataset=TokenDataset(16))
    assert sum(isinstance(cb, EnergyCallback) for cb in trainer.callback_handler.callbacks) == 1
    with mlflow.start_run() as run:
        trainer.train()
    hist = energy_history(mlflow_uri, run.info.run_id)
    assert [s for s, _ in hist["energy/step_j"]] == [1, 2, 3] and "loss" in hist
    again = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=1), callbacks=[EnergyCallback(**OPTS)])
    assert sum(isinstance(cb, EnergyCallback) for cb in again.callback_handler.callbacks) == 1
