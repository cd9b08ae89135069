"""wattlog.report and wattlog.plots against a real sqlite MLflow store."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from wattlog.plots import domain_power_w, plot_pareto, plot_power_trace
from wattlog.report import build_report, register_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0_MS = 1_700_000_000_000
KWH = 3.6e6


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
    steps = range(20)
    kwh = {"total": 0.0012, "gpu": 0.001, "cpu": 0.00015, "ram": 0.00005, "train": 0.0011}
    other = {
        "energy/emissions_g": 0.57,
        "energy/avg_power_w": 250.0,
        "energy/duration_s": 17.3,
        "energy/j_per_sample": 3.9,
    }
    summaries = {  # "traced" logs joules; "plain" is a run of wattlog < 0.2, in kWh
        "traced": {**{f"energy/{k}_j": v * KWH for k, v in kwh.items()}, **other},
        "plain": {**{f"energy/{k}_kwh": v for k, v in kwh.items()}, **other},
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
        if name == "traced":
            metrics += [Metric("energy/total_j", 216.0 * (s + 1), T0_MS + s, s) for s in steps]
        else:
            metrics += [Metric("energy/total_kwh", 0.00006 * (s + 1), T0_MS + s, s) for s in steps]
        metrics += [Metric("val_acc", 0.5 + 0.02 * s, T0_MS + s, s) for s in (4, 9, 14, 19)]
        metrics += [Metric(k, v, T0_MS + 100, 19) for k, v in summaries[name].items()]
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
    assert (
        "energy     4.32 kJ*" in text and "gpu 3.60 kJ [counter]" in text and "cpu 540 J* [estimate]" in text
    )
    assert "570 mgCO2e*" in text and "FakeGPU x1" in text and "val_acc = 0.88 (last)" in text
    assert "train 3.96 kJ (3.90 J/sample)" in text and "avg 250 W over 17.3 s" in text
    assert "energy/trace.csv (20 train steps)" in text  # steps, not rows
    assert "kWh" not in text.replace("g/kWh", "")
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
    assert "energy     4.32 kJ*" in out and (tmp_path / "r" / "report.png").exists()  # legacy kWh keys
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


# ------------------------------------------------------------------------------ what the charts say


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The matplotlib figures wattlog.plots saves (to read their titles, labels and legends)."""
    from wattlog import plots

    saved = []
    real_save = plots._save

    def capture(fig, path):
        saved.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return saved


def _texts(fig) -> list[str]:
    out = [t.get_text() for t in fig.texts]
    if fig._supxlabel is not None:
        out.append(fig._supxlabel.get_text())
    if fig._suptitle is not None:
        out.append(fig._suptitle.get_text())
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.texts]
        legend = ax.get_legend()
        if legend is not None:
            out += [t.get_text() for t in legend.get_texts()]
    return out


def test_trace_layout_is_on_the_step_axis() -> None:
    from wattlog.plots import trace_layout

    layout = trace_layout(trace_rows())  # 20 train steps, 2 val rows after step 9 (22 rows)
    assert layout.axis == "step" and layout.train_steps == 20
    assert [(s.x0, s.x1) for s in layout.train[:2]] == [(-0.5, 0.5), (0.5, 1.5)]  # centred on steps 0, 1
    (val,) = layout.other
    assert val.stage == "val" and val.rows == 2 and val.x0 == 9.5  # at the step it ran after
    assert layout.stage_totals_j == {"train": pytest.approx(2500.0), "val": pytest.approx(130.0)}
    # binned rows (steps 1, 3, 5: two steps each) and gradient accumulation (two rows for step 7)
    rows = [
        {"stage": "train", "step": s, "t_start_s": i, "t_end_s": i + 1, "total_j": 10.0}
        for i, s in enumerate([1, 3, 5, 7, 7])
    ]
    binned = trace_layout(rows)
    assert binned.train_steps == 8 and len(binned.train) == 4
    assert binned.train[0].x0 == -0.5 and binned.train[-1].total_j == 20.0


def test_power_png_title_legend_and_estimate_note(tmp_path: Path, figures: list) -> None:
    rows = trace_rows()
    rows += [
        {
            "stage": "test",
            "step": b,
            "t_start_s": 100 + b,
            "t_end_s": 100.5 + b,
            "gpu0_j": 50.0,
            "cpu_j": 10.0,
            "ram_j": 5.0,
            "power_w": 130.0,
        }
        for b in range(3)
    ]
    plot_power_trace(rows, tmp_path / "power.png", title="fit", estimated="cpu,ram")
    texts = _texts(figures[-1])
    assert "fit: 20 train steps + test, val, 2.83 kJ total" in texts  # steps, not the 25 rows
    assert "gpu0 2.25 kJ" in texts and "cpu 450 J (estimated)" in texts and "ram 125 J (estimated)" in texts
    assert "val 130 J (2 batches)" in texts and "test 195 J (3 batches)" in texts
    assert any(t.startswith("estimated: cpu, ram (CPU from TDP × utilisation") for t in texts)
    assert any(t.startswith("step") for t in texts)
    plot_power_trace(trace_rows(), tmp_path / "measured.png")
    assert not any(t.startswith("estimated") for t in _texts(figures[-1]))
    ax = figures[-1].axes[0]
    colors = {p.get_facecolor() for p in ax.patches}  # the val bar has its own colour
    assert len(colors) >= 1


