"""wattlog.report and wattlog.plots against a real sqlite MLflow store."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from wattlog.plots import domain_power_w, plot_pareto, plot_power_trace  # noqa: E402
from wattlog.report import build_report, register_cli  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0_MS = 1_700_000_000_000


def trace_rows(n: int = 20) -> list[dict]:
    """Train steps of 0.5 s (gpu 100 J, cpu 20 J, ram 5 J), a 2-step validation block after step 9."""
    rows, t = [], 0.0
    for step in range(n):
        rows.append(
            {
                "stage": "train",
                "step": step,
                "t_start_s": t,
                "t_end_s": t + 0.5,
                "gpu0_j": 100.0,
                "cpu_j": 20.0,
                "ram_j": 5.0,
                "power_w": 250.0,
            }
        )
        t += 0.5
        if step == 9:
            for _ in range(2):
                rows.append(
                    {
                        "stage": "val",
                        "step": step,
                        "t_start_s": t + 0.1,
                        "t_end_s": t + 0.6,
                        "gpu0_j": 50.0,
                        "cpu_j": 10.0,
                        "ram_j": 5.0,
                        "power_w": 130.0,
                    }
                )
                t += 0.6
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mlflow_report")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("rep", artifact_location=str(root / "artifacts"))
    steps = range(0, 20)
    summary = {
        "energy/total_kwh": 0.0012,
        "energy/gpu_kwh": 0.001,
        "energy/cpu_kwh": 0.00015,
        "energy/ram_kwh": 0.00005,
        "energy/emissions_g": 0.57,
        "energy/avg_power_w": 250.0,
        "energy/duration_s": 17.3,
        "energy/j_per_sample": 3.9,
        "energy/train_kwh": 0.0011,
    }
    params = {
        "energy.gpu_model": "FakeGPU",
        "energy.gpu_count": "1",
        "energy.gpu_method": "counter",
        "energy.cpu_method": "estimate",
        "energy.ram_method": "estimate",
        "energy.carbon_intensity_g_per_kwh": "475",
        "energy.carbon_source": "world",
        "energy.pue": "1.0",
    }
    ids = {}
    for name in ("traced", "plain"):
        run = client.create_run(exp, start_time=T0_MS, run_name=name)
        metrics = [Metric("energy/power_w", 250.0, T0_MS + s, s) for s in steps]
        metrics += [Metric("energy/gpu_power_w", 200.0, T0_MS + s, s) for s in steps]
        metrics += [Metric("energy/total_kwh", 0.00006 * (s + 1), T0_MS + s, s) for s in steps]
        metrics += [Metric("val_acc", 0.5 + 0.02 * s, T0_MS + s, s) for s in (4, 9, 14, 19)]
        metrics += [Metric(k, v, T0_MS + 100, 19) for k, v in summary.items()]
        client.log_batch(
            run.info.run_id,
            metrics=metrics,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag("energy.estimated", "cpu,ram")],
        )
        client.set_terminated(run.info.run_id, end_time=T0_MS + 20_000)
        ids[name] = run.info.run_id
    trace = root / "energy_upload" / "trace.csv"
    trace.parent.mkdir()
    rows = trace_rows()
    with trace.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    client.log_artifact(ids["traced"], str(trace), artifact_path="energy")
    return {"uri": uri, "ids": ids, "client": client}


def test_domain_power_from_trace_rows() -> None:
    power = domain_power_w(trace_rows(3))
    assert list(power) == ["gpu0", "cpu", "ram"]
    assert power["gpu0"] == pytest.approx([200.0] * 3)
    assert power["cpu"] == pytest.approx([40.0] * 3) and power["ram"] == pytest.approx([10.0] * 3)


def test_plot_power_trace_accepts_csv_strings_and_gaps(tmp_path: Path) -> None:
    rows = [{k: str(v) for k, v in r.items()} for r in trace_rows()]
    out = plot_power_trace(rows, tmp_path / "a" / "power.png")
    assert out == tmp_path / "a" / "power.png" and out.read_bytes()[:8] == PNG_MAGIC
    only_total = [{"stage": "train", "step": 0, "t_start_s": 0, "t_end_s": 1, "power_w": 10}]
    assert plot_power_trace(only_total, tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_power_trace([], tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_pareto_energy_kwh_column_and_computed_front(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "run_name": ["a", "b", "c", "d"],
            "energy_kwh": [1.0, 2.0, 3.0, float("nan")],
            "val_acc": [0.5, 0.4, 0.9, 0.99],
        }
    )
    out = plot_pareto(df, "val_acc", "max", tmp_path / "p.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no column"):
        plot_pareto(df, "acc", "max", tmp_path / "q.png")
    with pytest.raises(ValueError, match="mode"):
        plot_pareto(df, "val_acc", "up", tmp_path / "q.png")


def test_report_from_trace_artifact_and_log(store: dict, tmp_path: Path) -> None:
    run_id = store["ids"]["traced"]
    rep = build_report(run_id, tmp_path / "out", metric="val_acc", tracking_uri=store["uri"], log=True)
    assert rep.png_path.read_bytes()[:8] == PNG_MAGIC and rep.png_path.name == "report.png"
    text = rep.summary_path.read_text()
    assert text == rep.summary
    assert "0.0012 kWh*" in text and "gpu 0.001 [counter]" in text and "cpu 0.00015* [estimate]" in text
    assert "0.57 gCO2e*" in text and "FakeGPU x1" in text and "val_acc = 0.88 (last)" in text
    assert "energy/trace.csv (20 steps)" in text  # train rows only
    logged = {a.path for a in store["client"].list_artifacts(run_id, "energy")}
    assert "energy/report.png" in logged


def test_report_from_histories(store: dict, tmp_path: Path) -> None:
    rep = build_report(store["ids"]["plain"], tmp_path, tracking_uri=store["uri"])
    assert rep.png_path.exists() and not rep.logged
    assert "energy/power_w and energy/gpu_power_w histories" in rep.summary


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="wattlog")
    register_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_report(store: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = run_cli(
        [
            "report",
            store["ids"]["plain"],
            "--out",
            str(tmp_path / "r"),
            "--metric",
            "val_acc",
            "--tracking-uri",
            store["uri"],
        ],
        capsys,
    )
    assert rc == 0, err
    assert "0.0012 kWh*" in out and (tmp_path / "r" / "report.png").exists()
    assert (tmp_path / "r" / "summary.txt").read_text() == out


@pytest.mark.parametrize(
    ("run", "extra", "needle"),
    [
        ("0" * 32, [], "run_id='00000000000000000000000000000000' is not valid"),
        ("plain", ["--metric", "acc"], "metric='acc' is not valid; allowed: val_acc"),
    ],
)
def test_cli_report_errors(
    store: dict, tmp_path: Path, capsys: pytest.CaptureFixture, run: str, extra: list[str], needle: str
) -> None:
    run_id = store["ids"].get(run, run)
    rc, _, err = run_cli(
        ["report", run_id, "--out", str(tmp_path), *extra, "--tracking-uri", store["uri"]], capsys
    )
    assert rc == 2 and needle in err and "Traceback" not in err
