"""How `compare_runs` scales with the number of runs (issue 6).

Creates a sqlite MLflow store with one experiment of 100, one of 1,000 and one of 5,000 runs,
each run logged through the real MlflowClient like an EnergyMonitor run (create_run, one
log_batch of 11 energy summary metrics + 2 metrics, 14 params, 1 tag, set_terminated), then
times `compare_runs(metric="val_acc", baseline="first")` on each experiment (best of
--repeats), next to the raw paged `search_runs` it is built on, and prints the growth ratios.

    .venv/bin/python bench/compare_scale.py              # ~4-6 min on 2 cores, mostly run creation
    .venv/bin/python bench/compare_scale.py --db /tmp/scale.db   # reuse a store across invocations

Target: <= 3 s for 1,000 runs and linear growth (ratio ~10 from 100 to 1,000, ~5 to 5,000).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path


def fill(client, name: str, n_runs: int, artifact_root: Path) -> tuple[str, float]:  # noqa: ANN001
    """Creates experiment ``name`` with ``n_runs`` runs; returns its id and the seconds it took."""
    from mlflow.entities import Metric, Param, RunTag

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        n_have = len(client.search_runs([exp.experiment_id], max_results=50000))
        if n_have == n_runs:
            return exp.experiment_id, 0.0
        raise SystemExit(f"{name} exists with {n_have} runs, expected {n_runs}; use a fresh --db")
    exp_id = client.create_experiment(name, artifact_location=str(artifact_root / name))
    rng = random.Random(n_runs)
    t0 = time.perf_counter()
    start_ms = 1_700_000_000_000
    for i in range(n_runs):
        total_kwh = rng.uniform(0.001, 0.1)
        ts = start_ms + i * 1000
        metrics = {
            "energy/total_kwh": total_kwh,
            "energy/gpu_kwh": total_kwh * 0.8,
            "energy/cpu_kwh": total_kwh * 0.15,
            "energy/ram_kwh": total_kwh * 0.05,
            "energy/train_kwh": total_kwh * 0.9,
            "energy/val_kwh": total_kwh * 0.1,
            "energy/emissions_g": total_kwh * 475.0,
            "energy/j_per_sample": total_kwh * 3.6e6 / 50_000,
            "energy/test_j_per_sample": total_kwh * 3.6e6 / 100_000,
            "energy/avg_power_w": rng.uniform(150, 400),
            "energy/duration_s": rng.uniform(600, 3600),
            "val_acc": rng.uniform(0.7, 0.95),
            "val_loss": rng.uniform(0.1, 0.6),
        }
        params = {
            "lr": str(rng.choice([1e-4, 3e-4, 1e-3])),
            "batch_size": str(rng.choice([16, 32, 64])),
            "prune.amount": str(rng.choice([0.0, 0.3, 0.6])),
            "quantize": rng.choice(["none", "int8"]),
            "seed": str(i),
            "model": "minilm",
            "energy.gpu_model": "NVIDIA H100 80GB HBM3",
            "energy.gpu_count": "1",
            "energy.gpu_method": "counter",
            "energy.cpu_method": "estimate",
            "energy.ram_method": "estimate",
            "energy.carbon_intensity_g_per_kwh": "475.0",
            "energy.carbon_source": "world_average",
            "energy.pue": "1.0",
        }
        run = client.create_run(exp_id, start_time=ts, run_name=f"run-{i:05d}")
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, ts, 1000) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag("energy.estimated", "cpu,ram")],
        )
        client.set_terminated(run.info.run_id, end_time=ts + 600_000)
    return exp_id, time.perf_counter() - t0


def best_of(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=None, help="sqlite file to create or reuse (default: a temp dir)")
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import mlflow
    import pandas
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    import wattlog.compare as compare

    tmp = tempfile.TemporaryDirectory(prefix="wattlog_scale_")
    db = Path(args.db) if args.db else Path(tmp.name) / "mlflow.db"
    uri = f"sqlite:///{db.resolve()}"
    print(
        f"wattlog compare_scale: python {platform.python_version()}, mlflow {mlflow.__version__}, "
        f"pandas {pandas.__version__}, {os.cpu_count()} CPUs, {platform.platform()}"
    )
    print(f"store: {uri}; page size {compare.PAGE_SIZE}; best of {args.repeats}")
    t0 = time.perf_counter()
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)  # creates the schema
    print(f"store init: {time.perf_counter() - t0:.1f} s")

    exp_ids = {}
    for n in sizes:
        exp_ids[n], secs = fill(client, f"scale-{n}", n, db.parent / "artifacts")
        if secs:
            print(f"created {n:>5} runs in {secs:6.1f} s ({1000 * secs / n:.1f} ms/run)")
        sys.stdout.flush()

    def search_all(exp_id: str) -> int:
        token, count = None, 0
        while True:
            page = client.search_runs(
                [exp_id],
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=compare.PAGE_SIZE,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            count += len(page)
            token = page.token
            if not token:
                return count

    print(f"\n{'runs':>6} {'search_runs s':>14} {'compare_runs s':>15} {'ms/run':>7}")
    results = {}
    for n in sizes:
        df = compare.compare_runs(f"scale-{n}", metric="val_acc", baseline="first", tracking_uri=uri)
        assert len(df) == n and df["pareto"].any() and not df["missing_energy"].any(), "bad frame"
        t_search = best_of(lambda n=n: search_all(exp_ids[n]), args.repeats)
        t_compare = best_of(
            lambda n=n: compare.compare_runs(
                f"scale-{n}", metric="val_acc", baseline="first", tracking_uri=uri
            ),
            args.repeats,
        )
        results[n] = t_compare
        print(f"{n:>6} {t_search:>14.3f} {t_compare:>15.3f} {1000 * t_compare / n:>7.2f}")
    print("\ngrowth of compare_runs time (linear = ratio of run counts):")
    for a, b in zip(sizes, sizes[1:]):
        print(f"  {a:>5} -> {b:>5} runs: x{results[b] / results[a]:.2f} (linear: x{b / a:.0f})")
    if 1000 in results:
        verdict = "meets" if results[1000] <= 3.0 else "MISSES"
        print(f"1,000 runs: {results[1000]:.2f} s ({verdict} the <= 3 s target)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
