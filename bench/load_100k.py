"""Load test: a 100,000-step Lightning fit with per-step energy logging into a sqlite MLflow store.

Checks (issue 7, "Load and scale"): every per-step point arrives (count per key == steps), the
process's memory does not grow with the number of steps (RSS at 10k, 50k, 100k steps; the trace
rows go to a file, the sink spills to its spool beyond ``max_buffer_points``), and the flush at the
end (on_train_end -> fit() returns, plus whatever is still pending) takes < 10 s.

Usage: python bench/load_100k.py [--steps 100000] [--out bench/results/load_100k.txt]
Prints a report; with --out also writes it there. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import time

import psutil


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    steps = args.steps

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    from wattlog import EnergyMonitor

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):  # no self.log: only wattlog writes per step
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    checkpoints = sorted({s for s in (1_000, 10_000, 50_000, steps) if s <= steps})
    samples: list[tuple[int, float, float, int]] = []
    marks: dict[str, float] = {}

    class Probe(pl.Callback):  # after EnergyMonitor in the callback list
        def on_train_start(self, trainer, pl_module) -> None:
            marks["train_start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step in checkpoints and (not samples or samples[-1][0] != trainer.global_step):
                sink = monitor._sink
                samples.append((trainer.global_step, time.perf_counter() - marks["train_start"], _rss_mb(),
                                sink.pending_points if sink is not None else -1))

        def on_train_end(self, trainer, pl_module) -> None:
            marks["train_end"] = time.perf_counter()

    tmp = tempfile.mkdtemp(prefix="wattlog-load-")
    db = os.path.join(tmp, "mlflow.db")
    uri = f"sqlite:///{db}"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=False)
    monitor = EnergyMonitor(cpu="estimate", ram="estimate", log_every_n_steps=1, progress_bar=False,
                            carbon_intensity=400.0, spool_dir=os.path.join(tmp, "spool"))
    logger = MLFlowLogger(experiment_name="load", tracking_uri=uri)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=[monitor, Probe()], logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp, log_every_n_steps=10**9, num_sanity_val_steps=0)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    trainer.fit(Tiny(), data)
    t_fit_return = time.perf_counter()
    sink = monitor._sink
    left_after_fit = sink.pending_points
    delivered = sink.flush(timeout_s=None)  # whatever teardown's 10 s flush left
    t_flushed = time.perf_counter()
    sink.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    con = sqlite3.connect(db)
    counts = dict(con.execute(
        "SELECT key, COUNT(*) FROM metrics WHERE run_uuid = ? AND key IN "
        "('energy/step_j','energy/power_w','energy/gpu_power_w','energy/total_kwh','energy/emissions_g') "
        "GROUP BY key", (logger.run_id,)).fetchall())
    distinct = dict(con.execute(
        "SELECT key, COUNT(DISTINCT step) FROM metrics WHERE run_uuid = ? GROUP BY key", (logger.run_id,)).fetchall())
    artifacts = [a.path for a in __import__("mlflow").MlflowClient(uri).list_artifacts(logger.run_id, "energy")]
    con.close()

    train_s = marks["train_end"] - marks["train_start"]
    flush_s = t_flushed - marks["train_end"]
    lines = [
        f"# wattlog load test: {steps} steps, per-step logging, sqlite MLflow store",
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  python {platform.python_version()}  torch {torch.__version__}  "
        f"lightning {pl.__version__}  cpus {os.cpu_count()}  {platform.machine()}",
        f"train loop: {train_s:.1f} s ({1e3 * train_s / steps:.2f} ms/step incl. Lightning); fit() total "
        f"{t_fit_return - t0:.1f} s",
        f"RSS before fit: {rss0:.0f} MB",
        "step      t_s     rss_MB   sink_pending_records",
        *(f"{s:<8d} {t:7.1f}  {r:8.0f}   {p}" for s, t, r, p in samples),
        f"peak RSS (ru_maxrss): {peak_mb:.0f} MB",
        f"flush at the end: on_train_end -> fit() returned {t_fit_return - marks['train_end']:.2f} s "
        f"({left_after_fit} records still pending), -> all delivered {flush_s:.2f} s (delivered={delivered})",
        "points per key (rows; distinct steps):",
        *(f"  {k}: {counts.get(k, 0)}; {distinct.get(k, 0)}" for k in sorted(counts)),
        f"artifacts: {artifacts}",
    ]
    ok = all(distinct.get(k, 0) == steps for k in ("energy/step_j", "energy/power_w", "energy/total_kwh"))
    ok = ok and flush_s < 10.0
    lines.append(f"RESULT: {'PASS' if ok else 'FAIL'} (all points present: every key has {steps} distinct steps; "
                 "flush < 10 s)")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
