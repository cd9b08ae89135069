"""Bad input everywhere (issue 7, item 7): every input gives a clear message naming the problem.

- ``EnergyMonitor``: every argument with a wrong type or value raises ConfigError naming the field.
- Hydra: every field of ``EnergyConfig`` with a wrong type/value, through ``compose`` +
  ``instantiate_energy``: the schema rejects wrong types at composition (Hydra's error, naming
  ``energy.<field>``); wrong values raise ConfigError naming ``energy.<field>``.
- An unknown country through the callback: one warning and the world average (non-strict), or
  ConfigError naming ``country`` out of ``trainer.fit`` (strict).
- CLIs (``compare``, ``report``, ``sync``) on runs lacking energy keys, NaN/inf values, metric names
  MLflow rejects, unknown run ids and non-spool files: exit code 2 and one ``error:`` line on
  stderr, never a traceback; the Python API raises WattlogError subclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import pytest

from wattlog.errors import ConfigError, SinkError, WattlogError, WattlogWarning

# ------------------------------------------------------------------------------ EnergyMonitor

NAN, INF = float("nan"), float("inf")

MONITOR_CASES = [
    ({"gpus": [-1]}, "gpus"), ({"gpus": "0"}, "gpus"), ({"gpus": [True]}, "gpus"), ({"gpus": 5}, "gpus"),
    ({"gpus": [0.0]}, "gpus"), ({"gpus": None}, "gpus"), ({"gpus": []}, "gpus"), ({"gpus": [1, 1]}, "gpus"),
    ({"cpu": None}, "cpu"), ({"cpu": 1}, "cpu"), ({"cpu": ["auto"]}, "cpu"), ({"ram": True}, "ram"),
    ({"ram": "RAPL"}, "ram"),
    ({"pue": NAN}, "pue"), ({"pue": INF}, "pue"), ({"pue": None}, "pue"), ({"pue": True}, "pue"),
    ({"pue": "1.2"}, "pue"),
    ({"carbon_intensity": NAN}, "carbon_intensity"), ({"carbon_intensity": INF}, "carbon_intensity"),
    ({"carbon_intensity": "400"}, "carbon_intensity"), ({"carbon_intensity": True}, "carbon_intensity"),
    ({"target": ("m",)}, "target"), ({"target": "val_acc"}, "target"), ({"target": {"value": 1}}, "target"),
    ({"target": {"metric": "m", "value": "high"}}, "target.value"),
    ({"target": {"metric": "m", "value": None}}, "target.value"),
    ({"target": ["m", 1, "up"]}, "target.mode"),
    ({"sample_interval_s": True}, "sample_interval_s"), ({"sample_interval_s": NAN}, "sample_interval_s"),
    ({"sample_interval_s": "0.02"}, "sample_interval_s"), ({"sample_interval_s": 11}, "sample_interval_s"),
    ({"log_every_n_steps": 1.5}, "log_every_n_steps"), ({"log_every_n_steps": True}, "log_every_n_steps"),
    ({"log_every_n_steps": "5"}, "log_every_n_steps"), ({"log_every_n_steps": -1}, "log_every_n_steps"),
    ({"country": 5}, "country"), ({"country": "  "}, "country"), ({"region": ""}, "region"),
    ({"region": 5}, "region"),
    ({"idle_baseline_s": NAN}, "idle_baseline_s"), ({"idle_baseline_s": True}, "idle_baseline_s"),
    ({"idle_baseline_s": 1e9}, "idle_baseline_s"),
    ({"progress_bar": 1}, "progress_bar"), ({"per_device": None}, "per_device"),
    ({"artifacts": "no"}, "artifacts"),
    ({"require_gpu_counter": 0}, "require_gpu_counter"), ({"sync_cuda": "yes"}, "sync_cuda"),
    ({"batch_size_fn": "len"}, "batch_size_fn"),
    pytest.param({"target": {"metric": "m", "value": NAN}}, "target.value"),
    pytest.param({"target": {"metric": "m", "value": True}}, "target.value"),
    pytest.param({"target": {"metric": 5, "value": 1}}, "target.metric"),
    pytest.param({"target": {"metric": "", "value": 1}}, "target.metric"),
    pytest.param({"spool_dir": 3}, "spool_dir"),
    pytest.param({"spool_dir": ""}, "spool_dir"),
    pytest.param({"powercap_root": 3}, "powercap_root"),
]


@pytest.mark.parametrize(("kwargs", "field"), MONITOR_CASES)
def test_energy_monitor_bad_argument_names_the_field(kwargs, field) -> None:
    pytest.importorskip("lightning")
    from wattlog import EnergyMonitor

    with pytest.raises(ConfigError) as info:
        EnergyMonitor(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}=") and "allowed" in str(info.value)


def test_select_sources_rejects_bad_powercap_root() -> None:
    """What EnergyMonitor(powercap_root=3) hits at setup today: a ConfigError, not os.fspath's TypeError."""
    from wattlog.sources import select_sources

    for bad in (3, None, ""):
        with pytest.raises(ConfigError, match=r"^powercap_root="):
            select_sources("none", "estimate", "none", powercap_root=bad)


