"""Process faults (issue 7): SIGKILL mid-epoch then resume; a DDP rank that stalls, then crashes.

Also the framework-free parts they rely on: run attempts in the ledger, the bounded trace log.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import subprocess
import sys
import time

import pytest

from wattlog.ledger import EnergyLedger, StepRecord, TraceLog

HERE = os.path.dirname(os.path.abspath(__file__))
PER_STEP = ("energy/step_j", "energy/power_w", "energy/gpu_power_w", "energy/total_j", "energy/emissions_g")


def _rec(step: int, joules: float = 2.0, stage: str = "train", domains=("gpu0",)) -> StepRecord:
    return StepRecord(stage, step, float(step), step + 0.5, {d: joules for d in domains}, 4, 1, 0.5)


# ---------------------------------------------------------------- ledger: attempts, trace


def test_trace_log_streams_rows_and_bounds_plot_rows(tmp_path):
    trace = TraceLog(["gpu0"], max_plot_rows=100)
    for step in range(1, 1001):
        trace.append(_rec(step), attempt=2)
    trace.append(_rec(1001, domains=("gpu0", "cpu")))  # a late domain: a new trailing column
    plot = trace.plot_rows()
    assert len(plot) <= 101
    assert [r["step"] for r in plot] == sorted(r["step"] for r in plot) and plot[-1]["step"] == 1001
    assert all(a["t_end_s"] <= b["t_start_s"] for a, b in zip(plot, plot[1:]))  # bins in time order
    assert sum(r["gpu0_j"] for r in plot) == pytest.approx(1001 * 2.0)  # bins merge, nothing is dropped
    assert sum(r["duration_s"] for r in plot) == pytest.approx(1001 * 0.5)
    n = trace.write_csv(str(tmp_path / "trace.csv"))
    with open(tmp_path / "trace.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert n == len(rows) == 1001
    assert [int(r["step"]) for r in rows] == list(range(1, 1002))
    assert rows[0]["attempt"] == "2" and float(rows[0]["gpu0_j"]) == 2.0 and float(rows[0]["cpu_j"]) == 0.0
    assert float(rows[-1]["cpu_j"]) == 2.0 and float(rows[-1]["total_j"]) == 4.0
    assert float(rows[0]["power_w"]) == pytest.approx(4.0)  # 2 J over 0.5 s
    trace.close()


def test_reconcile_rerun_keeps_first_points_and_counts_wasted_energy():
    ledger = EnergyLedger({"gpu0": "gpu"}, 100.0)
    ledger.load_state_dict({"version": 1, "total_j": 3600.0})  # a v1 checkpoint: no attempts
    assert ledger.begin_attempt("b", start_step=21) == 1
    # the killed attempt logged steps 21..23 after the checkpoint; 18 is before it
    killed = {18: 3240.0, 21: 3960.0, 22: 3960.0, 23: 4200.0}
    last, wasted_j = ledger.reconcile_rerun(killed, start_step=21)
    assert last == 23 and wasted_j == pytest.approx(600.0)
    points = ledger.add([_rec(s) for s in range(21, 26)])
    assert [s for s, _ in points] == [24, 25]  # re-run steps 21..23 keep the killed attempt's points
    # their energy counts, and so does the killed attempt's: the total never goes below what was logged
    assert ledger.state.total_j == pytest.approx(3600.0 + 600.0 + 5 * 2.0)
    assert [m["energy/total_j"] for _, m in points] == sorted(m["energy/total_j"] for _, m in points)
    assert points[0][1]["energy/total_j"] > 4200.0
    summary = ledger.summary()
    assert summary["energy/rerun_j"] == pytest.approx(600.0)
    state = ledger.state_dict()
    assert state["attempts"] == [{"id": "b", "start_step": 21, "rerun_through_step": 23, "rerun_j": 600.0}]
    again = EnergyLedger({"gpu0": "gpu"}, 100.0)
    again.load_state_dict(state)
    assert again.attempt == 1 and again.state.rerun_j == pytest.approx(600.0)
    assert again.reconcile_rerun({}, 30) == (30, 0.0)


# ---------------------------------------------------------------- subprocess helpers


def _run(args, tmp_path, timeout_s, strict="1"):
    env = dict(os.environ, WATTLOG_STRICT=strict, PYTHONUNBUFFERED="1", DUMP_STACKS_AFTER_S=str(timeout_s - 10))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout_s,
                          cwd=tmp_path)


def _spool_points(path):
    from wattlog.sinks import spool as _spool

    header, offset = _spool.read_header(path)
    return [r for _s, r, _a, _b in _spool.iter_records_from(path, offset) if type(r) is _spool.Point]


def _sync(spool, uri, tmp_path):
    proc = _run(["-m", "wattlog.cli", "sync", "--spool", str(spool), "--tracking-uri", uri], tmp_path, 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _counts(client, run_id, key):
    return collections.Counter(m.step for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------- 4. SIGKILL mid-epoch, resume


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_continues_totals_without_double_points(tmp_path, mlflow_uri):
    pytest.importorskip("lightning")
    import torch
    from mlflow import MlflowClient

    script = os.path.join(HERE, "kill_resume_fit.py")
    out1, out2 = tmp_path / "kill.json", tmp_path / "resume.json"
    proc = _run([script, mlflow_uri, str(tmp_path), str(out1), "kill", "25"], tmp_path, 180)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL: no teardown, the sink never closed
    run_id = json.loads(out1.read_text())["run_id"]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 20
    ckpt_j = ckpt["callbacks"]["EnergyMonitor"]["total_j"]

    # what the killed attempt logged after the checkpoint (its steps 20.. are re-run)
    spool = tmp_path / ".wattlog" / "spool" / f"{run_id}.jsonl"
    killed = {p.step: p.value for p in _spool_points(spool) if p.key == "energy/total_j"}
    killed_steps = {p.step for p in _spool_points(spool) if p.key == "energy/step_j"}
    last_killed = max(killed)
    assert 20 <= last_killed <= 24
    killed_step_j = {p.step: p.value for p in _spool_points(spool) if p.key == "energy/step_j"}

    # `wattlog sync` recovers the killed process's spool: every point it logged, once
    _sync(spool, mlflow_uri, tmp_path)
    client = MlflowClient(mlflow_uri)
    assert set(_counts(client, run_id, "energy/step_j")) == killed_steps

    proc = _run([script, mlflow_uri, str(tmp_path), str(out2), "resume", run_id, "40"], tmp_path, 180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads(out2.read_text())
    assert resumed["global_step"] == 40
    assert "sent 0 points" in _sync(spool, mlflow_uri, tmp_path)  # nothing left, nothing doubled

    run = client.get_run(run_id)
    for key in PER_STEP:  # exactly one point per (key, step); total/emissions also get the run total at 40
        counts = _counts(client, run_id, key)
        final = {40} if key in ("energy/total_j", "energy/emissions_g") else set()  # when the total changed after
        assert set(range(40)) <= set(counts) <= set(range(40)) | final, key
        assert max(counts.values()) == 1, key
    totals = [m.value for m in sorted(client.get_metric_history(run_id, "energy/total_j"), key=lambda m: m.step)]
    assert totals == sorted(totals)  # never decreases, across the kill too
    # re-run steps keep the first (killed attempt's) value
    hist = {m.step: m.value for m in client.get_metric_history(run_id, "energy/step_j")}
    for step in range(20, last_killed + 1):
        assert hist[step] == pytest.approx(killed_step_j[step])

    # energy/total_j continues: what the killed attempt had logged + everything the resumed attempt measured
    trace_path = client.download_artifacts(run_id, "energy/trace.csv", str(tmp_path / "dl"))
    with open(trace_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["attempt"] for r in rows} == {"2"} and min(int(r["step"]) for r in rows if r["stage"] == "train") == 20
    total_j = run.data.metrics["energy/total_j"]
    assert total_j == pytest.approx(max(killed.values()) + sum(float(r["total_j"]) for r in rows), rel=1e-9)
    assert total_j == pytest.approx(resumed["state"]["total_j"], rel=1e-9)
    # ~100 W x 0.02 s x 40 steps + overhead: not restarted from zero
    assert ckpt_j < total_j < ckpt_j + 20 * 2.0 * 6
    # the killed attempt's energy after the checkpoint is spent for nothing: reported as rerun_j
    wasted_j = max(killed.values()) - ckpt_j
    assert wasted_j > 0
    assert run.data.metrics["energy/rerun_j"] == pytest.approx(wasted_j, rel=1e-6)
    tags = run.data.tags
    assert tags["energy.attempts"] == "2"
    assert tags["energy.attempt.1"].endswith("start_step=0")
    assert f"start_step=20 rerun_steps=20-{last_killed} " in tags["energy.attempt.2"]
    attempts = resumed["state"]["attempts"]
    assert [a["start_step"] for a in attempts] == [0, 20] and attempts[0]["id"] != attempts[1]["id"]


# ---------------------------------------------------------------- 6. a DDP rank stalls, then crashes


@pytest.mark.slow
def test_ddp_rank_stall_and_crash_never_hang_in_wattlog(tmp_path, mlflow_uri):
    """Rank 1 stalls at step 5 for 4x wattlog's 2 s collective timeout, then raises at step 12.

    The stall alone fires no timeout (the ranks' pumps go on exchanging rounds off the training threads);
    the crash does: rank 0's pump waits for a round rank 1 never joins, times out and goes partial.
    """
    pytest.importorskip("lightning")
    from mlflow import MlflowClient

    MlflowClient(mlflow_uri).search_experiments()  # create the sqlite schema once, before 2 processes race
    out = tmp_path / "out.json"
    t0 = time.monotonic()
    proc = _run([os.path.join(HERE, "ddp_crash_fit.py"), mlflow_uri, str(tmp_path), str(out), "5", "12"],
                tmp_path, 150, strict="0")  # the degrade path (strict mode would raise on the timeout)
    wall_s = time.monotonic() - t0
    assert proc.returncode != 0 and wall_s < 150
    assert "a wattlog collective failed on rank 0" in proc.stderr  # the timeout, not a hang
    info = json.loads(out.read_text())
    # rank 0 ended in Lightning's own DDP all-reduce (gloo: the peer's socket closed), not in wattlog
    assert info["how"].startswith("exception: RuntimeError") and "Connection closed by peer" in info["how"]
    assert info["global_step"] == 12
    run_id = info["run_id"]
    spool = tmp_path / ".wattlog" / "spool" / f"{run_id}.jsonl"
    if spool.exists():
        _sync(spool, mlflow_uri, tmp_path)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.tags["energy.partial"].startswith("a wattlog collective failed on rank 0")
    for key in ("energy/step_j", "energy/gpu_power_w"):
        counts = _counts(client, run_id, key)
        assert sorted(counts) == list(range(12)) and max(counts.values()) == 1, key
    power = {m.step: m.value for m in client.get_metric_history(run_id, "energy/gpu_power_w")}
    assert power[1] == pytest.approx(150.0, rel=0.1)  # both ranks' GPUs while collecting
    assert power[11] == pytest.approx(100.0, rel=0.1)  # rank 0's own GPU after the timeout
