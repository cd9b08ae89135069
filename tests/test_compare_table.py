"""The human `wattlog compare` table: fits 100 columns, groups replicates, says what is noise.

A demo-like compression sweep (6 evaluation runs, estimated CPU/RAM, no GPU) in a real sqlite
MLflow store, plus replicated configs to exercise mean ± spread and the verdict.
"""

from __future__ import annotations

import argparse
import io
import json
import re

import pytest

pd = pytest.importorskip("pandas")
mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from wattlog.compare import compare_runs, group_runs, print_table, register_cli, verdict
from wattlog.pareto import pareto_mask, pareto_mask_noisy
from wattlog.render import MINUS

T0_MS = 1_700_000_000_000

# prune, amount, granularity, quantize, test energy (J), test_acc: the shape of `make demo`'s sweep
SWEEP = [
    ("none", 0.0, None, "none", 121.1, 0.7852),
    ("none", 0.0, None, "int8_dynamic", 40.3, 0.7813),
    ("l1_unstructured", 0.5, None, "none", 118.9, 0.7617),
    ("l1_unstructured", 0.5, None, "int8_dynamic", 41.0, 0.7539),
    ("structured", 0.25, "heads", "none", 95.2, 0.7227),
    ("structured", 0.25, "heads", "int8_dynamic", 33.7, 0.7109),
]


def run_name(prune: str, amount: float, gran: str | None, quant: str) -> str:
    """As examples/bert_finetune/evaluate.py names them, e.g. ``structured0.25heads-int8_dynamic``."""
    return (prune if prune == "none" else f"{prune}{amount:g}{gran or ''}") + f"-{quant}"


