"""wattlog.integrations.transformers.EnergyCallback on a real HF Trainer, a simulated 400 W GPU and sqlite MLflow."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_helpers import TokenDataset, energy_history, tiny_bert, training_args  # noqa: E402

from conftest import GPU_POWER_W as POWER_W  # noqa: E402 - the shared `gpu` fixture's fake GPU


@pytest.fixture
def hf_mlflow(mlflow_uri, monkeypatch):
    """MLflow for the Trainer's own MLflowCallback: the sqlite store, no run left active afterwards."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(mlflow_uri)
    yield mlflow_uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _callback(**kwargs):
    from wattlog.integrations.transformers import EnergyCallback

    return EnergyCallback(**{"gpus": [0], "cpu": "none", "ram": "none", "artifacts": False, **kwargs})


def _only_run(uri: str, experiment: str = "hf") -> str:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0].info.run_id


@pytest.mark.slow  # a real Trainer: ~10 s on a loaded 2-core machine
def test_trainer_with_report_to_mlflow_gets_energy_at_every_optimizer_step(gpu, hf_mlflow, tmp_path):
    from transformers import Trainer

    args = training_args(tmp_path, max_steps=10, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=5)
    trainer = Trainer(model=tiny_bert(step_sleep_s=0.01), args=args, train_dataset=TokenDataset(64),
                      eval_dataset=TokenDataset(16), callbacks=[_callback(artifacts=True)])
    trainer.train()
    run_id = _only_run(hf_mlflow)  # the Trainer's own run: energy went into it, no second run
    hist = energy_history(hf_mlflow, run_id)
    steps = [s for s, _ in hist["energy/step_j"]]
    assert steps == list(range(1, 11))  # state.global_step of each optimizer step (2 micro-batches each)
    assert {s for s, _ in hist["loss"]} <= set(steps)  # the Trainer's loss on the same step axis
    for key in ("energy/total_j", "energy/emissions_g"):
        values = [v for _, v in hist[key]]
        assert values == sorted(values), key
    for key, points in hist.items():
        if key.startswith("energy/"):
            assert len({s for s, _ in points}) == len(points), key  # one point per (key, step)
    for key in ("energy/train_j", "energy/val_j", "energy/gpu_j", "energy/j_per_sample", "energy/duration_s"):
        assert key in hist, key
    assert hist["energy/j_per_sample"][-1][1] == pytest.approx(hist["energy/train_j"][-1][1] / (10 * 2 * 4))
    assert hist["energy/val_j_per_sample"][-1][1] > 0
    assert hist["energy/train_j"][-1][0] >= 10  # summaries at (or after) the Trainer's final global_step
    from mlflow import MlflowClient

    data = MlflowClient(hf_mlflow).get_run(run_id).data
    assert data.params["energy.gpu_method"] == "counter" and data.params["energy.gpu_count"] == "1"
    assert "train_runtime" in data.metrics  # the Trainer's own summary is in the same run
    artifacts = {a.path for a in MlflowClient(hf_mlflow).list_artifacts(run_id, "energy")}
    assert "energy/trace.csv" in artifacts


@pytest.mark.slow  # three stages, each starting its delivery process
def test_active_run_and_standalone_evaluate_predict_continue_one_run(gpu, hf_mlflow, tmp_path):
    import mlflow
    from transformers import Trainer

    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=4), train_dataset=TokenDataset(32),
                      eval_dataset=TokenDataset(32), callbacks=[_callback()])
    mlflow.set_experiment("hf")
    with mlflow.start_run() as run:
        trainer.train()
        after_train = energy_history(hf_mlflow, run.info.run_id, "energy/")
        trainer.evaluate()
        trainer.predict(TokenDataset(32))
    hist = energy_history(hf_mlflow, run.info.run_id, "energy/")
    assert [s for s, _ in hist["energy/step_j"]] == [1, 2, 3, 4]
    assert "energy/val_j" not in after_train
    assert hist["energy/val_j"][-1][1] > 0 and hist["energy/predict_j"][-1][1] > 0
    assert hist["energy/train_j"] == after_train["energy/train_j"]  # an evaluation never rewinds the fit
    assert hist["energy/total_j"][-1][1] > after_train["energy/total_j"][-1][1]
    assert _only_run(hf_mlflow) == run.info.run_id


def test_mlflow_run_id_is_honoured(gpu, hf_mlflow, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from transformers import Trainer

    client = MlflowClient(hf_mlflow)
    existing = client.create_run(client.create_experiment("hf")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", existing)
    Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=3), train_dataset=TokenDataset(16),
            callbacks=[_callback()]).train()
    hist = energy_history(hf_mlflow, existing)
    assert [s for s, _ in hist["energy/step_j"]] == [1, 2, 3] and "loss" in hist


def test_without_any_run_strict_mode_fails_before_training(gpu, tmp_path, monkeypatch):
    from transformers import Trainer

    from wattlog.errors import NoRunError

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=2, report_to=[]),
                      train_dataset=TokenDataset(16), callbacks=[_callback()])
    with pytest.raises(NoRunError, match="report_to='mlflow'"):
        trainer.train()
    assert os.environ.get("WATTLOG_STRICT") == "1"


def test_bad_option_fails_at_construction():
    from wattlog.errors import ConfigError

    with pytest.raises(ConfigError, match="log_every_n_steps"):
        _callback(log_every_n_steps=0)
