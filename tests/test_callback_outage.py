"""MLflow unreachable during fit: training finishes, the spool keeps every point, `wattlog sync` delivers."""

from __future__ import annotations

import collections
import socket

import pytest

pytest.importorskip("lightning")

from lightning_helpers import loader, make_module  # noqa: E402

from wattlog import EnergyMonitor  # noqa: E402
from wattlog.cli import main as cli_main  # noqa: E402
from wattlog.errors import WattlogWarning  # noqa: E402

STEP_KEYS = ("energy/step_j", "energy/power_w", "energy/total_j", "energy/emissions_g")


def _refusing_uri() -> str:
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
def test_outage_spools_and_sync_delivers_exactly_once(mlflow_uri, tmp_path, monkeypatch, capsys):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.delenv("WATTLOG_STRICT", raising=False)  # production policy: degrade, never kill training
    monkeypatch.setenv("WATTLOG_DELIVERY_REQUEST_TIMEOUT_S", "2")
    spool_dir = tmp_path / "spool"
    n_steps = 12
    pl, module = make_module()
    mlflow.set_tracking_uri(mlflow_uri)
    run_id = mlflow.start_run().info.run_id  # the run exists in the sqlite store ...
    mlflow.set_tracking_uri(_refusing_uri())  # ... but the tracking server is down for the whole fit
    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=1,
                            spool_dir=str(spool_dir), artifacts=False, delivery_timeout_s=1)
    trainer = pl.Trainer(max_steps=n_steps, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False)
    try:
        with pytest.warns(WattlogWarning) as rec:
            trainer.fit(module, loader(64))  # the monitor logs into MLflow's active run
    finally:
        mlflow.set_tracking_uri(mlflow_uri)
        mlflow.end_run()
    assert trainer.global_step == n_steps  # training finished
    spools = list(spool_dir.glob("*.jsonl"))
    assert [p.name for p in spools] == [f"{run_id}.jsonl"]
    texts = [str(w.message) for w in rec]
    assert any(f"wattlog sync --spool {spools[0]}" in t for t in texts), texts  # the user is told what to do
    assert MlflowClient(mlflow_uri).get_metric_history(run_id, "energy/step_j") == []

    assert cli_main(["sync", "--spool", str(spool_dir), "--tracking-uri", mlflow_uri]) == 0
    client = MlflowClient(mlflow_uri)
    for key in STEP_KEYS:
        counts = collections.Counter(m.step for m in client.get_metric_history(run_id, key))
        summary = {n_steps} if key in ("energy/total_j", "energy/emissions_g") else set()  # the stage summary
        assert set(range(n_steps)) <= set(counts) <= set(range(n_steps)) | summary, key
        assert set(counts.values()) == {1}, key  # never two points at one (key, step)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["energy/total_j"] > 0 and "energy/train_j" in metrics  # summaries were spooled too
    capsys.readouterr()
    assert cli_main(["sync", "--spool", str(spool_dir), "--tracking-uri", mlflow_uri]) == 0
    assert "sent 0 points" in capsys.readouterr().out  # idempotent: a second sync adds nothing
