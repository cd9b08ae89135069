"""Sweep context, link tags, run names and override params (issue 12, item 1), without a subprocess sweep."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from wattlog.errors import WattlogWarning
from wattlog.integrations import sweep_context as sc

PW = "CANARYpw7361"


def test_sweep_link_tags_outside_a_sweep_is_empty_and_imports_nothing() -> None:
    code = ("import sys; from wattlog.integrations.sweep_context import sweep_link_tags, sweep_run_name; "
            "print(sweep_link_tags(), sweep_run_name(), "
            "sorted(m for m in ('hydra', 'omegaconf', 'mlflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{} None []"


@pytest.mark.parametrize(
    ("job", "sweep", "expected"),
    [
        (["model.hidden=8", "energy=estimate"], ["model.hidden=2,8,32", "energy=estimate"], "8"),
        (["prune.amount=0.3", "quantize=int8"], ["prune.amount=0,0.3,0.6", "quantize=none,int8"], "0.3 int8"),
        (["model.hidden=16", "train.max_epochs=3"], [], "16 3"),  # Optuna: the sweeper's params only
        (["a=1"], ["a=1"], "job 4"),
        ([f"mlflow.tracking_uri=http://u:{PW}@h", "lr=0.1"], ["lr=0.1,0.2"], "http://h 0.1"),
        (["name=" + "x" * 50, "lr=0.1"], ["lr=0.1,0.2"], "x" * 15 + "… 0.1"),
        (["+db.password=" + PW, "hydra.job.chdir=true", "lr=0.5"], ["lr=range(0,1)"], "*** 0.5"),
    ],
)
def test_run_name_is_the_differing_values(job, sweep, expected) -> None:
    name = sc.run_name(job, sweep, job_num=4)
    assert name == expected and len(name) <= sc.MAX_RUN_NAME and PW not in name


def test_override_params_are_prefixed_and_redacted() -> None:
    params = sc.override_params(["energy.pue=1", "+a.b=2", "~c", "db@x=y", f"db.password={PW}",
                                 f"logger.tracking_uri=http\\://u\\:{PW}@h\\:5000"])
    assert params == {"override.energy.pue": "1", "override.a.b": "2", "override.db_x": "y",
                      "override.db.password": "***", "override.logger.tracking_uri": "http://h:5000"}


def test_context_files_are_private_and_never_followed(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    sc.write_private_json(sweep / sc.SWEEP_FILE, {"parent_run_id": "a" * 32, "sweep_id": "s"})
    assert stat.S_IMODE((sweep / ".wattlog").stat().st_mode) == 0o700
    assert stat.S_IMODE((sweep / sc.SWEEP_FILE).stat().st_mode) == 0o600
    assert sc.read_sweep_file(sweep / sc.SWEEP_FILE)["sweep_id"] == "s"
    sc.write_job_record(sweep, 3, [f"db.password={PW}", "lr=1"], "COMPLETED")
    sc.write_job_record(sweep, 10, ["lr=2"], "running")
    recs = sc.read_job_records(sweep)
    assert [(r["num"], r["overrides"], r["status"]) for r in recs] == [
        ("3", ["db.password=***", "lr=1"], "COMPLETED"), ("10", ["lr=2"], "running")]
    assert PW not in "".join(p.read_text() for p in (sweep / ".wattlog").rglob("*.json"))

    other = tmp_path / "other"
    other.mkdir()
    (other / "sweep.json").write_text(json.dumps({"parent_run_id": "b" * 32}))
    evil = tmp_path / "evil"
    (evil / ".wattlog").mkdir(parents=True)
    (evil / sc.SWEEP_FILE).symlink_to(other / "sweep.json")
    with pytest.raises(ValueError, match="refusing"):
        sc.read_sweep_file(evil / sc.SWEEP_FILE)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".wattlog").symlink_to(other, target_is_directory=True)
    with pytest.raises(PermissionError, match="symlink"):
        sc.write_private_json(linked / sc.SWEEP_FILE, {"parent_run_id": "c" * 32})
    assert json.loads((other / "sweep.json").read_text()) == {"parent_run_id": "b" * 32}
    (tmp_path / "bad.json").write_text('{"parent_run_id": "../x"}')
    with pytest.raises(ValueError, match="not a wattlog sweep file"):
        sc.read_sweep_file(tmp_path / "bad.json")


def test_a_writable_context_dir_of_ours_is_tightened(tmp_path: Path) -> None:
    (tmp_path / ".wattlog").mkdir()
    os.chmod(tmp_path / ".wattlog", 0o777)
    sc.write_private_json(tmp_path / sc.SWEEP_FILE, {"parent_run_id": "a" * 32})
    assert stat.S_IMODE((tmp_path / ".wattlog").stat().st_mode) == 0o700


def _run(run_id: str, tags: dict[str, str], metrics: dict[str, float], name: str = "r") -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=name, status="FINISHED", start_time=0),
                           data=SimpleNamespace(tags=tags, metrics=metrics))


def test_summary_reads_joules_and_old_kwh_runs_and_redacts() -> None:
    pytest.importorskip("hydra")
    from wattlog.integrations.hydra_sweep import summary_rows

    new = _run("n", {sc.T_SWEEP_JOB: "0", sc.T_OVERRIDES: json.dumps(["lr=1"])},
               {"energy/total_j": 7200.0, "acc": 0.5}, name=f"run http://u:{PW}@h")
    old = _run("o", {"wattlog.job_num": "1", "wattlog.overrides": json.dumps([f"db.password={PW}"])},
               {"energy/total_kwh": 0.002, "acc": 0.6})
    rows = summary_rows([new, old], "acc")
    assert [r["energy/total_j"] for r in rows] == [7200.0, 0.002 * 3.6e6]
    assert [r["job_num"] for r in rows] == ["0", "1"]
    assert rows[0]["lr"] == "1" and rows[1]["db.password"] == "***"
    assert PW not in json.dumps(rows)


def test_unlinked_jobs_are_named_one_warning_each() -> None:
    pytest.importorskip("hydra")
    from wattlog.integrations.hydra_sweep import _unlinked_jobs, _warn_unlinked

    jobs = [{"num": "0", "overrides": ["lr=1"]}, {"num": "1", "overrides": [f"db.password={PW}"], "status": "FAILED"},
            {"num": "2", "overrides": []}]
    children = [_run("a", {sc.T_SWEEP_JOB: "0"}, {}), _run("b", {"wattlog.job_num": "2"}, {})]
    unlinked = _unlinked_jobs(jobs, children)
    assert [j["num"] for j in unlinked] == ["1"]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _warn_unlinked(unlinked + [{"num": "7", "overrides": ["x=1"]}])
    texts = [str(w.message) for w in rec if issubclass(w.category, WattlogWarning)]
    assert len(texts) == 2
    assert texts[0].startswith("wattlog: sweep job #1 (db.password=***) (the job failed) has no MLflow run linked")
    assert "sweep job #7 (x=1)" in texts[1] and PW not in "".join(texts)