# ------------------------------------------------------------------------------ Hydra

# (override, field, where): "compose" = the schema rejects it while composing (Hydra's
# ConfigCompositionException naming the key); "instantiate" = ConfigError from instantiate_energy.
HYDRA_CASES = [
    ("energy._target_=no.such.Monitor", "energy._target_", "instantiate"),
    ("energy._target_=null", "energy._target_", "compose"),
    ("energy.enabled=maybe", "energy.enabled", "compose"),
    ("energy.gpus=all", "energy.gpus", "instantiate"),
    ("energy.gpus=[-1]", "energy.gpus", "instantiate"),
    ("energy.gpus=[0,0]", "energy.gpus", "instantiate"),
    ("energy.gpus=[]", "energy.gpus", "instantiate"),
    ("energy.gpus=true", "energy.gpus", "instantiate"),
    ("energy.gpus=1.5", "energy.gpus", "instantiate"),
    ("energy.gpus='0'", "energy.gpus", "instantiate"),
    ("energy.gpus={a:1}", "energy.gpus", "instantiate"),
    ("energy.cpu=rapll", "energy.cpu", "compose"),
    ("energy.cpu=1", "energy.cpu", "compose"),
    ("energy.ram=null", "energy.ram", "compose"),
    ("energy.country=''", "energy.country", "instantiate"),
    ("energy.country=[FRA]", "energy.country", "compose"),
    ("energy.region=''", "energy.region", "instantiate"),
    ("energy.region=[a]", "energy.region", "compose"),
    ("energy.carbon_intensity=-1", "energy.carbon_intensity", "instantiate"),
    ("energy.carbon_intensity=nan", "energy.carbon_intensity", "instantiate"),
    ("energy.carbon_intensity=inf", "energy.carbon_intensity", "instantiate"),
    ("energy.carbon_intensity=abc", "energy.carbon_intensity", "compose"),
    ("energy.pue=0.5", "energy.pue", "instantiate"),
    ("energy.pue=nan", "energy.pue", "instantiate"),
    ("energy.pue=inf", "energy.pue", "instantiate"),
    ("energy.pue=null", "energy.pue", "compose"),
    ("energy.log_every_n_steps=0", "energy.log_every_n_steps", "instantiate"),
    ("energy.log_every_n_steps=1.5", "energy.log_every_n_steps", "compose"),
    ("energy.sample_interval_s=0", "energy.sample_interval_s", "instantiate"),
    ("energy.sample_interval_s=nan", "energy.sample_interval_s", "instantiate"),
    ("energy.sample_interval_s=true", "energy.sample_interval_s", "compose"),
    ("energy.sync_cuda=maybe", "energy.sync_cuda", "compose"),
    ("energy.per_device=maybe", "energy.per_device", "compose"),
    ("energy.target.metric=val_acc", "energy.target.value", "instantiate"),
    ("energy.target.value=0.9", "energy.target.metric", "instantiate"),
    ("energy.target={metric:m,value:nan}", "energy.target.value", "instantiate"),
    ("energy.target={metric:'',value:1}", "energy.target.metric", "instantiate"),
    ("energy.target.value=high", "energy.target.value", "compose"),
    ("energy.target.mode=up", "energy.target.mode", "compose"),
    ("energy.target=5", "energy.target", "compose"),
    ("energy.idle_baseline_s=-1", "energy.idle_baseline_s", "instantiate"),
    ("energy.idle_baseline_s=nan", "energy.idle_baseline_s", "instantiate"),
    ("energy.progress_bar=abc", "energy.progress_bar", "compose"),
    ("energy.batch_size_fn=nope.no_fn", "energy.batch_size_fn", "instantiate"),
    ("energy.batch_size_fn=os.sep", "energy.batch_size_fn", "instantiate"),
    ("energy.require_gpu_counter=x", "energy.require_gpu_counter", "compose"),
    ("energy.spool_dir=''", "energy.spool_dir", "instantiate"),
    ("energy.spool_dir=[1]", "energy.spool_dir", "compose"),
    ("energy.artifacts=x", "energy.artifacts", "compose"),
    ("energy.cpu_scope=machine", "energy.cpu_scope", "compose"),
    ("energy.require_mlflow=x", "energy.require_mlflow", "compose"),
    ("energy.powercap_root=''", "energy.powercap_root", "instantiate"),
    ("energy.collective_timeout_s=0", "energy.collective_timeout_s", "instantiate"),
    ("energy.delivery_timeout_s=-1", "energy.delivery_timeout_s", "instantiate"),
]


