"""Hydra integration, in process: discovery, composition, schema errors, instantiate_energy,
sweep-aware MLflow kwargs, and EnergySweepCallback against a real sqlite MLflow store."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from wattlog.errors import ConfigError, SinkError, WattlogWarning
from wattlog.integrations import hydra as wh

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
ENERGY_OPTIONS = ["default", "estimate", "nvml", "off"]


@pytest.fixture
def user_conf(tmp_path: Path) -> Path:
    """A user's own primary config with just the defaults line: no hydra.searchpath edits."""
    conf = tmp_path / "userconf"
    conf.mkdir()
    (conf / "app.yaml").write_text("defaults:\n  - energy: default\n  - _self_\nlr: 0.1\n")
    (conf / "app_off.yaml").write_text('defaults:\n  - energy: "off"\n  - _self_\n')
    return conf


@pytest.fixture
def composer(user_conf: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(user_conf), version_base="1.3"):
        yield compose
    GlobalHydra.instance().clear()


# ------------------------------------------------------------------------------------ discovery


def test_searchpath_plugin_is_discovered() -> None:
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    names = {f"{p.__module__}.{p.__name__}" for p in Plugins.instance().discover(SearchPathPlugin)}
    assert "hydra_plugins.wattlog.wattlog_searchpath.WattlogSearchPathPlugin" in names


def test_user_defaults_line_composes_and_lists_options(composer) -> None:
    cfg = composer("app")
    assert cfg.lr == 0.1
    assert cfg.energy._target_ == "wattlog.EnergyMonitor"
    energy = cfg.energy
    assert (energy.gpus, energy.cpu.name, energy.ram.name, energy.enabled) == ("auto", "auto", "auto", True)
    loader = GlobalHydra.instance().config_loader()
    assert loader.get_group_options("energy") == ENERGY_OPTIONS
    assert "energy_sweep" in loader.get_group_options("hydra/callbacks")


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("estimate", {"gpus": "none", "cpu": "estimate", "ram": "estimate", "require_gpu_counter": False}),
        ("nvml", {"gpus": "auto", "cpu": "none", "ram": "none", "require_gpu_counter": True}),
        ("default", {"gpus": "auto", "cpu": "auto", "ram": "auto", "require_gpu_counter": False}),
    ],
)
def test_options_switch(composer, option: str, expected: dict) -> None:
    cfg = composer("app", overrides=[f"energy={option}"])
    kwargs = wh.energy_kwargs(cfg)
    assert kwargs is not None
    assert {k: kwargs[k] for k in expected} == expected
    assert kwargs["pue"] == 1.0 and kwargs["target"] is None


def test_off_yields_no_callbacks(composer) -> None:
    assert composer("app", overrides=["energy=off"]).energy.enabled is False
    assert wh.instantiate_energy(composer("app", overrides=["energy=off"])) == []
    assert wh.instantiate_energy(composer("app_off")) == []
    assert wh.instantiate_energy({"energy": None}) == []


def test_toy_app_config_composes() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("hydra_toy", overrides=["energy=estimate"], return_hydra_config=True)
        assert cfg.energy.cpu.name == "estimate"
        cb = cfg.hydra.callbacks.energy_sweep
        assert cb._target_ == wh.SWEEP_CALLBACK_TARGET
        assert (cb.experiment_name, cb.metric, cb.mode) == ("hydra_toy", "val_r2", "max")
        opt = compose("hydra_toy_optuna", return_hydra_config=True)
        assert list(opt.hydra.sweeper.direction) == ["maximize", "minimize"]
        assert opt.objective.return_energy is True and opt.energy.enabled is True
    GlobalHydra.instance().clear()


