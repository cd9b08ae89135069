"""Real ``-m`` sweeps of the toy app (examples/hydra_toy) in subprocesses, logging to sqlite MLflow.

Two sweeps cover the launchers and sweepers: a grid sweep on the joblib launcher (jobs in other
processes find the parent run from the sweep dir) and a multi-objective Optuna sweep on the basic
launcher (in-process jobs; Optuna's Pareto front must equal the callback's).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run_sweep(tmp: Path, *overrides: str) -> dict[str, Any]:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "WATTLOG_STRICT": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    cmd = [
        sys.executable, "-m", "examples.hydra_toy", "-m", *overrides,
        "energy=estimate",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        f"train.root_dir={tmp / 'lightning'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Hydra turns callback exceptions into warnings: strict mode makes ours raise, so none may show.
    assert "EnergySweepCallback" not in proc.stderr, proc.stderr[-4000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("hydra_toy")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("wattlog.role") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    dl = Path(client.download_artifacts(parent.info.run_id, "sweep", str(tmp / "dl")))
    return {
        "client": client, "parent": parent, "children": children, "runs": runs, "dir": dl,
        "sweep_dir": tmp / "sweep", "stderr": proc.stderr,
    }


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _brute_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Run ids not dominated on (max metric, min kWh): the textbook O(n^2) definition."""
    front = set()
    for rid, (m, e) in points.items():
        dominated = any(
            (m2 >= m and e2 <= e) and (m2 > m or e2 < e) for r2, (m2, e2) in points.items() if r2 != rid
        )
        if not dominated:
            front.add(rid)
    return front


def _check_sweep(s: dict[str, Any], n_jobs: int, swept: list[str]) -> None:
    parent, children = s["parent"], s["children"]
    assert len(s["runs"]) == n_jobs + 1 and len(children) == n_jobs
    assert parent.info.status == "FINISHED"
    sweep_id = parent.data.tags["wattlog.sweep_id"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["wattlog.sweep_id"] == sweep_id
        assert child.data.params["energy.cpu_method"] == "estimate"
        assert child.data.params["energy"] == "estimate"
        for key in swept:
            assert key in child.data.params
        assert child.data.metrics["energy/total_kwh"] > 0
    assert {p.name for p in s["dir"].iterdir()} == {"summary.csv", "pareto.csv", "pareto.png"}

    summary = _read_csv(s["dir"] / "summary.csv")
    by_id = {c.info.run_id: c for c in children}
    assert sorted(r["run_id"] for r in summary) == sorted(by_id)
    points = {}
    for row in summary:
        metrics = by_id[row["run_id"]].data.metrics
        kwh, r2 = float(row["energy/total_kwh"]), float(row["val_r2"])
        assert kwh == metrics["energy/total_kwh"] and r2 == metrics["val_r2"]
        assert float(row["energy/emissions_g"]) == metrics["energy/emissions_g"]
        assert float(row["energy/j_per_sample"]) == metrics["energy/j_per_sample"]
        assert row["energy/test_j_per_sample"] != ""
        for key in swept:
            assert row[key] == by_id[row["run_id"]].data.params[key]
        points[row["run_id"]] = (r2, kwh)
    front = _brute_front(points)
    assert {r["run_id"] for r in summary if r["on_front"] == "True"} == front
    pareto = _read_csv(s["dir"] / "pareto.csv")
    assert {r["run_id"] for r in pareto} == front
    assert [float(r["energy/total_kwh"]) for r in pareto] == sorted(points[r][1] for r in front)
    tags = parent.data.tags
    assert tags["wattlog.best_by_energy"] == min(points, key=lambda r: points[r][1])
    assert tags["wattlog.best_by_metric"] == max(points, key=lambda r: points[r][0])
    assert parent.data.metrics["sweep/n_runs"] == n_jobs


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    return _run_sweep(
        tmp_path_factory.mktemp("joblib"),
        "model.hidden=2,8,32",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    return _run_sweep(
        tmp_path_factory.mktemp("optuna"), "--config-name=hydra_toy_optuna", "hydra.sweeper.n_trials=4"
    )


def test_joblib_grid_sweep_parent_children_pareto(joblib_sweep: dict[str, Any]) -> None:
    _check_sweep(joblib_sweep, n_jobs=3, swept=["model.hidden"])
    assert sorted(c.data.params["model.hidden"] for c in joblib_sweep["children"]) == ["2", "32", "8"]
    params = joblib_sweep["parent"].data.params
    assert params["model.hidden"] == "2,8,32" and params["sweep.metric"] == "val_r2"
    assert (joblib_sweep["sweep_dir"] / ".wattlog_sweep.json").is_file()


def test_optuna_multi_objective_sweep_agrees_with_callback(optuna_sweep: dict[str, Any]) -> None:
    _check_sweep(optuna_sweep, n_jobs=4, swept=["model.hidden", "train.max_epochs"])
    results = yaml.safe_load((optuna_sweep["sweep_dir"] / "optimization_results.yaml").read_text())
    optuna_front = sorted(
        (str(s["params"]["model.hidden"]), str(s["params"]["train.max_epochs"]), *map(float, s["values"]))
        for s in results["solutions"]
    )
    callback_front = sorted(
        (r["model.hidden"], r["train.max_epochs"], float(r["val_r2"]), float(r["energy/total_kwh"]))
        for r in _read_csv(optuna_sweep["dir"] / "pareto.csv")
    )
    assert optuna_front == callback_front