@pytest.fixture(scope="module")
def compose_energy(tmp_path_factory):
    """``compose`` of a user's app with ``- energy: default`` (one Hydra initialisation per module)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = tmp_path_factory.mktemp("userconf")
    (conf / "app.yaml").write_text("defaults:\n  - energy: default\n  - _self_\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        yield lambda overrides: compose("app", overrides=overrides)
    GlobalHydra.instance().clear()


def test_every_energy_config_field_has_a_bad_input_case() -> None:
    from wattlog.integrations.hydra import EnergyConfig

    covered = {field.split(".")[1] for _, field, _ in HYDRA_CASES}
    assert {f.name for f in dataclasses.fields(EnergyConfig)} <= covered


@pytest.mark.parametrize(("override", "field", "where"), HYDRA_CASES)
def test_hydra_bad_field_names_the_field(compose_energy, capfd, override, field, where) -> None:
    pytest.importorskip("lightning")
    from hydra.errors import ConfigCompositionException

    from wattlog.integrations.hydra import instantiate_energy

    if where == "compose":
        with pytest.raises(ConfigCompositionException) as info:
            compose_energy([override])
        text = f"{info.value} {info.value.__cause__}"
        assert field in text and override.split("=", 1)[0] in text
    else:
        cfg = compose_energy([override])
        with pytest.raises(ConfigError) as info:
            instantiate_energy(cfg)
        assert info.value.field == field
        assert str(info.value).startswith(f"{field}=") and "allowed" in str(info.value)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # nothing logged by a dependency on the way


def test_hydra_good_config_still_instantiates(compose_energy) -> None:
    pytest.importorskip("lightning")
    from wattlog.integrations.hydra import instantiate_energy

    cfg = compose_energy(["energy.gpus=[0,1]", "energy.pue=1.1", "energy.target={metric:val_acc,value:0.8}",
                          "energy.batch_size_fn=len", "energy.country=FRA"])
    (monitor,) = instantiate_energy(cfg)
    o = monitor.options
    assert o.gpus == [0, 1] and o.carbon.pue == 1.1 and o.batch_size_fn is len and o.carbon.country == "FRA"
    assert (o.target.metric, o.target.value, o.target.mode) == ("val_acc", 0.8, "max")


# ------------------------------------------------------------------------------ unknown country


def _fit_with_country(uri: str, tmp_path: Path, country: str):
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning_helpers import loader, make_module

    from wattlog import EnergyMonitor

    pl, module = make_module()
    logger = MLFlowLogger(experiment_name="country", tracking_uri=uri)
    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="none", country=country, log_every_n_steps=1,
                            artifacts=False)
    trainer = pl.Trainer(max_steps=3, callbacks=[monitor], logger=logger, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, default_root_dir=tmp_path,
                         accelerator="cpu")
    trainer.fit(module, loader(16))
    return logger.run_id


def test_unknown_country_non_strict_warns_once_and_uses_world_average(store, tmp_path, monkeypatch) -> None:
    pytest.importorskip("lightning")
    from mlflow import MlflowClient

    from wattlog.units import WORLD_AVERAGE_G_PER_KWH

    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_id = _fit_with_country(store["uri"], tmp_path, "XYZ")
    ours = [str(w.message) for w in caught if issubclass(w.category, WattlogWarning)]
    assert len(ours) == 1 and "unknown country 'XYZ'" in ours[0], ours
    params = MlflowClient(store["uri"]).get_run(run_id).data.params
    assert params["energy.carbon_source"].startswith("default:world_average")
    assert "XYZ" in params["energy.carbon_source"]
    assert float(params["energy.carbon_intensity_g_per_kwh"]) == WORLD_AVERAGE_G_PER_KWH


def test_unknown_country_strict_is_config_error_before_training(store, tmp_path, monkeypatch) -> None:
    pytest.importorskip("lightning")
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    with pytest.raises(ConfigError) as info:
        _fit_with_country(store["uri"], tmp_path, "XYZ")
    assert info.value.field == "country" and info.value.value == "XYZ"


# ------------------------------------------------------------------------------ CLIs


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Runs with energy, without energy keys, with NaN/inf energy, and with an inf metric."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("badstore")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("bad")
    ids = {}
    runs = {
        "good": {"energy/total_kwh": 0.002, "val_acc": 0.7},
        "cheap": {"energy/total_kwh": 0.001, "val_acc": 0.6},
        "noenergy": {"val_acc": 0.9},
        "nan_energy": {"energy/total_kwh": NAN, "energy/emissions_g": -INF, "val_acc": 0.95},
        "inf_energy": {"energy/total_kwh": INF, "val_acc": 0.99},
        "inf_metric": {"energy/total_kwh": 0.0005, "val_acc": INF},
    }
    for name, metrics in runs.items():
        rid = client.create_run(exp, run_name=name).info.run_id
        for key, value in metrics.items():
            client.log_metric(rid, key, value, step=1)
        client.set_terminated(rid)
        ids[name] = rid
    return {"uri": uri, "ids": ids, "root": root}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from wattlog.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_error_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def test_sqlite_keeps_nan_and_clamps_inf(store) -> None:
    """What MLflow's SQL store returns for non-finite values: NaN as NaN, +-inf as +-float max."""
    import sys

    from mlflow import MlflowClient

    metrics = MlflowClient(store["uri"]).get_run(store["ids"]["nan_energy"]).data.metrics
    assert math.isnan(metrics["energy/total_kwh"])
    assert metrics["energy/emissions_g"] == -sys.float_info.max