# -------------------------------------------------------------------------------- schema errors


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("energy.cpu=rapll", ["rapll", "energy.cpu", "auto, rapl, estimate, none"]),
        ("energy.ram=dimm", ["dimm", "energy.ram", "auto, rapl, estimate, none"]),
        ("energy.pue=abc", ["abc", "energy.pue", "Float"]),
        ("energy.sample_interval_s=fast", ["fast", "energy.sample_interval_s"]),
        ("energy.target.mode=maxx", ["maxx", "energy.target.mode", "max, min"]),
        ("energy.bogus=1", ["bogus"]),
    ],
)
def test_schema_rejects_bad_values_at_composition(composer, override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        composer("app", overrides=[override])
    text = f"{info.value} {info.value.__cause__}"
    for needle in needles:
        assert needle in text


@pytest.mark.parametrize(
    ("energy", "field", "allowed"),
    [
        ({"cpu": "rapll"}, "energy.cpu", "'auto', 'rapl', 'estimate', 'none'"),
        ({"pue": "abc"}, "energy.pue", "Float"),
        ({"gpus": "all"}, "energy.gpus", "'auto', 'none', or a list"),
        ({"gpus": [0, -1]}, "energy.gpus", "'auto', 'none', or a list"),
        ({"gpus": True}, "energy.gpus", "'auto', 'none', or a list"),
        ({"target": {"metric": "val_acc"}}, "energy.target.value", "0.85"),
        ({"batch_size_fn": "no.such.module.fn"}, "energy.batch_size_fn", "callable"),
    ],
)
def test_energy_kwargs_config_errors_name_the_field(energy: dict, field: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        wh.energy_kwargs({"energy": energy})
    assert info.value.field == field
    assert allowed in str(info.value)


def test_energy_kwargs_converts_values() -> None:
    kwargs = wh.energy_kwargs(
        {
            "energy": {
                "gpus": 1,
                "cpu": "estimate",
                "target": {"metric": "val_acc", "value": 0.85},
                "batch_size_fn": "wattlog.batch.count_samples",
            }
        }
    )
    assert kwargs is not None
    assert kwargs["gpus"] == [1] and kwargs["cpu"] == "estimate" and isinstance(kwargs["cpu"], str)
    assert kwargs["target"] == {"metric": "val_acc", "value": 0.85, "mode": "max"}
    from wattlog.batch import count_samples

    assert kwargs["batch_size_fn"] is count_samples
    assert kwargs["_target_"] == "wattlog.EnergyMonitor" and "enabled" not in kwargs
    # the energy node itself works as well as the whole app config
    assert wh.energy_kwargs({"cpu": "none", "enabled": True})["cpu"] == "none"
    with pytest.raises(ConfigError) as info:
        wh.energy_kwargs({"lr": 0.1})
    assert info.value.field == "energy"


def test_instantiate_energy_builds_the_monitor(composer) -> None:
    pytest.importorskip("lightning")
    from wattlog import EnergyMonitor

    cfg = composer("app", overrides=["energy=estimate", "energy.pue=1.3", "energy.gpus=none"])
    callbacks = wh.instantiate_energy(cfg)
    assert len(callbacks) == 1 and isinstance(callbacks[0], EnergyMonitor)
    monitor = callbacks[0]
    o = monitor.options
    assert (o.cpu, o.ram, o.gpus, o.carbon.pue) == ("estimate", "estimate", "none", 1.3)
    assert type(wh.instantiate_energy(cfg.energy)[0]) is type(monitor)
    nvml = wh.instantiate_energy(composer("app", overrides=["energy=nvml"]))[0]
    assert nvml.options.require_gpu_counter is True and nvml.options.cpu == "none"


def test_plugin_import_stays_light() -> None:
    code = (
        "import sys, hydra_plugins.wattlog.wattlog_searchpath, wattlog.integrations.hydra;"
        "print(sorted(m for m in ('torch','lightning','mlflow','pandas','matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------- job side: mlflow_run_kwargs


def test_mlflow_run_kwargs_outside_a_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    HydraConfig.instance().cfg = None
    assert wh.mlflow_run_kwargs() == {
        "experiment_name": "Default",
        "tracking_uri": "sqlite:///mlflow.db",
        "run_name": None,
        "tags": {},
    }
    cfg = OmegaConf.create({"mlflow": {"experiment_name": "exp", "tracking_uri": "sqlite:///x.db"}})
    kw = wh.mlflow_run_kwargs(cfg, run_name="r")
    assert (kw["experiment_name"], kw["tracking_uri"], kw["run_name"]) == ("exp", "sqlite:///x.db", "r")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert wh.mlflow_run_kwargs()["tracking_uri"] == "sqlite:///env.db"


def test_overrides_as_params() -> None:
    params = wh.overrides_as_params(["+a.b=1", "~c", "db@x=y", "m=1,2"])
    assert params == {"a.b": "1", "db_x": "y", "m": "1,2"}


# --------------------------------------------------------------- EnergySweepCallback, in process


def _fake_multirun_config(sweep_dir: Path, overrides: list[str]) -> OmegaConf:
    return OmegaConf.create(
        {
            "hydra": {
                "sweep": {"dir": str(sweep_dir)},
                "overrides": {"task": overrides},
                "runtime": {"cwd": str(sweep_dir)},
            }
        }
    )


@pytest.fixture
def job_hydra_config(user_conf: Path, tmp_path: Path):
    """Set HydraConfig as inside job #1 of a multirun with the energy_sweep callback."""

    def _set(overrides: list[str], job_num: int = 1) -> None:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(user_conf), version_base="1.3"):
            cfg = compose(
                "app", overrides=["hydra/callbacks=energy_sweep", *overrides], return_hydra_config=True
            )
        GlobalHydra.instance().clear()
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(tmp_path / "sweep")
            cfg.hydra.job.num = job_num
            cfg.hydra.runtime.cwd = str(tmp_path)
        HydraConfig.instance().set_config(cfg)

    yield _set
    HydraConfig.instance().cfg = None


# Hand-checked: metric "acc" (max) vs kWh. B dominates C (better acc, less energy), A dominates E;
# D has the best acc; F failed without metrics. Front: A (1.0 kWh), B (2.0), D (4.0).
RUNS = {
    "A": (0.80, 1.0),
    "B": (0.85, 2.0),
    "C": (0.83, 3.0),
    "D": (0.90, 4.0),
    "E": (0.70, 1.5),
    "F": (None, None),
}


def test_sweep_callback_summary_pareto_and_child_linking(
    tmp_path: Path, job_hydra_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts under ./mlruns
    sweep_dir = tmp_path / "sweep"
    cb = wh.EnergySweepCallback(experiment_name="sweep-test", tracking_uri=uri, metric="acc", mode="max")
    cb.on_multirun_start(_fake_multirun_config(sweep_dir, ["lr=0.1,0.01", "+tag=x"]))
    record = json.loads((sweep_dir / wh.SWEEP_FILE).read_text())
    assert record["parent_run_id"] == cb.parent_run_id and record["tracking_uri"] == uri

    client = MlflowClient(uri)
    exp_id = record["experiment_id"]
    client.create_run(exp_id, run_name="not-a-child")  # must not appear in the summary
    ids = {}
    for num, (name, (acc, kwh)) in enumerate(RUNS.items()):
        job_hydra_config([f"lr={num}"], job_num=num)
        kw = wh.mlflow_run_kwargs(experiment_name="ignored-in-a-sweep", tracking_uri="sqlite:///ignored.db")
        assert kw["experiment_name"] == "sweep-test" and kw["tracking_uri"] == uri
        assert kw["tags"]["mlflow.parentRunId"] == cb.parent_run_id
        assert kw["tags"]["energy.sweep_id"] == record["sweep_id"]
        assert json.loads(kw["tags"]["energy.overrides"]) == [f"lr={num}"]
        assert kw["tags"]["energy.sweep_job"] == str(num) and kw["run_name"] == f"{num}"  # the differing value
        run = client.create_run(exp_id, run_name=name, tags=kw["tags"])
        ids[name] = run.info.run_id
        if acc is not None:
            client.log_metric(run.info.run_id, "acc", acc)
            client.log_metric(run.info.run_id, "energy/total_kwh", kwh / 2, step=0)
            client.log_metric(run.info.run_id, "energy/total_kwh", kwh, step=1)  # last value is the total
            client.log_metric(run.info.run_id, "energy/emissions_g", kwh * 475.0)
        client.set_terminated(run.info.run_id, "FINISHED" if acc is not None else "FAILED")

    cb2 = wh.EnergySweepCallback(experiment_name="sweep-test", tracking_uri=uri, metric="acc", mode="max")
    cb2.on_multirun_end(_fake_multirun_config(sweep_dir, []))  # finds the parent from the sweep file

    parent = client.get_run(cb.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["wattlog.best_by_energy"] == ids["A"]
    assert parent.data.tags["wattlog.best_by_metric"] == ids["D"]
    assert parent.data.params["override.lr"] == "0.1,0.01" and parent.data.params["override.tag"] == "x"
    assert parent.data.params["sweep.metric"] == "acc" and parent.data.params["sweep.mode"] == "max"
    assert parent.data.metrics["sweep/n_runs"] == 6 and parent.data.metrics["sweep/n_pareto"] == 3
    # the children logged kWh (wattlog < 0.2): read back in joules
    assert math.isclose(parent.data.metrics["sweep/total_j"], (1.0 + 2.0 + 3.0 + 4.0 + 1.5) * 3.6e6)
    assert {a.path for a in client.list_artifacts(cb.parent_run_id, "sweep")} == {
        "sweep/summary.csv",
        "sweep/pareto.csv",
        "sweep/pareto.png",
    }
    local = Path(client.download_artifacts(cb.parent_run_id, "sweep", str(tmp_path / "dl")))
    summary = list(csv.DictReader((local / "summary.csv").open()))
    assert [r["run_name"] for r in summary] == list(RUNS)
    assert {r["run_name"]: r["on_front"] for r in summary} == {
        "A": "True", "B": "True", "C": "False", "D": "True", "E": "False", "F": "False"
    }
    by_name = {r["run_name"]: r for r in summary}
    assert float(by_name["C"]["energy/total_j"]) == 3.0 * 3.6e6 and float(by_name["C"]["acc"]) == 0.83
    assert by_name["F"]["acc"] == "" and by_name["F"]["status"] == "FAILED"
    assert by_name["B"]["lr"] == "1" and by_name["B"]["job_num"] == "1"
    pareto = list(csv.DictReader((local / "pareto.csv").open()))
    assert [(r["run_name"], float(r["acc"]), float(r["energy/total_j"]) / 3.6e6) for r in pareto] == [
        ("A", 0.80, 1.0),
        ("B", 0.85, 2.0),
        ("D", 0.90, 4.0),
    ]
    assert (local / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_callback_failure_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cb = wh.EnergySweepCallback(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", metric="acc", mode="max")
    config = _fake_multirun_config(tmp_path / "no-sweep-here", [])
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    with pytest.raises(SinkError, match="no parent run"):
        cb.on_multirun_end(config)
    monkeypatch.setenv("WATTLOG_STRICT", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb.on_multirun_end(config)
    assert any(issubclass(w.category, WattlogWarning) and "summarise" in str(w.message) for w in caught)


def test_aborted_sweep_ends_parent_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cb = wh.EnergySweepCallback(experiment_name="abort", tracking_uri=uri, metric="acc", mode="max")
    cb.on_multirun_start(_fake_multirun_config(tmp_path / "sweep", ["lr=1,2"]))
    client = MlflowClient(uri)
    parent = client.get_run(cb.parent_run_id)
    child = client.create_run(parent.info.experiment_id, tags={"mlflow.parentRunId": cb.parent_run_id})
    client.log_metric(child.info.run_id, "acc", 0.5)
    client.log_metric(child.info.run_id, "energy/total_kwh", 0.1)
    cb._at_exit()  # what atexit runs when a failed job made Hydra skip on_multirun_end
    parent = client.get_run(cb.parent_run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["wattlog.best_by_metric"] == child.info.run_id
    assert {a.path for a in client.list_artifacts(cb.parent_run_id, "sweep")} >= {"sweep/summary.csv"}
    cb._at_exit()  # idempotent


def test_sweep_callback_validates_its_config() -> None:
    with pytest.raises(ConfigError) as info:
        wh.EnergySweepCallback(metric="acc", mode="maximize")
    assert info.value.field == "hydra.callbacks.energy_sweep.mode"


def test_relative_sqlite_uri_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wattlog.integrations.hydra_sweep import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("http://host:5000") == "http://host:5000"


def test_make_mlflow_logger_merges_user_tags(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    from mlflow import MlflowClient

    from wattlog.integrations.hydra import make_mlflow_logger

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'tags.db'}"
    logger = make_mlflow_logger(experiment_name="tags", tracking_uri=uri, tags={"team": "nlp"})
    assert MlflowClient(uri).get_run(logger.run_id).data.tags["team"] == "nlp"


@pytest.mark.parametrize("preset", ["default", "estimate", "nvml", "off"])
def test_every_packaged_preset_instantiates_with_plain_hydra(composer, preset):
    """``hydra.utils.instantiate(cfg.energy)`` works for every preset (no wattlog helper needed)."""
    pytest.importorskip("lightning")
    from hydra.utils import instantiate

    cfg = composer("app", overrides=[f"energy={preset}"])
    monitor = instantiate(cfg.energy)
    assert type(monitor).__name__ == "EnergyMonitor"
    assert monitor.options.enabled is (preset != "off")


def test_sweep_parent_experiment_created_by_another_sweep_meanwhile_is_reused() -> None:
    """Two sweeps starting at once: the second's create_experiment fails on the unique name; it reuses the first's."""
    from types import SimpleNamespace

    from wattlog.integrations.hydra_sweep import _experiment_id

    class RacingClient:
        def __init__(self) -> None:
            self.created: SimpleNamespace | None = None

        def get_experiment_by_name(self, name: str) -> SimpleNamespace | None:
            return self.created

        def create_experiment(self, name: str) -> str:
            self.created = SimpleNamespace(experiment_id="7")  # the other sweep won
            raise RuntimeError("UNIQUE constraint failed: experiments.name")

    assert _experiment_id(RacingClient(), "bert") == "7"

    class Broken(RacingClient):
        def create_experiment(self, name: str) -> str:
            raise RuntimeError("permission denied")

    with pytest.raises(RuntimeError, match="permission denied"):
        _experiment_id(Broken(), "bert")
