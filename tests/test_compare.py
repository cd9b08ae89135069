"""wattlog.compare against a real sqlite MLflow store filled through MlflowClient."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import socket
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from wattlog.compare import (
    compare_runs,
    energy_to_target,
    interpolate_cumulative,
    interpolate_kwh,
    redact_uri,
    register_cli,
    to_markdown,
)
from wattlog.errors import ConfigError

T0_MS = 1_700_000_000_000
KWH = 3.6e6  # joules

# name: (total energy in kWh (logged as joules), val_acc, val_loss, estimated tag or None, params)
RUNS_A = {
    "base": (0.010, 0.80, 0.50, "cpu,ram", {"lr": "0.1", "prune": "0.0"}),
    "pruned": (0.006, 0.78, 0.40, "cpu,ram", {"lr": "0.1", "prune": "0.3"}),
    "big": (0.020, 0.85, 0.60, "cpu,ram", {"lr": "0.1", "prune": "0.0"}),
    "dominated": (0.015, 0.79, 0.30, "cpu,ram", {"lr": "0.1", "prune": "0.6"}),
    "tie": (0.020, 0.85, 0.60, "cpu,ram", {"lr": "0.1", "prune": "0.0"}),
    "noenergy": (None, 0.99, 0.10, None, {"lr": "0.1", "prune": "0.0"}),
    "measured": (0.006, 0.70, 0.45, "none", {"lr": "0.1", "prune": "0.9"}),
}
FRONT_MAX_ACC = {"pruned", "base", "big", "tie"}
FRONT_MIN_LOSS = {"pruned", "dominated"}


def _energy_metrics(total: float, ts: int, legacy: bool = False) -> list[Metric]:
    """Summary metrics of a run of ``total`` kWh: joule keys, or the kWh keys of wattlog < 0.2."""
    scale, suffix = (1.0, "kwh") if legacy else (KWH, "j")
    values = {
        f"energy/total_{suffix}": total * scale,
        f"energy/gpu_{suffix}": total * 0.8 * scale,
        f"energy/cpu_{suffix}": total * 0.15 * scale,
        f"energy/ram_{suffix}": total * 0.05 * scale,
        "energy/emissions_g": total * 475.0,
        "energy/j_per_sample": total * 3.6e6 / 1000,
        "energy/test_j_per_sample": total * 3.6e6 / 2000,
        "energy/avg_power_w": 100.0,
        "energy/duration_s": total * 3.6e6 / 100.0,
    }
    return [Metric(k, v, ts, 100) for k, v in values.items()]


def _add_run(
    client: MlflowClient,
    exp_id: str,
    name: str,
    start_ms: int,
    metrics: list[Metric],
    params: dict[str, str],
    tags: dict[str, str],
) -> str:
    run = client.create_run(exp_id, start_time=start_ms, run_name=name)
    client.log_batch(
        run.info.run_id,
        metrics=metrics,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run.info.run_id, end_time=start_ms + 60_000)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    ids: dict[str, str] = {}
    exp_a = client.create_experiment("exp-a", artifact_location=str(root / "artifacts"))
    for i, (name, (total, acc, loss, est, params)) in enumerate(RUNS_A.items()):
        ts = T0_MS + i * 1000
        metrics = [Metric("val_acc", acc, ts, 100), Metric("val_loss", loss, ts, 100)]
        all_params = {**params, "variant": name}  # every run its own config: no replicates here
        tags = {}
        if total is not None:
            metrics += _energy_metrics(total, ts)
            all_params.update(
                {
                    "energy.cpu_method": "estimate",
                    "energy.ram_method": "estimate",
                    "energy.gpu_method": "counter",
                }
            )
            tags["energy.estimated"] = est
        ids[name] = _add_run(client, exp_a, name, ts, metrics, all_params, tags)
    exp_b = client.create_experiment("exp-b", artifact_location=str(root / "artifacts"))
    for i, (name, total, acc) in enumerate([("b1", 0.030, 0.90), ("b2", 0.001, 0.50)]):
        ts = T0_MS + 100_000 + i * 1000
        metrics = [Metric("val_acc", acc, ts, 100), *_energy_metrics(total, ts)]
        ids[name] = _add_run(
            client, exp_b, name, ts, metrics, {"lr": "0.01", "prune": "0.0"}, {"energy.estimated": "none"}
        )
    # energy-to-target: val_acc at steps 10..40, cumulative kWh at steps 5..35
    exp_h = client.create_experiment("exp-hist", artifact_location=str(root / "artifacts"))
    hist = [Metric("val_acc", v, T0_MS + s, s) for s, v in [(10, 0.5), (20, 0.7), (30, 0.86), (40, 0.9)]]
    hist += [Metric("val_loss", v, T0_MS + s, s) for s, v in [(10, 0.9), (20, 0.5), (30, 0.3), (40, 0.2)]]
    energy_hist = [(5, 0.001), (15, 0.003), (25, 0.005), (35, 0.007)]
    joules = [Metric("energy/total_j", v * KWH, T0_MS + s, s) for s, v in energy_hist]
    ids["hist"] = _add_run(
        client, exp_h, "hist", T0_MS + 200_000, hist + joules, {}, {"energy.estimated": "none"}
    )
    # wattlog < 0.2: the same run logged in kWh
    exp_l = client.create_experiment("exp-legacy", artifact_location=str(root / "artifacts"))
    kwh = [Metric("energy/total_kwh", v, T0_MS + s, s) for s, v in energy_hist]
    ids["legacy_hist"] = _add_run(client, exp_l, "legacy_hist", T0_MS + 300_000, hist + kwh, {}, {})
    for i, (name, total, acc) in enumerate([("old1", 0.002, 0.7), ("old2", 0.001, 0.6)]):
        ts = T0_MS + 301_000 + i * 1000
        metrics = [Metric("val_acc", acc, ts, 100), *_energy_metrics(total, ts, legacy=True)]
        ids[name] = _add_run(
            client, exp_l, name, ts, metrics, {"variant": name}, {"energy.estimated": "none"}
        )
    return {"uri": uri, "ids": ids, "client": client}


def by_name(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("run_name")


# ------------------------------------------------------------------------------ compare_runs


def test_columns_and_values(store: dict) -> None:
    df = compare_runs("exp-a", metric="val_acc", tracking_uri=store["uri"])
    assert list(df["run_name"]) == list(RUNS_A)  # start-time order
    for col in [
        "run_id",
        "run_name",
        "experiment",
        "status",
        "duration_s",
        "total_j",
        "gpu_j",
        "cpu_j",
        "ram_j",
        "emissions_g",
        "j_per_sample",
        "test_j_per_sample",
        "avg_power_w",
        "val_acc",
        "pareto",
        "estimated",
        "short_run",
        "degraded",
        "gpu_measured",
        "missing_energy",
        "group",
        "group_size",
    ]:
        assert col in df.columns, col
    assert not any("kwh" in c for c in df.columns)
    assert "delta_j" not in df.columns  # no baseline asked
    row = by_name(df).loc["base"]
    assert row["total_j"] == pytest.approx(0.010 * KWH)
    assert row["gpu_j"] == pytest.approx(0.008 * KWH)
    assert bool(row["gpu_measured"]) and not bool(row["short_run"]) and row["degraded"] == ""
    assert df["group_size"].eq(1).all()
    assert row["emissions_g"] == pytest.approx(4.75)
    assert row["j_per_sample"] == pytest.approx(36.0)
    assert row["test_j_per_sample"] == pytest.approx(18.0)
    assert row["duration_s"] == pytest.approx(360.0)  # energy/duration_s wins over wall time
    assert row["val_acc"] == pytest.approx(0.80)
    assert row["status"] == "FINISHED" and row["experiment"] == "exp-a"
    assert row["estimated"] == "cpu,ram"
    assert by_name(df).loc["measured", "estimated"] == ""
    # differing params become columns, constant ones and energy.* do not
    assert "params.prune" in df.columns
    assert "params.lr" not in df.columns and "params.energy.cpu_method" not in df.columns


def test_legacy_kwh_runs_are_read_in_joules(store: dict) -> None:
    df = by_name(compare_runs("exp-legacy", metric="val_acc", baseline="old1", tracking_uri=store["uri"]))
    assert df.loc["old1", "total_j"] == pytest.approx(0.002 * KWH)
    assert df.loc["old1", "cpu_j"] == pytest.approx(0.0003 * KWH)
    assert df.loc["old2", "delta_j_pct"] == pytest.approx(-50.0)
    assert df.loc["legacy_hist", "total_j"] == pytest.approx(0.007 * KWH)
    got = energy_to_target(store["ids"]["legacy_hist"], "val_acc", 0.85, tracking_uri=store["uri"])
    assert got == pytest.approx(0.006 * KWH)


def test_missing_energy_shown_flagged_off_front(store: dict) -> None:
    df = by_name(compare_runs("exp-a", metric="val_acc", tracking_uri=store["uri"]))
    row = df.loc["noenergy"]
    assert bool(row["missing_energy"]) and not bool(row["pareto"])
    assert math.isnan(row["total_j"]) and row["val_acc"] == pytest.approx(0.99)
    assert row["duration_s"] == pytest.approx(60.0)  # falls back to the run's wall time
    assert not df.drop(index="noenergy")["missing_energy"].any()


def test_pareto_max_mode_with_tie(store: dict) -> None:
    df = compare_runs("exp-a", metric="val_acc", mode="max", tracking_uri=store["uri"])
    assert set(df.loc[df["pareto"], "run_name"]) == FRONT_MAX_ACC  # "big" and "tie" identical: both on


def test_pareto_min_mode(store: dict) -> None:
    df = compare_runs("exp-a", metric="val_loss", mode="min", tracking_uri=store["uri"])
    assert set(df.loc[df["pareto"], "run_name"]) == FRONT_MIN_LOSS


def test_no_metric_no_front(store: dict) -> None:
    df = compare_runs("exp-a", tracking_uri=store["uri"])
    assert not df["pareto"].any() and "val_acc" not in df.columns


@pytest.mark.parametrize(
    ("baseline", "base_name"), [("first", "base"), ("best", "big"), ("pruned", "pruned"), (None, "measured")]
)
def test_baselines(store: dict, baseline: str | None, base_name: str) -> None:
    ref = baseline if baseline is not None else store["ids"][base_name]  # None: by run id
    df = by_name(compare_runs("exp-a", metric="val_acc", baseline=ref, tracking_uri=store["uri"]))
    base_kwh = RUNS_A[base_name][0]
    base_acc = RUNS_A[base_name][1]
    assert df.attrs["baseline_run_name"] == base_name
    for name, (total, acc, *_rest) in RUNS_A.items():
        if total is None:
            assert math.isnan(df.loc[name, "delta_j"]) and math.isnan(df.loc[name, "delta_j_pct"])
        else:
            assert df.loc[name, "delta_j"] == pytest.approx((total - base_kwh) * KWH)
            assert df.loc[name, "delta_j_pct"] == pytest.approx(100 * (total - base_kwh) / base_kwh)
        assert df.loc[name, "delta_val_acc"] == pytest.approx(acc - base_acc)
    assert df.loc[base_name, "delta_j"] == 0


def test_best_baseline_min_mode_skips_runs_without_energy(store: dict) -> None:
    # "noenergy" has the lowest loss but no energy: the best *with energy* is "dominated"
    df = compare_runs("exp-a", metric="val_loss", mode="min", baseline="best", tracking_uri=store["uri"])
    assert df.attrs["baseline_run_name"] == "dominated"


def test_bad_baselines(store: dict) -> None:
    with pytest.raises(ConfigError, match="baseline"):
        compare_runs("exp-a", metric="val_acc", baseline="nope", tracking_uri=store["uri"])
    with pytest.raises(ConfigError, match="energy"):
        compare_runs("exp-a", metric="val_acc", baseline="noenergy", tracking_uri=store["uri"])
    with pytest.raises(ConfigError, match="needs a metric"):
        compare_runs("exp-a", baseline="best", tracking_uri=store["uri"])


def test_several_experiments_filter_and_runs(store: dict) -> None:
    df = compare_runs(["exp-a", "exp-b"], metric="val_acc", tracking_uri=store["uri"])
    assert len(df) == len(RUNS_A) + 2
    assert set(df.loc[df["pareto"], "run_name"]) == {"b2", "pruned", "base", "big", "tie", "b1"}
    df = compare_runs(["exp-a", "exp-b"], filter="params.lr = '0.01'", tracking_uri=store["uri"])
    assert set(df["run_name"]) == {"b1", "b2"}
    ids = store["ids"]
    df = compare_runs(runs=[ids["b1"], ids["base"]], metric="val_acc", tracking_uri=store["uri"])
    assert set(df["run_name"]) == {"b1", "base"} and set(df["experiment"]) == {"exp-a", "exp-b"}


def test_api_errors(store: dict) -> None:
    with pytest.raises(ConfigError, match="experiment='nope'.*'exp-a'"):
        compare_runs("nope", tracking_uri=store["uri"])
    with pytest.raises(ConfigError, match="metric='acc'.*val_acc, val_loss"):
        compare_runs("exp-a", metric="acc", tracking_uri=store["uri"])
    with pytest.raises(ConfigError, match="mode"):
        compare_runs("exp-a", metric="val_acc", mode="up", tracking_uri=store["uri"])
    with pytest.raises(ConfigError, match="filter"):
        compare_runs("exp-a", filter="params.lr ~~ 3", tracking_uri=store["uri"])
    with pytest.raises(ConfigError, match="runs"):
        compare_runs(runs=["0" * 32], tracking_uri=store["uri"])


def test_paging_over_several_pages(store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from wattlog import compare

    monkeypatch.setattr(compare, "PAGE_SIZE", 2)
    df = compare_runs("exp-a", metric="val_acc", tracking_uri=store["uri"])
    assert list(df["run_name"]) == list(RUNS_A)
    assert set(df.loc[df["pareto"], "run_name"]) == FRONT_MAX_ACC


# ------------------------------------------------------------------------------ energy-to-target


def test_interpolate_rules() -> None:
    assert interpolate_kwh is interpolate_cumulative  # the old name still works
    pts = [(5, 0.001), (15, 0.003), (25, 0.005)]
    assert interpolate_cumulative(pts, 20) == pytest.approx(0.004)
    assert interpolate_kwh(pts, 15) == pytest.approx(0.003)
    assert interpolate_kwh(pts, 2) == pytest.approx(0.0004)  # from (0, 0)
    assert interpolate_kwh(pts, 99) == pytest.approx(0.005)  # after the last point: the last value
    assert math.isnan(interpolate_kwh([], 3))


@pytest.mark.parametrize(
    ("metric", "value", "mode", "expected_kwh"),
    [
        ("val_acc", 0.85, "max", 0.006),  # reached at step 30, between (25, .005) and (35, .007)
        ("val_acc", 0.7, "max", 0.004),  # exactly reached at step 20
        ("val_acc", 0.1, "max", 0.002),  # step 10
        ("val_acc", 0.9, "max", 0.007),  # step 40 is after the last energy point
        ("val_acc", 0.95, "max", math.nan),  # never reached
        ("val_loss", 0.3, "min", 0.006),
        ("val_loss", 0.1, "min", math.nan),
        ("never_logged", 1.0, "max", math.nan),
    ],
)
def test_energy_to_target(store: dict, metric: str, value: float, mode: str, expected_kwh: float) -> None:
    got = energy_to_target(store["ids"]["hist"], metric, value, mode, tracking_uri=store["uri"])
    if math.isnan(expected_kwh):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected_kwh * KWH)


def test_target_column(store: dict) -> None:
    df = compare_runs("exp-hist", metric="val_acc", target=0.85, tracking_uri=store["uri"])
    assert df.loc[0, "j_to_target"] == pytest.approx(0.006 * KWH)
    assert df.loc[0, "total_j"] == pytest.approx(0.007 * KWH)  # latest value, not the history


# ------------------------------------------------------------------------------ CLI


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="wattlog")
    register_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_csv_and_json_parse_back(store: dict, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "compare",
        "-e",
        "exp-a",
        "--metric",
        "val_acc",
        "--baseline",
        "first",
        "--tracking-uri",
        store["uri"],
    ]
    rc, out, _ = run_cli([*argv, "--format", "csv"], capsys)
    assert rc == 0
    df_csv = pd.read_csv(io.StringIO(out)).set_index("run_name")
    rc, out, _ = run_cli([*argv, "--format", "json"], capsys)
    assert rc == 0
    df_json = pd.DataFrame(json.loads(out)).set_index("run_name")
    for df in (df_csv, df_json):
        assert list(df.index) == [
            "pruned",
            "measured",
            "base",
            "dominated",
            "big",
            "tie",
            "noenergy",
        ]  # --sort kwh
        for name, (total, acc, *_rest) in RUNS_A.items():
            assert df.loc[name, "val_acc"] == pytest.approx(acc)
            if total is None:
                assert pd.isna(df.loc[name, "total_j"]) and bool(df.loc[name, "missing_energy"])
            else:
                assert df.loc[name, "total_j"] == pytest.approx(total * KWH, rel=1e-12)
                assert df.loc[name, "delta_j"] == pytest.approx((total - 0.010) * KWH, abs=1e-6)
        assert {n for n in df.index if bool(df.loc[n, "pareto"])} == FRONT_MAX_ACC
        assert {n for n in df.index if bool(df.loc[n, "group_pareto"])} == FRONT_MAX_ACC


def test_cli_table_and_markdown(store: dict, capsys: pytest.CaptureFixture) -> None:
    argv = ["compare", "-e", "exp-a", "--metric", "val_acc", "--tracking-uri", store["uri"]]
    rc, out, _ = run_cli(argv, capsys)  # baseline "first" by default
    assert rc == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    assert header.split() == [
        "run",
        "energy",
        "Δ",
        "energy",
        "val_acc",
        "Δ",
        "val_acc",
        "★",
        "note",
        *header.split()[9:],
    ]
    rows = {
        line.split()[0]: line
        for line in lines[lines.index(header) + 2 :]
        if line.split() and line.split()[0] in RUNS_A
    }
    assert set(rows) == set(RUNS_A)
    assert "36.0 kJ" in rows["base"] and "base" in rows["base"].split() and "est" in rows["base"]
    assert "72.0 kJ" in rows["big"] and "+100 %" in rows["big"] and "★" in rows["big"]
    assert "21.6 kJ" in rows["measured"] and "est" not in rows["measured"]
    assert "—" in rows["noenergy"] and "★" not in rows["noenergy"]
    assert "kWh" not in out and not re.search(r"(?<![\d.])0\.0+(?!\d)", " ".join(rows.values()))  # no 0.000
    assert any(line.startswith("★ Pareto front") for line in lines)
    assert any(line.startswith("est: includes estimated energy") for line in lines)
    assert lines[-1].startswith("best trade-off: ")
    assert all(len(line) <= 100 for line in lines)

    rc, out, _ = run_cli([*argv, "--format", "markdown", "--sort", "metric"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith(
        "| run | energy | Δ energy | val_acc | Δ val_acc | ★ | note | GPU | CPU | RAM |"
    )
    assert lines[1].startswith("|---|--:|")
    assert lines[2].startswith("| noenergy |")  # best val_acc first
    big = next(line for line in lines if line.startswith("| big |"))
    assert "+100 %" in big and "★" in big and "57.6 kJ" in big  # GPU: 0.8 of 72 kJ

    rc, out, _ = run_cli([*argv, "--unit", "kWh"], capsys)
    assert rc == 0 and "0.0100 kWh" in out and "0.0200 kWh" in out
    rc, _, err = run_cli([*argv, "--unit", "kwh"], capsys)
    assert rc == 2 and "unit='kwh' is not valid" in err


def test_cli_plot_and_target(store: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    png = tmp_path / "sub" / "pareto.png"
    rc, out, err = run_cli(
        [
            "compare",
            "-e",
            "exp-a",
            "-e",
            "exp-hist",
            "--metric",
            "val_acc",
            "--target",
            "0.85",
            "--plot",
            str(png),
            "--format",
            "csv",
            "--tracking-uri",
            store["uri"],
        ],
        capsys,
    )
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    df = pd.read_csv(io.StringIO(out)).set_index("run_name")
    assert df.loc["hist", "j_to_target"] == pytest.approx(0.006 * KWH)


def test_cli_params_option(store: dict, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run_cli(
        ["compare", "-e", "exp-a", "--params", "lr", "--format", "csv", "--tracking-uri", store["uri"]],
        capsys,
    )
    df = pd.read_csv(io.StringIO(out))
    assert rc == 0 and "params.lr" in df.columns and "params.prune" not in df.columns


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["-e", "nope"], "experiment='nope' is not valid; allowed: 'Default', 'exp-a', 'exp-b', 'exp-hist'"),
        (["-e", "exp-a", "--metric", "acc"], "metric='acc' is not valid; allowed: val_acc, val_loss"),
        (["-e", "exp-a", "--target", "0.9"], "--target needs --metric"),
        (["-e", "exp-a", "--sort", "bogus"], "sort='bogus'"),
        (["-e", "exp-a", "--filter", "params.lr ~~ 3"], "filter="),
    ],
)
def test_cli_errors(store: dict, capsys: pytest.CaptureFixture, argv: list[str], needle: str) -> None:
    rc, out, err = run_cli(["compare", *argv, "--tracking-uri", store["uri"]], capsys)
    assert rc == 2 and needle in err and "Traceback" not in err and out == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_unreachable_server_redacts_credentials(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    uri = f"http://alice:s3cret@127.0.0.1:{_free_port()}"
    rc, out, err = run_cli(["compare", "-e", "x", "--tracking-uri", uri], capsys)
    assert rc == 2 and out == "" and "cannot reach the MLflow tracking server" in err
    assert "s3cret" not in err and "alice" not in err and "127.0.0.1" in err
    assert "Traceback" not in err


def test_cli_missing_sqlite_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "typo.db"
    rc, _, err = run_cli(["compare", "-e", "x", "--tracking-uri", f"sqlite:///{db}"], capsys)
    assert rc == 2 and "no MLflow database" in err and not db.exists()


def test_redact_uri() -> None:
    assert redact_uri("https://u:p@host:5000/x?token=abc&a=1") == "https://host:5000/x?token=***&a=1"
    assert redact_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def test_markdown_marks_estimated_and_missing(store: dict) -> None:
    df = compare_runs("exp-a", metric="val_acc", tracking_uri=store["uri"])
    md = to_markdown(df, "val_acc")
    measured = next(line for line in md.splitlines() if line.startswith("| measured |"))
    base = next(line for line in md.splitlines() if line.startswith("| base |"))
    noenergy = next(line for line in md.splitlines() if line.startswith("| noenergy |"))
    assert "| 21.6 kJ |" in measured and "| est |" not in measured
    assert "| 36.0 kJ |" in base and "| est |" in base and "est: includes estimated energy" in md
    assert "| — |" in noenergy and "logged no energy" in md


def test_sweep_parent_run_is_not_a_row(tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from wattlog.compare import compare_runs

    uri = f"sqlite:///{tmp_path / 'parent.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweep-exp")
    parent = client.create_run(exp, tags={"wattlog.role": "sweep"}, run_name="sweep parent").info.run_id
    children = []
    for i, (kwh, acc) in enumerate([(0.2, 0.8), (0.1, 0.7)]):
        rid = client.create_run(exp, tags={"mlflow.parentRunId": parent}, run_name=f"job{i}").info.run_id
        client.log_batch(rid, metrics=[Metric("energy/total_j", kwh * KWH, 0, 1), Metric("acc", acc, 0, 1)])
        children.append(rid)
    df = compare_runs("sweep-exp", metric="acc", tracking_uri=uri)
    assert sorted(df["run_id"]) == sorted(children)
    assert list(df["pareto"]) == [True, True]
    explicit = compare_runs(runs=[parent, *children], tracking_uri=uri)  # asked for by id: shown
    assert parent in set(explicit["run_id"])