def test_compare_treats_missing_and_non_finite_energy_as_missing(store, capsys) -> None:
    rc, out, err = _cli(capsys, "compare", "-e", "bad", "--metric", "val_acc", "--format", "json",
                        "--baseline", "first", "--tracking-uri", store["uri"])
    assert rc == 0 and err == ""
    rows = {r["run_name"]: r for r in json.loads(out)}
    for name in ("noenergy", "nan_energy", "inf_energy"):
        assert rows[name]["missing_energy"] is True and rows[name]["total_j"] is None, name
        assert rows[name]["pareto"] is False
    assert rows["nan_energy"]["emissions_g"] is None
    assert rows["inf_metric"]["val_acc"] is None and rows["inf_metric"]["pareto"] is False
    assert {n for n, r in rows.items() if r["pareto"]} == {"good", "cheap"}
    assert rows["good"]["delta_j"] == pytest.approx(0.0)  # baseline: the first run with finite energy
    assert rows["cheap"]["delta_j"] == pytest.approx(-0.001 * 3.6e6)


def test_compare_table_footnotes_non_finite(store, capsys) -> None:
    rc, out, err = _cli(capsys, "compare", "-e", "bad", "--metric", "val_acc", "--format", "markdown",
                        "--tracking-uri", store["uri"])
    assert rc == 0 and err == ""
    assert "NaN/inf value was logged" in out and "inf_energy: energy/total_kwh" in out
    assert "1.798e+308" not in out


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--metric", "val acc!"], ["metric='val acc!'", "val_acc"]),  # a name MLflow rejects
        (["--metric", "val_acc/../x"], ["metric=", "val_acc"]),
        (["--metric", "a'b"], ["metric=", "val_acc"]),
        (["--metric", "no_such_metric", "--target", "0.5"], ["metric='no_such_metric'"]),
        (["-e", "no-such-experiment"], ["experiment='no-such-experiment'"]),
        (["--filter", "params.x ==== 1"], ["filter="]),
        (["--sort", "bogus column"], ["sort='bogus column'"]),
        (["--metric", "val_acc", "--baseline", "no-such-run"], ["baseline='no-such-run'"]),
        (["--target", "0.5"], ["--target needs --metric"]),
    ],
)
def test_compare_bad_input_is_one_error_line(store, capsys, argv, needles) -> None:
    base = [] if "-e" in argv else ["-e", "bad"]
    rc, out, err = _cli(capsys, "compare", *base, *argv, "--tracking-uri", store["uri"])
    _assert_one_error_line(rc, err, *needles)
    assert out == ""


