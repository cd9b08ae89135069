"""2-process CPU DDP: one run, totals summed over ranks' own GPUs, no duplicate points."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lightning")


@pytest.mark.slow
def test_ddp_two_ranks_one_run(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    out = tmp_path / "out.json"
    script = os.path.join(os.path.dirname(__file__), "ddp_fit.py")
    env = dict(os.environ, WATTLOG_STRICT="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, script, mlflow_uri, str(out), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(out.read_text())
    assert info["world_size"] == 2
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1  # one run for the job
    run = client.get_run(info["run_id"])
    m, p = run.data.metrics, run.data.params
    assert p["energy.gpu_count"] == "2"
    # each rank measured only its own fake GPU: 100 W + 50 W = 150 W for the job
    assert m["energy/avg_power_w"] == pytest.approx(150.0, rel=0.05)
    assert m["energy/gpu_j"] == pytest.approx(m["energy/total_j"], rel=1e-9)
    for key in ("energy/step_j", "energy/power_w", "energy/gpu0_power_w", "energy/gpu1_power_w"):
        hist = client.get_metric_history(info["run_id"], key)
        counts = collections.Counter(h.step for h in hist)
        assert sorted(counts) == list(range(20)), key
        assert max(counts.values()) == 1, key  # no duplicate points
    gpu0 = {h.step: h.value for h in client.get_metric_history(info["run_id"], "energy/gpu0_power_w")}
    gpu1 = {h.step: h.value for h in client.get_metric_history(info["run_id"], "energy/gpu1_power_w")}
    power = {h.step: h.value for h in client.get_metric_history(info["run_id"], "energy/gpu_power_w")}
    mid = range(3, 19)
    assert sorted(round(gpu0[s] / 10) * 10 for s in mid)[len(mid) // 2] == 100
    assert sorted(round(gpu1[s] / 10) * 10 for s in mid)[len(mid) // 2] == 50
    assert sorted(power[s] for s in mid)[len(mid) // 2] == pytest.approx(150.0, rel=0.1)


@pytest.mark.slow
def test_track_in_a_two_process_loop_one_run_each_rank_its_own_gpu(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    out = tmp_path / "out.json"
    script = os.path.join(os.path.dirname(__file__), "ddp_track.py")
    env = dict(os.environ, WATTLOG_STRICT="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), script, mlflow_uri, str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(out.read_text())
    client = MlflowClient(mlflow_uri)
    assert len(client.search_runs([client.get_experiment_by_name("ddp-track").experiment_id])) == 1
    run = client.get_run(info["run_id"])
    assert run.data.params["energy.gpu_count"] == "2"
    assert run.data.metrics["energy/avg_power_w"] == pytest.approx(150.0, rel=0.1)  # 100 W + 50 W
    for key in ("energy/step_j", "energy/gpu0_power_w", "energy/gpu1_power_w"):
        counts = collections.Counter(h.step for h in client.get_metric_history(info["run_id"], key))
        assert sorted(counts) == list(range(info["n_steps"])) and max(counts.values()) == 1, key


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
