"""Step time of a Lightning DDP fit with vs without EnergyMonitor, at world sizes 2, 4 and 8 (issue 13, item 5).

Run (one command, about 8-10 minutes on a 2-core machine with the defaults):

    .venv/bin/python bench/ddp_scale.py [--rounds 2] [--world-sizes 2 4 8] [--steps 80] [--warmup 20]
                                        [--sleep-ms 25] [--out bench/results/ddp_scale.md]

Each measurement is one ``trainer.fit()`` in a fresh process (this script with ``--child``; Lightning's
``strategy="ddp"`` launches the other ranks as copies of it): ``accelerator="cpu"``, gloo, a tiny model
(``Linear(8, 1)``, batch 4) whose ``training_step`` also sleeps ``--sleep-ms`` so that a step resembles
real work (a GPU-bound step waits) and the model itself does not saturate the CPUs; MLFlowLogger on a
fresh sqlite store in a temp dir (the trainer's log_every_n_steps=50, ``train_loss`` logged per step),
the same in both variants. The monitored variant adds ``EnergyMonitor(gpus=[local_rank], cpu="none",
ram="none", log_every_n_steps=1)``: rank r measures fake NVML GPU r (tests/fakes/nvml.py, one 300 W GPU
per rank), and every step is a logging boundary: the worst case for the monitor under DDP.

Step time is measured on rank 0 from ``time.perf_counter()`` stamps at every ``on_train_batch_start``
(a timing callback listed before the monitor), after ``--warmup`` steps: set-up, the first steps and the
end of the fit are excluded. Per fit: the median and the mean of the step intervals; per world size and
round, the two variants run back to back (who goes first alternates by round) and their ratio
(with / without) is paired within the round. Reported: median [min, max] over rounds. Also reported: the
wall time rank 0's training thread spends inside the monitor's per-step hooks (where the collective
runs today).

Writes a markdown table to ``--out`` and the raw per-fit results next to it (``.jsonl``).
No thresholds are asserted: the numbers are for reading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from callback_overhead import timed_monitor  # noqa: E402 - the hooks' wall time, per call
from peers import spread  # noqa: E402 - median [min, max], as in every bench table

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOOKS = ("on_train_batch_start", "on_train_batch_end")


# ---------------------------------------------------------------- child: one DDP fit (every rank runs this)

def child(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from fakes.nvml import FakeGpu, FakeNvml

    sys.modules["pynvml"] = FakeNvml([FakeGpu(power_w=300.0) for _ in range(args.world_size)]).module

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    sleep_s = args.sleep_ms / 1e3

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            time.sleep(sleep_s)
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Stamps(pl.Callback):
        def __init__(self) -> None:
            self.t: list[float] = []
            self.fit_start = self.fit_end = 0.0

        def on_fit_start(self, trainer, pl_module):
            self.fit_start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.t.append(time.perf_counter())  # end of the last step

        def on_fit_end(self, trainer, pl_module):
            self.fit_end = time.perf_counter()

    stamps = Stamps()
    callbacks: list = [stamps]
    monitor = None
    if args.monitor:
        monitor = timed_monitor(HOOKS, gpus=[local_rank], cpu="none", ram="none", log_every_n_steps=1,
                                carbon_intensity=100.0)
        callbacks.append(monitor)
    n = args.steps * args.world_size * 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=args.world_size, strategy="ddp",
                         callbacks=callbacks, logger=MLFlowLogger("ddp_scale", tracking_uri=args.uri),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=args.root, limit_val_batches=0, log_every_n_steps=50)
    t0 = time.perf_counter()
    trainer.fit(Tiny(), data)
    total_s = time.perf_counter() - t0
    if trainer.global_rank != 0:
        return
    t = stamps.t
    intervals = [b - a for a, b in zip(t[args.warmup:-1], t[args.warmup + 1:])]
    out = {
        "world_size": trainer.world_size,
        "monitor": bool(args.monitor),
        "steps": args.steps,
        "warmup": args.warmup,
        "sleep_ms": args.sleep_ms,
        "measured_steps": len(intervals),
        "median_step_ms": 1e3 * statistics.median(intervals),
        "mean_step_ms": 1e3 * statistics.fmean(intervals),
        "p90_step_ms": 1e3 * sorted(intervals)[int(0.9 * len(intervals))],
        "max_step_ms": 1e3 * max(intervals),
        "fit_s": stamps.fit_end - stamps.fit_start,
        "total_s": total_s,
    }
    if monitor is not None:
        # both hooks of a step, summed; the steps after the warm-up only
        per_step = [a + b for a, b in zip(monitor.hook_calls_s[0::2], monitor.hook_calls_s[1::2])]
        tail = per_step[args.warmup:]
        out["hook_median_us"] = 1e6 * statistics.median(tail) if tail else 0.0
        out["hook_mean_us"] = 1e6 * statistics.fmean(tail) if tail else 0.0
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- parent: interleaved rounds, table

def run_one(world_size: int, monitor: bool, args: argparse.Namespace, tmp: str, env: dict) -> dict | None:
    d = tempfile.mkdtemp(prefix=f"ws{world_size}-{'on' if monitor else 'off'}-", dir=tmp)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--world-size", str(world_size),
           "--monitor", "1" if monitor else "0", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--sleep-ms", str(args.sleep_ms), "--uri", f"sqlite:///{d}/mlflow.db", "--root", d]
    cenv = dict(env, WATTLOG_SPOOL_DIR=os.path.join(d, "spool"), MASTER_PORT=str(free_port()))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=cenv, capture_output=True, text=True, timeout=args.timeout, cwd=d)
    except subprocess.TimeoutExpired:
        print(f"  world size {world_size} monitor={monitor}: timed out after {args.timeout} s", flush=True)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["process_s"] = time.perf_counter() - t0
            return out
    print(f"  world size {world_size} monitor={monitor}: failed (rc {proc.returncode})\n"
          f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}", flush=True)
    return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--sleep-ms", type=float, default=25.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per fit, seconds")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ddp_scale.md"))
    # child mode (internal)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--world-size", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--monitor", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--uri", default="", help=argparse.SUPPRESS)
    ap.add_argument("--root", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    started = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    load_before = load()
    t_start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", WATTLOG_STRICT="0",
               PYTHONPATH=os.path.join(REPO, "plugin") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="wattlog-ddp-scale-") as tmp:
        for r in range(args.rounds):
            for ws in args.world_sizes:
                order = (False, True) if r % 2 == 0 else (True, False)
                for flag in order:
                    out = run_one(ws, flag, args, tmp, env)
                    if out is None:
                        continue
                    out["round"] = r
                    out["load"] = load()
                    rows.append(out)
                    hook = f", monitor hooks {out['hook_median_us']:.0f} us/step (median)" if flag else ""
                    print(f"round {r} world size {ws} {'with   ' if flag else 'without'}: median step "
                          f"{out['median_step_ms']:.2f} ms, mean {out['mean_step_ms']:.2f} ms{hook} "
                          f"[{out['process_s']:.0f} s, load {out['load']}]", flush=True)
    write(args, rows, started, commit, load_before, load(), time.perf_counter() - t_start)


def write(args, rows, started, commit, load_before, load_after, elapsed_s) -> None:
    def pick(ws, flag, r):
        hit = [x for x in rows if x["world_size"] == ws and x["monitor"] == flag and x["round"] == r]
        return hit[0] if hit else None

    cmd = (f"bench/ddp_scale.py --rounds {args.rounds} --world-sizes {' '.join(map(str, args.world_sizes))} "
           f"--steps {args.steps} --warmup {args.warmup} --sleep-ms {args.sleep_ms:g}")
    lines = [f"# EnergyMonitor under DDP: step time with vs without, by world size ({started}, main `{commit}`)", "",
             f"Command: `.venv/bin/python {cmd}` ({elapsed_s / 60:.1f} min).", "",
             f"Lightning DDP fit (`strategy=\"ddp\"`, `accelerator=\"cpu\"`, gloo), a tiny model (Linear(8, 1), "
             f"batch 4) plus a {args.sleep_ms:g} ms sleep in `training_step`; MLFlowLogger on a fresh sqlite store "
             "per fit. With the monitor: `EnergyMonitor(gpus=[local_rank], cpu=\"none\", ram=\"none\", "
             "log_every_n_steps=1)`, one fake NVML GPU per rank (tests/fakes/nvml.py), so every step is a "
             "logging boundary. Each fit is a fresh process; per world size and round the two variants run back "
             "to back, who goes first alternating by round. Step time: rank 0, intervals between "
             f"`on_train_batch_start` stamps after {args.warmup} warm-up steps ({args.steps - args.warmup} "
             "intervals per fit; set-up and end of fit excluded). Ratios are paired within a round; "
             f"median [min, max] over {args.rounds} rounds.", "",
             f"Machine: {os.cpu_count()} CPU cores, shared with other jobs (load average "
             f"{load_before} before, {load_after} after). World size 4 puts 2 ranks per core and world size 8 "
             "puts 4 ranks per core: both oversubscribe it, 8 heavily, so their absolute step times measure CPU "
             "contention as much as the collective.", "",
             "| world size | median step without, ms | median step with, ms | ratio of medians (with / without) "
             "| ratio of means | p90 step with / without | monitor hooks on rank 0, us/step (median) |",
             "|---|---|---|---|---|---|---|"]
    for ws in args.world_sizes:
        off, on, rm, rmean, rp90, hooks = [], [], [], [], [], []
        for r in range(args.rounds):
            a, b = pick(ws, False, r), pick(ws, True, r)
            if a:
                off.append(a["median_step_ms"])
            if b:
                on.append(b["median_step_ms"])
                hooks.append(b["hook_median_us"])
            if a and b:
                rm.append(b["median_step_ms"] / a["median_step_ms"])
                rmean.append(b["mean_step_ms"] / a["mean_step_ms"])
                rp90.append(b["p90_step_ms"] / a["p90_step_ms"])
        lines.append(f"| {ws} | {spread(off, '{:.2f}')} | {spread(on, '{:.2f}')} | {spread(rm)} | "
                     f"{spread(rmean)} | {spread(rp90)} | {spread(hooks, '{:.0f}')} |")
    lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    text = "\n".join(lines)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    with open(os.path.splitext(args.out)[0] + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(text)


if __name__ == "__main__":
    main()