def add_run(
    client: MlflowClient,
    exp: str,
    name: str,
    start_ms: int,
    metrics: dict[str, float],
    params: dict[str, str],
    tags: dict[str, str],
) -> str:
    rid = client.create_run(exp, start_time=start_ms, run_name=name).info.run_id
    client.log_batch(
        rid,
        metrics=[Metric(k, v, start_ms, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(rid, end_time=start_ms + 30_000)
    return rid


def eval_metrics(joules: float, acc: float) -> dict[str, float]:
    return {
        "energy/total_j": joules,
        "energy/cpu_j": joules * 0.9,
        "energy/ram_j": joules * 0.1,
        "energy/test_j": joules,
        "energy/emissions_g": joules / 3.6e6 * 475,
        "energy/test_j_per_sample": joules / 256,
        "energy/avg_power_w": 5.0,
        "energy/duration_s": joules / 5.0,
        "test_acc": acc,
    }


ESTIMATED_PARAMS = {
    "energy.gpu_method": "none",
    "energy.cpu_method": "estimate",
    "energy.ram_method": "estimate",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mlflow_table")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    k = 0
    # 1. the demo sweep, once
    exp = client.create_experiment("bert-compress", artifact_location=str(root / "a"))
    for prune, amount, gran, quant, joules, acc in SWEEP:
        k += 1
        params = {
            "prune": prune,
            "prune.name": prune,
            "prune.amount": str(amount),
            "quantize": quant,
            "quantize.name": quant,
            "task": "compress",
            "seed": "0",
            **ESTIMATED_PARAMS,
        }
        if gran:
            params["prune.granularity"] = gran
        add_run(
            client,
            exp,
            run_name(prune, amount, gran, quant),
            T0_MS + k * 1000,
            eval_metrics(joules, acc),
            params,
            {"energy.estimated": "cpu,ram"},
        )
    # 2. replicates: "full" 3x ~100 J, "close" 3x ~97 J (inside the spread), "int8" 3x ~40 J
    exp = client.create_experiment("replicates", artifact_location=str(root / "a"))
    configs = {"full": (100.0, 0.800), "close": (97.0, 0.800), "int8": (40.0, 0.795)}
    for rep, jitter in enumerate((-4.0, 0.0, 4.0)):
        for cfg, (joules, acc) in configs.items():
            k += 1
            add_run(
                client,
                exp,
                cfg,
                T0_MS + k * 1000,
                eval_metrics(joules + jitter * joules / 100, acc + jitter / 2000),
                {"quantize": cfg, "seed": str(rep), **ESTIMATED_PARAMS},
                {"energy.estimated": "cpu,ram"},
            )
    # 3. a measured GPU run, a short run and a degraded one
    exp = client.create_experiment("markers", artifact_location=str(root / "a"))
    for name, joules, tags, gpu in [
        ("gpu-run", 5000.0, {"energy.estimated": "none"}, "counter"),
        (
            "tiny",
            0.4,
            {"energy.estimated": "cpu,ram", "energy.short_run": "cpu estimate updates every 1 s; run 0.3 s"},
            "none",
        ),
        ("flaky", 4000.0, {"energy.estimated": "none", "energy.degraded": "gpu0 lost at step 10"}, "counter"),
    ]:
        k += 1
        metrics = {**eval_metrics(joules, 0.9), "energy/gpu_j": joules * 0.7 if gpu != "none" else 0.0}
        add_run(
            client, exp, name, T0_MS + k * 1000, metrics, {"variant": name, "energy.gpu_method": gpu}, tags
        )
    return {"uri": uri}


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="wattlog")
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["compare", *argv])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def table_lines(out: str) -> tuple[list[str], list[str]]:
    """(header cells, data lines) of a printed table."""
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("run "))
    data = []
    for line in lines[i + 2 :]:
        if not line.strip() or line.startswith(
            ("★", "Δ", "×", "est:", "short:", "—", "single", "--wide", "params", "best", "no run", "least")
        ):
            break
        data.append(line)
    return re.split(r"\s{2,}", lines[i].strip()), data


# ------------------------------------------------------------------------------ width 100


def test_demo_sweep_fits_100_columns_with_every_number_legible(store: dict) -> None:
    df = compare_runs("bert-compress", metric="test_acc", baseline="first", tracking_uri=store["uri"])
    buf = io.StringIO()
    print_table(df, "test_acc", file=buf, width=100)
    out = buf.getvalue()
    lines = out.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    assert "…" not in out and "..." not in out
    header, data = table_lines(out)
    assert header[:7] == ["run", "energy", "Δ energy", "test_acc", "Δ test_acc", "★", "note"]
    assert "GPU" not in header  # no GPU was measured
    assert len(data) == len(SWEEP)
    for prune, amount, gran, quant, joules, acc in SWEEP:  # each run whole, on one line, numbers intact
        line = next(line for line in data if line.startswith(run_name(prune, amount, gran, quant) + " "))
        assert f"{acc:g}" in line and " J" in line and "est" in line
    base = next(line for line in data if line.startswith("none-none "))
    assert "121 J" in base and " base " in base
    int8 = next(line for line in data if line.startswith("none-int8_dynamic "))
    assert "40.3 J" in int8 and f"{MINUS}67 %" in int8 and "★" in int8
    assert lines[-1] == (
        f"best trade-off: none-int8_dynamic: {MINUS}67 % energy for {MINUS}0.0039 test_acc "
        "vs none-none (single runs)"
    )
    assert any(line.startswith("single runs: their run-to-run spread is unknown") for line in lines)


def test_the_demo_invocation_piped_fits_100_columns(
    store: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    rc, out, _ = cli(
        [
            "-e",
            "bert-compress",
            "--metric",
            "test_acc",
            "--baseline",
            "first",
            "--params",
            "prune.name,prune.amount,quantize.name",
            "--tracking-uri",
            store["uri"],
        ],
        capsys,
    )
    assert rc == 0
    assert all(len(line) <= 100 for line in out.splitlines())
    assert "…" not in out
    header, data = table_lines(out)
    assert len(data) == len(SWEEP) and "★" in header


def test_columns_env_and_wide(
    store: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["-e", "bert-compress", "--metric", "test_acc", "--tracking-uri", store["uri"]]
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, _ = cli(argv, capsys)
    assert rc == 0 and all(len(line) <= 80 for line in out.splitlines()) and "…" not in out
    assert "--wide adds:" in out
    rc, out, _ = cli([*argv, "--wide"], capsys)
    header, _ = table_lines(out)
    assert {"CPU", "RAM", "CO2e", "test/sample", "prune", "quantize"} <= set(header)
    # params that say the same thing are shown once
    assert not {"prune.name", "quantize.name", "prune.amount", "prune.granularity"} & set(header)
    assert "params not shown, they follow from the others: prune.amount, prune.granularity" in out
    assert max(len(line) for line in out.splitlines()) > 100  # wide: natural width, nothing cut
    assert "…" not in out


def test_machine_formats_one_row_per_run_in_joules(store: dict, capsys: pytest.CaptureFixture) -> None:
    argv = ["-e", "replicates", "--metric", "test_acc", "--tracking-uri", store["uri"]]
    rc, out, _ = cli([*argv, "--format", "csv"], capsys)
    df = pd.read_csv(io.StringIO(out))
    assert rc == 0 and len(df) == 9 and {"total_j", "group", "group_size", "group_pareto"} <= set(df.columns)
    assert set(df["group_size"]) == {3} and df["group"].nunique() == 3
    rc, out, _ = cli([*argv, "--format", "json"], capsys)
    recs = json.loads(out)
    assert rc == 0 and len(recs) == 9 and all(isinstance(r["total_j"], float) for r in recs)


# ------------------------------------------------------------------------------ replicates, noise


def test_replicates_are_grouped_with_mean_and_spread(store: dict) -> None:
    df = compare_runs("replicates", metric="test_acc", baseline="first", tracking_uri=store["uri"])
    groups = group_runs(df).set_index("run_name")
    assert list(groups["n"]) == [3, 3, 3]
    assert groups.loc["full", "total_j"] == pytest.approx(100.0)
    assert groups.loc["full", "total_j_sd"] == pytest.approx(4.0)
    assert groups.loc["int8", "delta_j_pct"] == pytest.approx(-60.0)
    assert bool(groups.loc["close", "delta_j_in_noise"]) and not bool(groups.loc["int8", "delta_j_in_noise"])
    # "close" saves 3 % but the runs vary by 4 %: not a win over "full"; both stay on the front
    assert bool(groups.loc["full", "pareto"]) and bool(groups.loc["close", "pareto"])
    assert groups.attrs["noise_known"]


def test_table_marks_differences_inside_the_spread(store: dict) -> None:
    df = compare_runs("replicates", metric="test_acc", baseline="first", tracking_uri=store["uri"])
    buf = io.StringIO()
    print_table(df, "test_acc", file=buf, width=100)
    out = buf.getvalue()
    _, data = table_lines(out)
    close = next(line for line in data if line.startswith("close ×3 "))
    full = next(line for line in data if line.startswith("full ×3 "))
    int8 = next(line for line in data if line.startswith("int8 ×3 "))
    assert "100±4 J" in full and " base " in full
    assert f"{MINUS}3.0 %~" in close  # inside the spread
    assert f"{MINUS}60 %" in int8 and f"{MINUS}60 %~" not in int8
    assert "×n: n runs with the same params (seeds aside): mean±sd" in out
    assert (
        out.splitlines()[-1]
        == f"best trade-off: int8 ×3: {MINUS}60 % energy for {MINUS}0.005 test_acc vs full"
    )


def test_verdict_never_names_a_saving_inside_the_noise(store: dict) -> None:
    df = compare_runs(
        "replicates",
        metric="test_acc",
        baseline="first",
        tracking_uri=store["uri"],
        filter="params.quantize != 'int8'",
    )
    v = verdict(group_runs(df))
    assert v.run_name is None
    assert v.text == "no run saves energy vs full beyond the run-to-run spread"
    no_metric = compare_runs("replicates", baseline="first", tracking_uri=store["uri"])
    assert verdict(group_runs(no_metric)).text.startswith("least energy: int8 ×3: 40.0 J")


def test_no_group_shows_every_run(store: dict, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = cli(
        ["-e", "replicates", "--metric", "test_acc", "--no-group", "--tracking-uri", store["uri"]], capsys
    )
    _, data = table_lines(out)
    assert rc == 0 and len(data) == 9 and "×3" not in out and "±" not in out


def test_noise_aware_pareto() -> None:
    metric, energy = [0.80, 0.80, 0.70], [100.0, 97.0, 40.0]
    assert (
        pareto_mask_noisy(metric, energy, "max") == pareto_mask(metric, energy, "max") == [False, True, True]
    )
    assert pareto_mask_noisy(metric, energy, "max", [0.01] * 3, [4.0, 4.0, 2.0]) == [True, True, True]
    # a much better metric dominates even when the energy difference is noise
    assert pareto_mask_noisy([0.8, 0.9], [100.0, 101.0], "max", [0.01, 0.01], [4.0, 4.0]) == [False, True]
    assert pareto_mask_noisy([float("nan"), 0.5], [1.0, 2.0], "max") == [False, True]


# ------------------------------------------------------------------------------ honest markers


def test_gpu_column_and_markers(store: dict, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = cli(
        ["-e", "markers", "--metric", "test_acc", "--wide", "--tracking-uri", store["uri"]], capsys
    )
    assert rc == 0
    header, data = table_lines(out)
    assert "GPU" in header  # some run measured a GPU
    rows = {line.split()[0]: line for line in data}
    assert re.search(r"\best,short\b", rows["tiny"]) and "400 mJ" in rows["tiny"]
    assert re.search(r"\bdegr\b", rows["flaky"]) and "3.50 kJ" not in rows["tiny"]
    assert "short: shorter than its energy method resolves" in out
    assert "degr: a source degraded during the run" in out
    assert "—" in rows["tiny"].split("est,short")[1].split()[0]  # no GPU measured: no 0 J
    verdict = out[out.index("best trade-off:"):].replace("\n", " ")
    assert verdict.startswith("best trade-off: tiny:")  # named, with its caveat: it may be noise
    assert "shorter than its energy method resolves" in verdict
    rc, out, _ = cli(
        ["-e", "bert-compress", "--metric", "test_acc", "--wide", "--tracking-uri", store["uri"]], capsys
    )
    assert "GPU" not in table_lines(out)[0]
