"""wattlog.track() in a plain PyTorch loop and a Lightning Fabric loop: simulated 400 W GPU, sqlite MLflow."""

from __future__ import annotations

import time

import pytest

import wattlog
from wattlog.errors import ConfigError, NoRunError

from conftest import GPU_POWER_W as POWER_W  # the shared `gpu` fixture's fake GPU
OPTS = {"gpus": [0], "cpu": "none", "ram": "none", "artifacts": False}


@pytest.fixture
def active_run(mlflow_uri, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run() as run:
        yield run
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _history(uri, run_id, prefix=""):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in client.get_run(run_id).data.metrics if k.startswith(prefix)}


def _check(hist, steps):
    assert [s for s, _ in hist["energy/step_j"]] == steps
    assert {s for s, _ in hist["loss"]} == set(steps)  # the loop's own metric on the same axis
    for key, points in hist.items():
        assert len({s for s, _ in points}) == len(points), key
    totals = [v for _, v in hist["energy/total_j"]]
    assert totals == sorted(totals)


def test_plain_loop_logs_every_step_and_the_summary_into_the_active_run(gpu, active_run, mlflow_uri):
    import mlflow

    starts = []
    with wattlog.track(**OPTS) as energy:
        assert energy.run_id == active_run.info.run_id
        for step in range(6):
            starts.append(time.perf_counter())
            time.sleep(0.1)  # the step's work
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            energy.step(step, samples=4)
        starts.append(time.perf_counter())
        with energy.stage("eval", samples=8):
            time.sleep(0.05)
    assert energy.run_id == active_run.info.run_id  # still known after the block, for a final print
    hist = _history(mlflow_uri, active_run.info.run_id)
    _check(hist, list(range(6)))
    for (step, step_j), t0, t1 in zip(hist["energy/step_j"], starts, starts[1:]):
        assert step_j == pytest.approx(POWER_W * (t1 - t0), rel=0.10), step
    last = {k: v[-1][1] for k, v in hist.items()}
    assert last["energy/j_per_sample"] == pytest.approx(last["energy/train_j"] / 24)
    assert last["energy/val_j"] == pytest.approx(POWER_W * 0.05, rel=0.5)
    assert last["energy/val_j_per_sample"] == pytest.approx(last["energy/val_j"] / 8)
    assert hist["energy/train_j"][-1][0] == 6  # the summary at the last step + 1


def test_explicit_run_id_without_an_active_run(gpu, mlflow_uri, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("track")).info.run_id
    with wattlog.track(run_id, tracking_uri=mlflow_uri, **OPTS) as energy:
        for step in range(3):
            client.log_metric(run_id, "loss", 1.0, step=step)
            energy.step(step)
    _check(_history(mlflow_uri, run_id), [0, 1, 2])


def test_no_run_in_strict_mode_and_bad_input(gpu, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with pytest.raises(NoRunError, match="track"):
        with wattlog.track(root_dir=str(tmp_path), **OPTS):
            pass
    with pytest.raises(ConfigError, match="gpus"):
        wattlog.track(gpus="all")
    tracker = wattlog.track(**OPTS)
    with pytest.raises(ConfigError, match="stage"):
        tracker.stage("training")


def test_a_failing_loop_still_logs_its_steps_and_closes(gpu, active_run, mlflow_uri):
    import mlflow

    with pytest.raises(RuntimeError, match="boom"):
        with wattlog.track(**OPTS) as energy:
            for step in range(3):
                mlflow.log_metric("loss", 1.0, step=step)
                energy.step(step)
            raise RuntimeError("boom")
    _check(_history(mlflow_uri, active_run.info.run_id), [0, 1, 2])


@pytest.mark.slow  # imports Lightning Fabric
def test_fabric_loop(gpu, active_run, mlflow_uri):
    pytest.importorskip("lightning")
    import mlflow
    import torch
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    x = torch.randn(32, 8)
    with wattlog.track(**OPTS) as energy:
        for step in range(8):
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            mlflow.log_metric("loss", loss.item(), step=step)
            energy.step(step, samples=len(x))
    hist = _history(mlflow_uri, active_run.info.run_id)
    _check(hist, list(range(8)))
    assert hist["energy/train_j"][-1][1] > 0
