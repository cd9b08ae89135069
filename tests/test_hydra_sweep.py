"""Real ``-m`` sweeps in subprocesses, logging to MLflow.

- The toy app (examples/hydra_toy, ``make_mlflow_logger``): a grid sweep on the joblib launcher (jobs in
  other processes find the parent run from the sweep dir) and a multi-objective Optuna sweep on the
  basic launcher (in-process jobs; Optuna's Pareto front must equal the callback's).
- tests/sweep_app, a project with its own ``logger`` config built by ``hydra.utils.instantiate`` into
  another experiment (issue 12, item 1): against a real ``mlflow server`` reached through a URI with a
  canary password, plus a secret-looking override; on the basic launcher and on
  ``hydra/launcher=submitit_local`` (the code path of a SLURM cluster).
"""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOTAL_J = "energy/total_j"
CANARY = "CANARYpw7361"  # the password in the tracking URI
CANARY2 = "CANARYsecret0914"  # the value of a secret-looking override


def _total_j(metrics: dict[str, float]) -> float | None:
    from wattlog.keys import read_j

    return read_j(metrics, TOTAL_J)


def _run_sweep(tmp: Path, *overrides: str, module: str = "examples.hydra_toy", uri: str | None = None,
               experiment: str = "hydra_toy", extra: tuple[str, ...] = ("train.root_dir={lightning}",),
               env_extra: dict[str, str] | None = None, experiments: tuple[str, ...] = ()) -> dict[str, Any]:
    uri = uri or f"sqlite:///{tmp / 'mlflow.db'}"
    if experiments:  # created first, as on a team's server: see test_submitit_local_sweep_end_to_end
        from mlflow.tracking import MlflowClient

        for name in experiments:
            MlflowClient(uri).create_experiment(name)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "WATTLOG_STRICT": "1",
        "WATTLOG_SPOOL_DIR": str(tmp / "spool"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        **(env_extra or {}),
    }
    cmd = [
        sys.executable, "-m", module, "-m", *overrides,
        f"hydra.sweep.dir={tmp / 'sweep'}",
        *[e.format(lightning=tmp / "lightning") for e in extra],
    ]
    if module == "examples.hydra_toy":
        cmd.append("energy=estimate")
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Hydra turns callback exceptions into warnings: strict mode makes ours raise, so none may show.
    assert "EnergySweepCallback" not in proc.stderr, proc.stderr[-4000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    all_runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    parents = [r for r in all_runs if r.data.tags.get("wattlog.role") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.experiment_id == exp.experiment_id
    sweep_id = parent.data.tags["energy.sweep_id"]
    children = [r for r in all_runs if r.info.run_id != parent.info.run_id and (
        r.data.tags.get("mlflow.parentRunId") == parent.info.run_id or r.data.tags.get("energy.sweep_id") == sweep_id)]
    dl = Path(client.download_artifacts(parent.info.run_id, "sweep", str(tmp / "dl")))
    return {
        "client": client, "parent": parent, "children": children, "runs": all_runs, "dir": dl,
        "sweep_dir": tmp / "sweep", "stderr": proc.stderr, "stdout": proc.stdout, "tmp": tmp,
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
    sweep_id = parent.data.tags["energy.sweep_id"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["energy.sweep_id"] == sweep_id
        assert child.data.params["energy.cpu_method"] == "estimate"
        assert child.data.params["override.energy"] == "estimate"  # apart from the monitor's energy.* params
        for key in swept:
            assert f"override.{key}" in child.data.params
        assert _total_j(child.data.metrics) > 0
        assert len(child.info.run_name) <= 40 and "=" not in child.info.run_name  # the differing values only
    # readable and as distinct as the jobs' overrides (Optuna may repeat a trial), whatever built the logger
    assert len({c.info.run_name for c in children}) == len({c.data.tags.get("energy.overrides") for c in children})
    assert {p.name for p in s["dir"].iterdir()} == {"summary.csv", "pareto.csv", "pareto.png"}

    summary = _read_csv(s["dir"] / "summary.csv")
    by_id = {c.info.run_id: c for c in children}
    assert sorted(r["run_id"] for r in summary) == sorted(by_id)
    points = {}
    for row in summary:
        metrics = by_id[row["run_id"]].data.metrics
        joules, r2 = float(row[TOTAL_J]), float(row["val_r2"])
        assert joules == _total_j(metrics) and r2 == metrics["val_r2"]
        assert float(row["energy/emissions_g"]) == metrics["energy/emissions_g"]
        assert float(row["energy/j_per_sample"]) == metrics["energy/j_per_sample"]
        assert row["energy/test_j_per_sample"] != ""
        for key in swept:
            assert row[key] == by_id[row["run_id"]].data.params[f"override.{key}"]
        points[row["run_id"]] = (r2, joules)
    front = _brute_front(points)
    assert {r["run_id"] for r in summary if r["on_front"] == "True"} == front
    pareto = _read_csv(s["dir"] / "pareto.csv")
    assert {r["run_id"] for r in pareto} == front
    assert [float(r[TOTAL_J]) for r in pareto] == sorted(points[r][1] for r in front)
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
    assert sorted(c.data.params["override.model.hidden"] for c in joblib_sweep["children"]) == ["2", "32", "8"]
    assert sorted(c.info.run_name for c in joblib_sweep["children"]) == ["2", "32", "8"]
    params = joblib_sweep["parent"].data.params
    assert params["override.model.hidden"] == "2,8,32" and params["sweep.metric"] == "val_r2"
    context = joblib_sweep["sweep_dir"] / ".wattlog"
    assert stat.S_IMODE(context.stat().st_mode) == 0o700
    assert stat.S_IMODE((context / "sweep.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in (context / "jobs").iterdir()) == ["0.json", "1.json", "2.json"]


def test_optuna_multi_objective_sweep_agrees_with_callback(optuna_sweep: dict[str, Any]) -> None:
    _check_sweep(optuna_sweep, n_jobs=4, swept=["model.hidden", "train.max_epochs"])
    results = yaml.safe_load((optuna_sweep["sweep_dir"] / "optimization_results.yaml").read_text())
    optuna_front = sorted(
        (str(s["params"]["model.hidden"]), str(s["params"]["train.max_epochs"]), *map(float, s["values"]))
        for s in results["solutions"]
    )
    # the app returns the energy it read back (kWh or J, by wattlog version): the same front either way
    callback_front = sorted(
        (r["model.hidden"], r["train.max_epochs"], float(r["val_r2"]))
        for r in _read_csv(optuna_sweep["dir"] / "pareto.csv")
    )
    assert [f[:3] for f in optuna_front] == callback_front


# ------------------------------------------------------------------ a project with its own logger (issue 12)


def _text_under(root: Path, skip: tuple[str, ...] = ()) -> str:
    parts = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(part in skip for part in rel.split("/")):
            parts.append(f"--- {rel}\n" + p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def _no_canary(where: str, text: str) -> None:
    assert CANARY not in text and CANARY2 not in text, f"a credential leaked into {where}"


def _check_own_logger_sweep(s: dict[str, Any]) -> None:
    """2 jobs, ``energy=estimate,off``: the first links itself, the second (no monitor) is named."""
    parent, children = s["parent"], s["children"]
    assert parent.info.status == "FINISHED"
    assert len(children) == 1, [c.data.tags for c in children]
    child = children[0]
    own = s["client"].get_experiment_by_name("own_logger")
    assert child.info.experiment_id == own.experiment_id != parent.info.experiment_id
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["energy.sweep_id"] == parent.data.tags["energy.sweep_id"]
    assert child.data.tags["energy.sweep_job"] == "0"
    assert parent.data.metrics["sweep/n_runs"] == 1 and parent.data.metrics["sweep/n_unlinked"] == 1
    summary = _read_csv(s["dir"] / "summary.csv")
    assert [r["run_id"] for r in summary] == [child.info.run_id]
    assert float(summary[0][TOTAL_J]) == _total_j(child.data.metrics) > 0
    assert float(summary[0]["val_loss"]) == child.data.metrics["val_loss"]
    assert [r["run_id"] for r in _read_csv(s["dir"] / "pareto.csv")] == [child.info.run_id]
    assert (s["dir"] / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    unlinked = [line for line in s["stderr"].splitlines() if "has no MLflow run linked" in line]
    assert len(unlinked) == 1 and "sweep job #1 (" in unlinked[0] and "energy=off" in unlinked[0], s["stderr"][-3000:]


def test_sweep_of_an_app_with_its_own_logger_through_a_credentialed_server(tmp_path: Path) -> None:
    """The issue's "done when": every child, a summary and a chart; the canary password appears nowhere
    wattlog writes (params, tags, names, artifacts, spool, sweep files, warnings, logs)."""
    from mlflow_server import MlflowServer, make_template_db

    db = make_template_db(tmp_path / "server.db")
    with MlflowServer(db) as server:
        uri = f"http://wattlog:{CANARY}@127.0.0.1:{server.port}"
        s = _run_sweep(
            tmp_path, "energy=estimate,off", "link=app", f"logger.tracking_uri={uri}", f"+db.password={CANARY2}",
            module="tests.sweep_app", uri=uri, experiment="own_sweeps", extra=("root_dir={lightning}",),
            env_extra={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{server.port}"},
        )
        _check_own_logger_sweep(s)
        client = s["client"]
        for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
            _no_canary(f"run {run.info.run_id}", json.dumps(
                [run.info.run_name, run.data.params, run.data.tags, sorted(run.data.metrics)]))
        child = s["children"][0]
        assert child.data.tags["energy.overrides"] and "***" in child.data.tags["energy.overrides"]
        parent = s["parent"]
        assert parent.data.params["override.db.password"] == "***"
        assert parent.data.params["override.logger.tracking_uri"] == f"http://127.0.0.1:{server.port}"
        _no_canary("the parent's artifacts", _text_under(s["dir"]))
    # Hydra itself writes the overrides verbatim into .hydra/ and multirun.yaml, and logs them: not wattlog's
    _no_canary("the sweep dir", _text_under(s["sweep_dir"], skip=(".hydra", "multirun.yaml")))
    context = json.loads((s["sweep_dir"] / ".wattlog" / "sweep.json").read_text())
    assert context["tracking_uri"] == f"http://127.0.0.1:{server.port}" and context["tracking_uri_redacted"] is True
    assert stat.S_IMODE((s["sweep_dir"] / ".wattlog" / "sweep.json").stat().st_mode) == 0o600
    if (tmp_path / "spool").exists():
        _no_canary("the spool", _text_under(tmp_path / "spool"))
    mlflow_lines = ("View run", "View experiment", "[HYDRA]", "#0 :", "#1 :")  # MLflow's and Hydra's own output
    _no_canary("stdout/stderr", "\n".join(
        line for line in (s["stdout"] + s["stderr"]).splitlines() if not any(m in line for m in mlflow_lines)))


def test_sweep_links_a_run_through_the_monitor_alone(tmp_path: Path) -> None:
    s = _run_sweep(tmp_path, "energy=estimate,off", "link=monitor", module="tests.sweep_app",
                   experiment="own_sweeps", extra=("root_dir={lightning}",))
    _check_own_logger_sweep(s)


def test_submitit_local_sweep_end_to_end(tmp_path: Path) -> None:
    """``hydra/launcher=submitit_local``: jobs are pickled into submitit processes (a SLURM cluster's path)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # submitit starts the jobs in parallel: their MLFlowLoggers would race to create the new experiment
    # `own_logger` (Lightning calls get_experiment_by_name, then create_experiment; one job loses on the
    # unique name). The README's submitit section says to create it first; so does this test.
    s = _run_sweep(tmp_path, "--config-name=app_submitit", "energy=estimate,off", "link=app",
                   module="tests.sweep_app", experiment="own_sweeps", extra=("root_dir={lightning}",),
                   experiments=("own_logger",))
    _check_own_logger_sweep(s)
    assert list((s["sweep_dir"] / ".submitit").iterdir())  # the jobs really went through submitit
