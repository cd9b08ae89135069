"""MLflow unreachable during fit: training finishes, the spool keeps every point, `wattlog sync` delivers."""

from __future__ import annotations

import collections
import socket

import pytest

pytest.importorskip("lightning")

from lightning_helpers import loader, make_module  # noqa: E402

from wattlog import EnergyMonitor  # noqa: E402
from wattlog.cli import main as cli_main  # noqa: E402


def _refusing_uri() -> str:
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
def test_outage_spools_and_sync_delivers_exactly_once(mlflow_uri, tmp_path, monkeypatch, capsys):
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    monkeypatch.delenv("WATTLOG_STRICT", raising=False)  # production policy: degrade, never kill training
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    spool_dir = tmp_path / "spool"
    pl, module = make_module()
    logger = MLFlowLogger(experiment_name="outage", tracking_uri=mlflow_uri)
    run_id = logger.run_id  # the run exists in the sqlite store ...
    logger._tracking_uri = _refusing_uri()  # ... but the tracking server is down for the whole fit
    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=1,
                            spool_dir=str(spool_dir), artifacts=False)
    trainer = pl.Trainer(max_steps=12, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False)
    monitor._resolve_run = lambda trainer: (run_id, logger._tracking_uri)
    with pytest.warns(UserWarning, match="(?i)unreachable|spool"):
        trainer.fit(module, loader(64))
    assert trainer.global_step == 12  # training finished
    monitor._sink.close(timeout_s=1)
    assert MlflowClient(mlflow_uri).get_metric_history(run_id, "energy/step_j") == []
    spools = list(spool_dir.glob("*.jsonl"))
    assert len(spools) == 1

    assert cli_main(["sync", "--spool", str(spool_dir), "--tracking-uri", mlflow_uri]) == 0
    client = MlflowClient(mlflow_uri)
    for key in ("energy/step_j", "energy/power_w", "energy/total_kwh", "energy/emissions_g"):
        counts = collections.Counter(m.step for m in client.get_metric_history(run_id, key))
        assert set(range(1, 13)) <= set(counts), key
        assert all(c == 1 for s, c in counts.items() if s != 12), key
    metrics = client.get_run(run_id).data.metrics
    assert metrics["energy/total_kwh"] > 0 and "energy/train_kwh" in metrics  # summaries were spooled too
    capsys.readouterr()
    assert cli_main(["sync", "--spool", str(spool_dir), "--tracking-uri", mlflow_uri]) == 0
    assert "sent 0 points" in capsys.readouterr().out  # idempotent: a second sync adds nothing