@pytest.mark.parametrize("run_id", ["0123456789abcdef0123456789abcdef", "../etc", "not a run"])
def test_report_unknown_run_is_one_error_line(store, capsys, tmp_path, run_id) -> None:
    out_dir = str(tmp_path / "rep")
    rc, out, err = _cli(capsys, "report", run_id, "--out", out_dir, "--tracking-uri", store["uri"])
    _assert_one_error_line(rc, err, "run_id=")
    assert not (tmp_path / "rep").exists()


def test_report_bad_metric_and_non_finite_energy(store, capsys, tmp_path) -> None:
    rc, _, err = _cli(capsys, "report", store["ids"]["good"], "--metric", "val acc!",
                      "--out", str(tmp_path / "r1"), "--tracking-uri", store["uri"])
    _assert_one_error_line(rc, err, "metric='val acc!'", "val_acc")
    rc, out, err = _cli(capsys, "report", store["ids"]["nan_energy"], "--out", str(tmp_path / "r2"),
                        "--tracking-uri", store["uri"])
    assert rc == 0 and "Traceback" not in err
    assert "non-finite energy/total_kwh" in out


def test_report_missing_store_is_one_error_line(capsys, tmp_path) -> None:
    rc, _, err = _cli(capsys, "report", "abc", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    _assert_one_error_line(rc, err, "no MLflow database")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("mlflow_copy.db", b"SQLite format 3\x00" + bytes(range(256)) * 4),
        ("notes.txt", b"hello\nworld\n"),
        ("empty.jsonl", b""),
        ("other.jsonl", b'{"some": "json"}\n{"more": 1}\n'),
        ("binary.jsonl", b"\xff\xfe\x00garbage"),
    ],
)
def test_sync_on_a_non_spool_file_is_one_error_line(store, capsys, tmp_path, name, content) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    rc, out, err = _cli(capsys, "sync", "--spool", str(path), "--tracking-uri", store["uri"])
    _assert_one_error_line(rc, err, str(path))
    assert out == ""


def test_sync_missing_spool_is_one_error_line(store, capsys, tmp_path) -> None:
    rc, _, err = _cli(capsys, "sync", "--spool", str(tmp_path / "nope"), "--tracking-uri", store["uri"])
    _assert_one_error_line(rc, err, "no spool at")


# ------------------------------------------------------------------------------ Python API


