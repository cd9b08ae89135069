"""Training throughput with a slow MLflow tracking server (issue 7, item 2).

The same small CPU fit, with ``EnergyMonitor(log_every_n_steps=1)`` and Lightning's ``MLFlowLogger``,
runs against (a) a local ``mlflow server`` directly and (b) the same server behind a loopback proxy
that delays every HTTP request by 200-500 ms, alternated in one process. It prints the training-loop
throughput (steps/s between on_train_start and on_train_end; set-up and the final flush excluded),
the ratio slow/direct, and the writer's peak in-memory buffer.

Run: ``.venv/bin/python bench/slow_tracking.py [--steps 400] [--rounds 5] [--step-ms 5]`` (about 2-3 minutes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mlflow_server import MlflowServer, SlowProxy, quiet_module  # noqa: E402


def _fit(uri: str, steps: int, root: Path, step_s: float) -> tuple[float, float, int, int]:
    """One fit; returns (train-loop steps/s, whole fit seconds, peak buffered records, points pending after)."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    from wattlog import EnergyMonitor

    class Clock(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            self.t1 = time.perf_counter()

    x = torch.randn(steps * 8, 8, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    clock = Clock()
    monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=1,
                            spool_dir=str(root / "spool"), artifacts=False)
    trainer = pl.Trainer(max_steps=steps, callbacks=[monitor, clock], enable_checkpointing=False,
                         logger=MLFlowLogger(experiment_name="bench", tracking_uri=uri), default_root_dir=root,
                         accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    t = time.perf_counter()
    trainer.fit(quiet_module(step_s), data)
    fit_s = time.perf_counter() - t
    sink = monitor._sink
    sink.flush(timeout_s=120)
    peak, left = sink.peak_buffered_records, sink.pending_points
    sink.close()
    return steps / (clock.t1 - clock.t0), fit_s, peak, left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--step-ms", type=float, default=5.0, help="extra work per training step (sleep), ms")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="wattlog-bench-") as tmp:
        root = Path(tmp)
        server = MlflowServer(root / "mlflow.db")
        try:
            server.start()
            with SlowProxy(server.port, delay_s=(0.2, 0.5)) as proxy:
                res: dict[str, list[tuple[float, float, int, int]]] = {"direct": [], "slow": []}
                _fit(server.uri, 50, root / "warmup", args.step_ms / 1000)
                for r in range(args.rounds):
                    for name, uri in (("direct", server.uri), ("slow", proxy.uri)):
                        res[name].append(_fit(uri, args.steps, root / f"{name}{r}", args.step_ms / 1000))
                        sps, fit_s, peak, left = res[name][-1]
                        print(f"round {r} {name:6s}: {sps:7.1f} steps/s in the train loop, fit {fit_s:5.1f} s, "
                              f"writer peak buffer {peak} records, undelivered after flush {left}", flush=True)
                print(f"proxy requests: {proxy.requests} (each delayed 200-500 ms)")
        finally:
            server.kill()
    med = {k: statistics.median(v[0] for v in rows) for k, rows in res.items()}
    fit = {k: statistics.median(v[1] for v in rows) for k, rows in res.items()}
    peak = max(v[2] for rows in res.values() for v in rows)
    print(f"\n{args.steps} steps (+{args.step_ms:g} ms sleep each) x {args.rounds} rounds, per-step logging, "
          f"CPU, {os.cpu_count()} cores")
    print(f"train-loop throughput, median steps/s: direct {med['direct']:.1f}, slow {med['slow']:.1f}, "
          f"ratio slow/direct {med['slow'] / med['direct']:.3f}")
    print(f"whole fit (set-up + teardown flush), median s: direct {fit['direct']:.1f}, slow {fit['slow']:.1f}")
    print(f"writer peak buffered records (all runs): {peak}")


if __name__ == "__main__":
    main()
