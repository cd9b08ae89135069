"""Training throughput with and without EnergyMonitor, measured side by side in one process.

Run: .venv/bin/python bench/callback_overhead.py [--steps 1000] [--pairs 3] [--every 1 50]
     .venv/bin/python bench/callback_overhead.py --before ba18a6e [--steps 400] [--pairs 2]
The second form measures the code at git revision BEFORE and the working tree side by side in one run:
each pair of fits runs in a fresh subprocess with that version's ``plugin/`` first on ``sys.path``,
the two versions alternating.
The same CPU fit (an MLP, ~5-20 ms per step, MLFlowLogger on sqlite) alternates without and with
EnergyMonitor, with log_every_n_steps=1 (a point per key per step, the worst case) and 50 (Lightning's
default). Reports the
median throughput ratio (with / without) and the training-thread cost of the callback's hooks per
step. The monitor reads the fake NVML (2 GPUs, tests/fakes) plus the CPU/RAM estimates.
Targets (issue 3): ratio >= 0.99, training-thread cost <= 50 us/step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
warnings.filterwarnings("ignore")

from fakes.nvml import FakeGpu, FakeNvml  # noqa: E402

HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_validation_start", "on_validation_end")


def timed_monitor(hooks=HOOKS, **kwargs):
    """An EnergyMonitor whose ``hooks`` add their wall time to ``monitor.hook_s`` and, per call, to
    ``monitor.hook_calls_s`` (bench/ddp_scale.py uses both)."""
    from wattlog import EnergyMonitor

    monitor = EnergyMonitor(**kwargs)
    monitor.hook_s = 0.0
    monitor.hook_calls_s = []
    for name in hooks:
        fn = getattr(monitor, name)

        def wrapper(*a, _fn=fn, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                monitor.hook_s += dt
                monitor.hook_calls_s.append(dt)

        setattr(monitor, name, wrapper)
    return monitor


def fit(steps: int, with_monitor: bool, uri: str, root: str, every: int = 1):
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(256, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 256))

        def training_step(self, batch, _):
            (x,) = batch
            loss = torch.nn.functional.mse_loss(self.net(x), x)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    data = DataLoader(TensorDataset(torch.randn(steps * 128, 256)), batch_size=128)
    callbacks = [timed_monitor(gpus=[0, 1], cpu="estimate", ram="estimate", log_every_n_steps=every)] if with_monitor else []
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=MLFlowLogger("bench", tracking_uri=uri),
                         callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, log_every_n_steps=50)
    t0 = time.perf_counter()
    trainer.fit(MLP(), data)
    elapsed = time.perf_counter() - t0
    hook_us = 1e6 * callbacks[0].hook_s / steps if callbacks else 0.0
    return steps / elapsed, hook_us, elapsed / steps


def hook_microbench(steps: int = 20000) -> tuple[float, float]:
    """Median and p99 (us) of the callback's per-step hooks called directly, without Lightning or busy threads."""
    import types

    import torch

    from wattlog import EnergyMonitor
    from wattlog.session import EnergySession
    from wattlog.sinks.base import MemorySink

    monitor = EnergyMonitor(gpus=[0, 1], cpu="none", ram="none", log_every_n_steps=50, progress_bar=False)
    monitor._session = EnergySession(monitor.options, gpus=[0, 1], log_every_n_steps=50)
    monitor._session.open(MemorySink())
    if hasattr(monitor, "_bind_stage"):  # what setup() does after opening the session (absent before 2026-12)
        monitor._bind_stage()
    loop = types.SimpleNamespace(_batches_that_stepped=0)
    trainer = types.SimpleNamespace(global_step=0, loggers=[], fit_loop=types.SimpleNamespace(epoch_loop=loop))
    batch = (torch.zeros(128, 256),)
    costs = []
    for i in range(steps):
        t0 = time.perf_counter_ns()
        monitor.on_train_batch_start(trainer, None, batch, i)
        trainer.global_step += 1
        monitor.on_train_batch_end(trainer, None, None, batch, i)
        costs.append(time.perf_counter_ns() - t0)
        loop._batches_that_stepped += 1
    monitor._session.close()
    costs.sort()
    return costs[len(costs) // 2] / 1e3, costs[int(0.99 * len(costs))] / 1e3


def side_by_side(before: str, steps: int, pairs: int, everies: list[int]) -> None:
    """Before (git revision) vs after (this tree), alternating subprocesses; prints one table."""
    import re
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(here)
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "before")
        subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", old, before], check=True,
                       capture_output=True)
        try:
            trees = {"before": os.path.join(old, "plugin"), "after": os.path.join(repo, "plugin")}
            rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for every in everies:
                for pair in range(pairs):
                    order = ("before", "after") if pair % 2 == 0 else ("after", "before")
                    for label in order:
                        env = dict(os.environ, PYTHONPATH=trees[label], PYTHONUNBUFFERED="1")
                        out = subprocess.run([sys.executable, __file__, "--steps", str(steps), "--pairs", "1",
                                              "--every", str(every), "--no-micro"], env=env, capture_output=True,
                                             text=True, timeout=1800)
                        m = re.search(r"ratio ([0-9.]+), callback hooks ([0-9.]+) us/step", out.stdout)
                        if m is None:
                            print(f"{label} every={every}: failed\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
                            continue
                        rows.setdefault((label, every), []).append((float(m.group(1)), float(m.group(2))))
                        print(f"{label:6s} log_every_n_steps={every} pair {pair}: ratio {m.group(1)}, "
                              f"training-thread hooks {m.group(2)} us/step", flush=True)
            print(f"\nside by side ({steps} steps per fit, {pairs} pairs; before = {before}, after = working tree)")
            print("version  log_every  median ratio  median hooks us/step")
            for (label, every), vals in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0] != "before")):
                print(f"{label:7s}  {every:9d}  {statistics.median(v[0] for v in vals):12.4f}  "
                      f"{statistics.median(v[1] for v in vals):20.1f}")
        finally:
            subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", old], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 50], help="log_every_n_steps values to measure")
    ap.add_argument("--before", default=None, help="a git revision to measure side by side with this tree")
    ap.add_argument("--no-micro", action="store_true", help="skip the direct-call microbenchmark")
    args = ap.parse_args()
    if args.before:
        side_by_side(args.before, args.steps, args.pairs, args.every)
        return
    fake = FakeNvml([FakeGpu(power_w=250.0), FakeGpu(power_w=200.0)])
    sys.modules["pynvml"] = fake.module
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["WATTLOG_SPOOL_DIR"] = os.path.join(tmp, "spool")
        uri = f"sqlite:///{tmp}/bench.db"
        fit(50, True, uri, tmp)  # warm-up: imports, sqlite schema
        summary = []
        for every in args.every:
            ratios, hooks, step_ms = [], [], []
            for pair in range(args.pairs):
                order = (False, True) if pair % 2 == 0 else (True, False)  # alternate who goes first
                result = {flag: fit(args.steps, flag, uri, tmp, every) for flag in order}
                (tp_off, _, s_off), (tp_on, hook_us, _) = result[False], result[True]
                ratios.append(tp_on / tp_off)
                hooks.append(hook_us)
                step_ms.append(1e3 * s_off)
                print(f"log_every_n_steps={every} pair {pair}: without {tp_off:.1f} it/s, with {tp_on:.1f} it/s, "
                      f"ratio {tp_on / tp_off:.4f}, callback hooks {hook_us:.1f} us/step")
            summary.append((every, statistics.median(step_ms), statistics.median(ratios), statistics.median(hooks)))
    if not args.no_micro:
        median_us, p99_us = hook_microbench()
        print(f"the hooks alone (called directly, no Lightning, idle threads): median {median_us:.1f} us, "
              f"p99 {p99_us:.1f} us per step")
    print(f"steps per fit: {args.steps}; targets: ratio >= 0.99, training-thread cost <= 50 us/step")
    for every, ms, ratio, hook in summary:
        print(f"log_every_n_steps={every}: step {ms:.1f} ms without monitor, median throughput ratio {ratio:.4f}, "
              f"median training-thread cost {hook:.1f} us/step")


if __name__ == "__main__":
    main()