def test_python_api_raises_wattlog_errors(store, tmp_path) -> None:
    from wattlog.compare import compare_runs, energy_to_target
    from wattlog.report import build_report
    from wattlog.sinks.sync import sync

    uri = store["uri"]
    bad_calls = [
        lambda: compare_runs("bad", metric="val acc!", tracking_uri=uri),
        lambda: compare_runs("bad", mode="up", tracking_uri=uri),
        lambda: compare_runs("no-such-experiment", tracking_uri=uri),
        lambda: compare_runs(runs=["0123456789abcdef0123456789abcdef"], tracking_uri=uri),
        lambda: compare_runs(runs=["../x"], tracking_uri=uri),
        lambda: compare_runs("bad", filter="params.x ==== 1", tracking_uri=uri),
        lambda: compare_runs("bad", target=0.5, tracking_uri=uri),
        lambda: energy_to_target(store["ids"]["good"], "val_acc", 0.5, mode="up", tracking_uri=uri),
        lambda: build_report("0123456789abcdef0123456789abcdef", tmp_path / "r", tracking_uri=uri),
        lambda: build_report("../etc", tmp_path / "r", tracking_uri=uri),
        lambda: build_report(store["ids"]["good"], tmp_path / "r", metric="val acc!", tracking_uri=uri),
    ]
    for call in bad_calls:
        with pytest.raises(ConfigError):
            call()
    not_spool = tmp_path / "x.jsonl"
    not_spool.write_text("{}\n")
    with pytest.raises(SinkError):
        sync(not_spool, uri)
    assert issubclass(SinkError, WattlogError)
    # NaN/inf energy never reaches a Pareto front or an energy-to-target figure
    df = compare_runs("bad", metric="val_acc", target=0.5, tracking_uri=uri)
    by_name = df.set_index("run_name")
    assert math.isnan(by_name.loc["inf_energy", "j_to_target"])
    assert set(df.attrs["non_finite"]) == {
        "nan_energy: energy/total_kwh", "nan_energy: energy/emissions_g", "inf_energy: energy/total_kwh",
        "inf_metric: val_acc",
    }


# ------------------------------------------------------------------------------ every CLI input (issue 12, item 5)

CANARY_PW = "CANARYpw7361"

# (argv, words the one error line must contain); "{dir}", "{file}" and "{uri}" are filled in per test
CLI_INPUT_CASES = [
    # bad numbers
    (["measure", "--seconds", "-1"], ["--seconds=-1", "greater than 0"]),
    (["measure", "--seconds", "0"], ["--seconds=0"]),
    (["measure", "--seconds", "nan"], ["--seconds=nan", "finite"]),
    (["measure", "--seconds", "inf"], ["--seconds=inf", "finite"]),
    (["measure", "--seconds=-inf"], ["--seconds=-inf"]),
    (["measure", "--seconds", "1e9"], ["--seconds=", "at most 3600"]),
    (["measure", "--seconds", "two"], ["--seconds", "invalid float"]),
    (["compare", "-e", "bad", "--metric", "val_acc", "--target", "nan"], ["--target=nan", "finite"]),
    (["compare", "-e", "bad", "--metric", "val_acc", "--target", "inf"], ["--target=inf", "finite"]),
    (["compare", "-e", "bad", "--metric", "val_acc", "--target", "high"], ["--target", "invalid float"]),
    # bad choices
    (["devices", "--gpus", "zero"], ["--gpus='zero'"]),
    (["devices", "--gpus", "0,0"], ["--gpus='0,0'", "twice"]),
    (["devices", "--gpus", "-1"], ["--gpus"]),
    (["devices", "--cpu", "fast"], ["--cpu='fast'", "estimate"]),
    (["devices", "--ram", "RAPL"], ["--ram='RAPL'"]),
    (["measure", "--cpu", "fast"], ["--cpu='fast'"]),
    (["measure", "--gpus", "a,b"], ["--gpus='a,b'"]),
    (["compare", "-e", "bad", "--mode", "up"], ["--mode", "invalid choice"]),
    (["compare", "-e", " "], ["--experiment", "empty"]),
    (["sync", "--spool", ""], ["--spool", "empty"]),
    # bad paths
    (["compare", "-e", "bad", "--metric", "val_acc", "--plot", "{dir}"], ["--plot=", "is a directory"]),
    (["compare", "-e", "bad", "--metric", "val_acc", "--plot", "{file}/x.png"], ["--plot=", "is a file"]),
    (["report", "RUN", "--out", "{file}"], ["--out=", "not a directory"]),
    (["report", "RUN", "--out", "{file}/sub"], ["--out=", "is a file"]),
    (["sync", "--spool", "{dir}/missing"], ["no spool at"]),
    # bad URIs (the error line shows them redacted)
    *[
        ([cmd, *rest, "--tracking-uri", uri], words)
        for cmd, rest in (("compare", ["-e", "bad"]), ("report", ["RUN"]), ("sync", ["--spool", "{dir}"]))
        for uri, words in (
            (f"http://user:{CANARY_PW}@:5000", ["no host"]),
            (f"http://user:{CANARY_PW}@host:99999", ["Port"]),
            ("https://", ["no host"]),
            ("sqlite://relative.db", ["sqlite:///"]),
            ("sqlite:///", ["sqlite:///"]),
            ("nosuchscheme://host/x", ["unknown scheme"]),
            ("http://host:5000/ x", ["spaces"]),
            ("", ["empty"]),
        )
    ],
    # stores that do not exist are errors too, never created
    (["compare", "-e", "bad", "--tracking-uri", "sqlite:///{dir}/none.db"], ["no MLflow database"]),
    (["sync", "--spool", "{spool}", "--tracking-uri", "sqlite:///{dir}/none.db"], ["no MLflow database"]),
]


