"""Multi-node on one machine: Lightning DDP, num_nodes=2 x devices=2 (CPU, gloo) on loopback.

Two node processes, each with its own environment (MASTER_ADDR/MASTER_PORT/NODE_RANK), each launching
its second local rank. CPU/RAM are counted once per node (local rank 0), GPUs (fake) once per device,
and everything lands in one MLflow run.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_two_processes_each_one_run(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    client.search_experiments()  # create the sqlite schema once, before 4 processes race for it
    out = tmp_path / "out.json"
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node), WATTLOG_STRICT="1",
                   PYTHONUNBUFFERED="1", DUMP_STACKS_AFTER_S="150")
        node_dir = tmp_path / f"node{node}"
        node_dir.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "multinode_fit.py"), mlflow_uri, str(node_dir), str(out)],
            env=env, cwd=node_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=170)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    info = json.loads(out.read_text())
    assert info["world_size"] == 4
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert len(runs) == 1  # one run for the whole job
    run = client.get_run(info["run_id"])
    m, p = run.data.metrics, run.data.params
    assert p["energy.gpu_count"] == "4"  # one fake GPU per device, 2 per node
    assert p["energy.cpu_method"] == "estimate" and p["energy.ram_method"] == "estimate"

    trace = client.download_artifacts(info["run_id"], "energy/trace.csv", str(tmp_path / "dl"))
    with open(trace, newline="") as fh:
        rows = list(csv.DictReader(fh))
    domains = {c[: -len("_j")] for c in rows[0] if c.endswith("_j") and c != "total_j"}
    # CPU and RAM once per node: by local rank 0 = global ranks 0 and 2
    assert {d for d in domains if not d.split(".", 1)[1].startswith("gpu")} == {"r0.cpu", "r0.ram", "r2.cpu", "r2.ram"}
    assert {d for d in domains if d.split(".", 1)[1].startswith("gpu")} == {"r0.gpu0", "r1.gpu1", "r2.gpu0", "r3.gpu1"}
    col = collections.defaultdict(float)
    for r in rows:
        for d in domains:
            col[d] += float(r[f"{d}_j"])
    assert col["r0.cpu"] > 0 and col["r2.cpu"] > 0
    assert m["energy/cpu_j"] == pytest.approx(col["r0.cpu"] + col["r2.cpu"], rel=1e-6)
    assert m["energy/ram_j"] == pytest.approx(col["r0.ram"] + col["r2.ram"], rel=1e-6)
    gpu_j = sum(v for d, v in col.items() if ".gpu" in d)
    assert m["energy/gpu_j"] == pytest.approx(gpu_j, rel=1e-6)
    for key in ("energy/step_j", "energy/gpu_power_w", "energy/gpu3_power_w"):
        counts = collections.Counter(h.step for h in client.get_metric_history(info["run_id"], key))
        assert sorted(counts) == list(range(10)) and max(counts.values()) == 1, key
    power = sorted(h.value for h in client.get_metric_history(info["run_id"], "energy/gpu_power_w"))
    assert power[len(power) // 2] == pytest.approx(300.0, rel=0.1)  # 100 + 50 W on each of 2 nodes