def test_power_png_of_an_evaluation_run_uses_batches(tmp_path: Path, figures: list) -> None:
    rows = [
        {"stage": "test", "step": b, "t_start_s": b, "t_end_s": b + 0.25, "cpu_j": 1.0, "power_w": 4.0}
        for b in range(16)
    ]
    plot_power_trace(rows, tmp_path / "power.png")
    texts = _texts(figures[-1])
    assert "power: 16 test batches, 16.0 J total" in texts
    assert "batch (evaluation only: no train steps)" in texts


def test_pareto_png_names_runs_and_scales_units(tmp_path: Path, figures: list) -> None:
    df = pd.DataFrame(
        {
            "run_name": ["none-none", "none-int8_dynamic", "structured0.25heads-none"],
            "total_j": [121.1, 40.3, 95.2],
            "test_acc": [0.7852, 0.7813, 0.7227],
            "estimated": ["cpu,ram"] * 3,
        }
    )
    plot_pareto(df, "test_acc", "max", tmp_path / "pareto.png")
    fig = figures[-1]
    texts = _texts(fig)
    assert {"none-none", "none-int8_dynamic", "structured0.25heads-none"} <= set(texts)
    assert "energy (J), less is better" in texts
    assert any(t.startswith("Pareto front (2 runs") for t in texts)
    ax = fig.axes[0]
    assert ax.xaxis.get_major_formatter().get_offset() == ""  # no 1e-6 offset above the ticks
    df_kwh = pd.DataFrame({"label": ["a", "b"], "energy/total_kwh": [2e-7, 1e-6], "acc": [0.5, 0.6]})
    plot_pareto(
        df_kwh, "acc", "max", tmp_path / "legacy.png", energy_col="energy/total_kwh", label_col="label"
    )
    assert "energy (J), less is better" in _texts(figures[-1])  # 0.72 J and 3.6 J


def test_report_of_an_evaluation_run(tmp_path: Path, figures: list) -> None:
    uri = f"sqlite:///{tmp_path / 'eval.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ev", artifact_location=str(tmp_path / "a"))
    rid = client.create_run(exp, run_name="int8-test").info.run_id
    client.log_batch(
        rid,
        metrics=[
            Metric(k, v, T0_MS, 0)
            for k, v in {
                "energy/total_j": 40.3,
                "energy/test_j": 40.3,
                "energy/test_j_per_sample": 0.157,
                "test_acc": 0.78,
                "energy/cpu_j": 36.0,
                "energy/ram_j": 4.3,
            }.items()
        ],
        tags=[RunTag("energy.estimated", "cpu,ram"), RunTag("energy.short_run", "cpu estimate: 1 s updates")],
    )
    rep = build_report(rid, tmp_path / "out", metric="test_acc", tracking_uri=uri)
    assert rep.kind == "eval" and rep.png_path is not None and rep.png_path.read_bytes()[:8] == PNG_MAGIC
    texts = _texts(figures[-1])
    assert "energy per stage (evaluation run: no train steps)" in texts
    assert "40.3 J, 157 mJ/sample" in texts
    assert "test 40.3 J (157 mJ/sample)" in rep.summary and "evaluation only" in rep.summary
    assert "short run  cpu estimate: 1 s updates" in rep.summary


def test_report_of_a_sweep_parent(tmp_path: Path, capsys: pytest.CaptureFixture, figures: list) -> None:
    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sw", artifact_location=str(tmp_path / "a"))
    parent = client.create_run(exp, run_name="sweep x", tags={"wattlog.role": "sweep"}).info.run_id
    client.log_batch(parent, params=[Param("sweep.metric", "test_acc"), Param("sweep.mode", "max")])
    empty = run_cli(["report", parent, "--out", str(tmp_path / "e"), "--tracking-uri", uri], capsys)
    assert empty[0] == 0 and "no child runs" in empty[1]  # not an error, and no empty chart
    for i, (name, joules, acc) in enumerate(
        [("none-none", 121.1, 0.785), ("none-int8_dynamic", 40.3, 0.781)]
    ):
        rid = client.create_run(
            exp, run_name=name, start_time=T0_MS + i, tags={"mlflow.parentRunId": parent}
        ).info.run_id
        client.log_batch(
            rid,
            metrics=[Metric("energy/total_j", joules, T0_MS, 0), Metric("test_acc", acc, T0_MS, 0)],
            params=[Param("quantize", name)],
        )
    rc, out, err = run_cli(["report", parent, "--out", str(tmp_path / "s"), "--tracking-uri", uri], capsys)
    assert rc == 0, err
    assert "2 child runs" in out and "none-int8_dynamic" in out and "121 J" in out and "★" in out
    assert "best trade-off: none-int8_dynamic" in out
    assert (tmp_path / "s" / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert {"none-none", "none-int8_dynamic"} <= set(_texts(figures[-1]))