def _fill(argv: list[str], values: dict[str, str]) -> list[str]:
    return [a.format(**values) for a in argv]


@pytest.mark.parametrize(("argv", "needles"), CLI_INPUT_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) and v
                         and v[0] in ("devices", "measure", "compare", "report", "sync") else None)
def test_every_cli_input_is_exit_2_and_one_error_line(store, capsys, tmp_path, argv, needles) -> None:
    from wattlog.sinks import spool as sp

    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    spool = sp.spool_file(tmp_path / "sp", store["ids"]["good"])
    spool.parent.mkdir()
    spool.write_bytes(sp.header_line(store["ids"]["good"], None))
    values = {"dir": str(tmp_path), "file": str(a_file), "spool": str(spool)}
    argv = _fill(argv, values)
    if "RUN" in argv:
        argv[argv.index("RUN")] = store["ids"]["good"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, out, err = _cli(capsys, *argv)
    _assert_one_error_line(rc, err, *needles)
    assert CANARY_PW not in err and out == ""
    assert "error: " in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing was written


def test_cli_table_covers_every_subcommand() -> None:
    from wattlog.cli import _CHECKS

    covered = {argv[0] for argv, _ in CLI_INPUT_CASES}
    assert covered == set(_CHECKS) == {"devices", "measure", "compare", "report", "sync"}


@pytest.mark.parametrize("seconds", [-1, 0, NAN, INF, True, "2"])
def test_measure_workload_rejects_bad_seconds(seconds) -> None:
    from wattlog.measure import measure_workload

    with pytest.raises(ConfigError, match="seconds"):
        measure_workload(seconds, gpus="none", cpu="none", ram="none")


def test_good_cli_inputs_still_pass_the_checks(tmp_path) -> None:
    import argparse

    from wattlog.cli import validate_args

    ok = argparse.Namespace(command="measure", seconds=0.5, gpus="0,1", cpu="estimate", ram="none")
    validate_args(ok)
    assert ok.gpus == [0, 1] and ok.seconds == 0.5
    for uri in ("http://host:5000", "https://u:p@host/x?token=t", "sqlite:///rel.db", "sqlite:////abs.db",
                "postgresql+psycopg2://u:p@db:5432/mlflow", "file:///tmp/mlruns", "./mlruns", "databricks", None):
        validate_args(argparse.Namespace(command="sync", spool=None, spool_arg=None, tracking_uri=uri))
    validate_args(argparse.Namespace(command="report", out=str(tmp_path / "new" / "dir"), tracking_uri=None))
    validate_args(argparse.Namespace(command="compare", experiments=["e"], target=0.5,
                                     plot=str(tmp_path / "new" / "p.png"), tracking_uri=None))
