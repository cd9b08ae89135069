"""One measurement of bench/peers.py in a fresh process; prints one JSON line ``RESULT {...}``.

Parts:
- ``fit TOOL``: the same tiny Lightning fit (MLP on CPU plus a 20 ms wait per step, MLFlowLogger on a shared sqlite store) with TOOL:
  ``none``, ``wattlog`` (EnergyMonitor, the trainer's log_every_n_steps), ``wattlog_every1`` (per-step
  points), ``zeus_step`` (a ZeusMonitor window per step), ``zeus_fit`` (one window over the fit),
  ``codecarbon_fit`` (an offline tracker over the fit), ``codecarbon_tasks`` (a task per step),
  ``mlflow`` (MLflow system metrics, 1 s sampling), ``control`` (no tool, wattlog's background work without
  wattlog: a 20-ms GPU-reading thread and a niced child importing mlflow). Reports steps/s, the tool's training-thread time per
  step and outside the steps, main-thread and process CPU per step, and the share of fit wall time measured.
- ``accuracy TOOL``: 25 ms steps (sleeping, no Lightning) under square-wave power; each tool's per-step
  GPU energy against the simulator's exact integral.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from statistics import median

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import simgpu  # noqa: E402


class Clock:
    """Time spent inside wrapped calls, split into per-step and fixed (everything else); ``per_step_s``
    holds each step's time (its first per-step call opens a step, the others add to it)."""

    def __init__(self) -> None:
        self.step_s = 0.0
        self.fixed_s = 0.0
        self.per_step_s: list[float] = []

    def wrap(self, fn, step: bool, opens_step: bool = False):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                if step:
                    self.step_s += dt
                    if opens_step or not self.per_step_s:
                        self.per_step_s.append(dt)
                    else:
                        self.per_step_s[-1] += dt
                else:
                    self.fixed_s += dt

        return timed


SAMPLE_S = [0.02]
"""wattlog's sample_interval_s in the fit (``--sample-interval-s``; EnergyMonitor's default)."""

GPU_WAIT_S = 0.02
"""Each fit step: ~5 ms of CPU (a small MLP) plus 20 ms waiting, like a GPU-bound step (~25 ms)."""
STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end")
FIXED_HOOKS = ("setup", "on_fit_start", "on_train_start", "on_train_epoch_start", "on_train_end", "on_fit_end",
               "teardown", "on_validation_start", "on_validation_end", "on_exception")


def instrument(callback, clock: Clock):
    for name in STEP_HOOKS + FIXED_HOOKS:
        if hasattr(callback, name):
            setattr(callback, name, clock.wrap(getattr(callback, name), step=name in STEP_HOOKS,
                                               opens_step=name == STEP_HOOKS[0]))
    return callback


def make_callbacks(tool: str, clock: Clock, spans: list, sim):
    import lightning.pytorch as pl

    class StepTimes(pl.Callback):  # present in every configuration: step boundaries, power mode "steps"
        def __init__(self):
            self.first = self.last = None
            self.n = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.first is None:
                self.first = time.perf_counter()
            sim.step(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.last = time.perf_counter()
            self.n += 1

    class Empty(pl.Callback):  # the timer's own floor: two empty per-step hooks under the same wrapper
        pass

    class Reach(pl.Callback):  # first in the list: its setup runs first; last: its teardown runs last
        def __init__(self, at: list, index: int):
            self.at, self.index = at, index

        def setup(self, trainer, pl_module, stage):
            if self.index == 0:
                self.at[0] = time.perf_counter()

        def teardown(self, trainer, pl_module, stage):
            if self.index == 1:
                self.at[1] = time.perf_counter()

    Background = _background_callback()
    steps = StepTimes()
    steps.reach = [None, None]
    steps.empty_clock = Clock()
    cbs = [Reach(steps.reach, 0), steps, instrument(Empty(), steps.empty_clock)]
    if tool.startswith("wattlog"):
        import wattlog.meter as wmeter
        from wattlog import EnergyMonitor

        start, close = wmeter.EnergyMeter.start, wmeter.EnergyMeter.close

        def start_spy(self):
            out = start(self)
            spans.append([self.start_s, None])
            return out

        def close_spy(self):
            out = close(self)
            if spans and self.end_s is not None:
                spans[-1][1] = self.end_s
            return out

        wmeter.EnergyMeter.start, wmeter.EnergyMeter.close = start_spy, close_spy
        every = {"log_every_n_steps": 1} if tool == "wattlog_every1" else {}
        cbs.append(instrument(EnergyMonitor(gpus=[0, 1], cpu="estimate", ram="estimate", progress_bar=False,
                                            sample_interval_s=SAMPLE_S[0],
                                            **every), clock))
    elif tool == "zeus_step":
        from zeus.monitor import ZeusMonitor

        class ZeusSteps(pl.Callback):
            def setup(self, trainer, pl_module, stage):
                self.zeus = ZeusMonitor(gpu_indices=[0, 1], cpu_indices=[])
                self.energy_j = 0.0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.zeus.begin_window(f"s{batch_idx}", sync_execution=False)
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                spans.append([self.t0, time.perf_counter()])
                m = self.zeus.end_window(f"s{batch_idx}", sync_execution=False)
                self.energy_j += sum(m.gpu_energy.values())
                pl_module.log("zeus_step_j", sum(m.gpu_energy.values()))  # what a user logs per step

        cbs.append(instrument(ZeusSteps(), clock))
    elif tool == "codecarbon_tasks":
        class CodeCarbonTasks(pl.Callback):
            def __init__(self, tracker):
                self.tracker = tracker

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.t0 = time.perf_counter()
                self.tracker.start_task(f"s{batch_idx}")

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.tracker.stop_task(f"s{batch_idx}")
                spans.append([self.t0, time.perf_counter()])

        cbs.append(CodeCarbonTasks)  # completed in run_fit, once the tracker exists
    elif tool == "control":
        cbs.append(Background(sim))
    cbs.append(Reach(steps.reach, 1))
    return steps, cbs


def _background_callback():
    import lightning.pytorch as pl

    class Background(pl.Callback):
        """No tool, but wattlog's background work: a thread reading both GPUs every 20 ms (the sampler) and
        a child at nice +10 that imports mlflow, opens the store and waits (the delivery process)."""

        def __init__(self, sim) -> None:
            self.sim = sim

        def setup(self, trainer, pl_module, stage):
            import subprocess
            import threading

            import pynvml

            code = ("import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments(); "
                    "sys.stdin.read()")
            self.proc = subprocess.Popen([sys.executable, "-c", code, os.environ["PEERS_URI"]],
                                         stdin=subprocess.PIPE)
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, 10)
            self.stop = threading.Event()
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in (0, 1)]

            def sample() -> None:
                while not self.stop.wait(0.02):
                    for h in handles:
                        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()

        def teardown(self, trainer, pl_module, stage):
            self.stop.set()
            self.thread.join()
            self.proc.kill()  # by a long fit's end it has started up, as the delivery process would have
            self.proc.wait()

    return Background


def codecarbon_tracker():
    from codecarbon import OfflineEmissionsTracker

    return OfflineEmissionsTracker(country_iso_code="FRA", save_to_file=False, log_level="error",
                                   measure_power_secs=1, tracking_mode="process")


def run_fit(tool: str, steps_n: int, uri: str, root: str) -> dict:
    sim = simgpu.install(gpus=2, mode="square", counter_s=0.02, instant_s=0.02)
    import lightning.pytorch as pl
    import mlflow
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(256, 1536), torch.nn.ReLU(), torch.nn.Linear(1536, 256))

        def training_step(self, batch, _):
            (x,) = batch
            loss = torch.nn.functional.mse_loss(self.net(x), x)
            self.log("train_loss", loss)
            time.sleep(GPU_WAIT_S)  # what a GPU-bound step spends waiting for its kernels
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    clock, spans = Clock(), []
    steps, cbs = make_callbacks(tool, clock, spans, sim)
    data = DataLoader(TensorDataset(torch.randn(steps_n * 64, 256)), batch_size=64)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("peers")
    if tool == "mlflow":
        mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
    tracker = None
    with mlflow.start_run(log_system_metrics=tool == "mlflow") as run:
        if tool.startswith("codecarbon"):
            tracker = codecarbon_tracker()
        if tool == "codecarbon_tasks":
            cbs[-2] = instrument(cbs[-2](tracker), clock)
        trainer = pl.Trainer(max_steps=steps_n, accelerator="cpu", callbacks=cbs, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                             logger=MLFlowLogger(run_id=run.info.run_id, tracking_uri=uri), log_every_n_steps=50)
        zeus = None
        cpu0, main0, kids0 = time.process_time(), time.thread_time(), os.times()
        t_fit0 = time.perf_counter()
        if tool == "zeus_fit":
            from zeus.monitor import ZeusMonitor

            zeus = clock.wrap(ZeusMonitor, step=False)(gpu_indices=[0, 1], cpu_indices=[])
            clock.wrap(zeus.begin_window, step=False)("fit", sync_execution=False)
        if tracker is not None:
            clock.wrap(tracker.start, step=False)()
        t_in0 = time.perf_counter()
        trainer.fit(MLP(), data)
        t_in1 = time.perf_counter()
        if zeus is not None:
            clock.wrap(zeus.end_window, step=False)("fit", sync_execution=False)
        if tracker is not None:
            clock.wrap(tracker.stop, step=False)()
        t_fit1 = time.perf_counter()
        cpu1, main1 = time.process_time(), time.thread_time()
        for cb in cbs:  # wattlog's delivery and chart processes end after fit() (wattlog-finish): count them
            session = getattr(cb, "_session", None)
            if session is not None:
                session.wait_finished()
        kids1 = os.times()
    n = max(steps.n, 1)
    fit_s = t_in1 - t_in0
    if tool in ("zeus_fit", "codecarbon_fit", "codecarbon_tasks", "mlflow"):
        covered = 1.0  # started before trainer.fit() and stopped after it
    else:
        covered = sum(max(0.0, min(b or t_in1, t_in1) - max(a, t_in0)) for a, b in spans) / fit_s if spans else 0.0
    r0, r1 = steps.reach
    reach_s = (r1 - r0) if r0 is not None and r1 is not None else fit_s
    if tool in ("zeus_fit", "codecarbon_fit", "codecarbon_tasks", "mlflow"):
        covered_reach = 1.0
    else:
        covered_reach = sum(max(0.0, min(b or r1, r1) - max(a, r0)) for a, b in spans) / reach_s if spans else 0.0
    gaps_ms = {}  # where the unmeasured part of fit() lies, in ms
    if spans and r0 is not None and r1 is not None:
        gaps_ms = {"before_setup": r0 - t_in0, "setup_to_start": max(0.0, spans[0][0] - r0),
                   "end_to_teardown": max(0.0, r1 - (spans[-1][1] or r1)), "after_teardown": t_in1 - r1}
        gaps_ms = {k: 1e3 * v for k, v in gaps_ms.items()}
    empty = steps.empty_clock.per_step_s
    kids_cpu = (kids1.children_user + kids1.children_system) - (kids0.children_user + kids0.children_system)
    return {
        "tool": tool, "steps": steps.n,
        "steps_per_s": (steps.n - 1) / (steps.last - steps.first) if steps.n > 1 else 0.0,
        "fit_s": fit_s, "total_s": t_fit1 - t_fit0,
        "hook_step_us": 1e6 * clock.step_s / n, "fixed_s": clock.fixed_s,
        "hook_step_median_us": 1e6 * median(clock.per_step_s) if clock.per_step_s else 0.0,
        "cpu_ms_per_step": 1e3 * (cpu1 - cpu0) / n, "main_cpu_ms_per_step": 1e3 * (main1 - main0) / n,
        "children_cpu_ms_per_step": 1e3 * kids_cpu / n, "coverage": covered,
        "coverage_of_callbacks": covered_reach, "callbacks_share_of_fit": reach_s / fit_s,
        "empty_hooks_step_median_us": 1e6 * median(empty) if empty else 0.0, "gaps_ms": gaps_ms,
    }


# ---------------------------------------------------------------- accuracy


def run_accuracy(tool: str, counter_ms: float, steps_n: int, step_s: float, mode: str, uri: str) -> dict:
    sim = simgpu.install(gpus=2, mode=mode, counter_s=counter_ms / 1e3, instant_s=0.02)
    bounds: list[float] = []
    est: list[float] = []
    meter = zeus = tracker = None
    if tool == "wattlog":
        from wattlog.meter import EnergyMeter
        from wattlog.sources.nvml import NvmlGpu

        meter = EnergyMeter([NvmlGpu(indices=[0, 1])], sample_interval_s=0.02)
        meter.start()
    elif tool == "zeus":
        from zeus.monitor import ZeusMonitor

        zeus = ZeusMonitor(gpu_indices=[0, 1], cpu_indices=[])
    elif tool == "codecarbon":
        tracker = codecarbon_tracker()
        tracker.start()
    elif tool == "mlflow":
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("peers-accuracy")
        mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
        run = mlflow.start_run(log_system_metrics=True)
        wall_offset = time.time() - time.perf_counter()
        time.sleep(1.5)  # its first sample
    time.sleep(0.3)
    t = time.perf_counter()
    for i in range(steps_n):
        bounds.append(t)
        sim.step(i)
        if meter is not None:
            meter.mark(i, t)
        elif zeus is not None:
            zeus.begin_window(f"s{i}", sync_execution=False)
        elif tracker is not None:
            tracker.start_task(f"s{i}")
        t_next = t + step_s
        time.sleep(max(0.0, t_next - time.perf_counter()))
        t = time.perf_counter()
        if zeus is not None:
            est.append(sum(zeus.end_window(f"s{i}", sync_execution=False).gpu_energy.values()))
        elif tracker is not None:
            est.append(tracker.stop_task(f"s{i}").gpu_energy * 3.6e6)
    bounds.append(t)
    if meter is not None:
        meter.mark("end", t)
        segments = meter.close()
        by_label = {s.label: s.total_j for s in segments}
        est = [by_label[i] for i in range(steps_n)]
    elif tracker is not None:
        tracker.stop()
    elif tool == "mlflow":
        time.sleep(1.2)
        import mlflow

        mlflow.end_run()
        client = mlflow.MlflowClient()
        series = [sorted((m.timestamp / 1e3 - wall_offset, m.value) for m in
                         client.get_metric_history(run.info.run_id, f"system/gpu_{g}_power_usage_watts"))
                  for g in (0, 1)]
        for a, b in zip(bounds, bounds[1:]):
            mid = (a + b) / 2  # the first sample logged after the step's middle covers it
            power = sum(next((v for ts, v in s if ts >= mid), s[-1][1] if s else 0.0) for s in series)
            est.append(power * (b - a))
    truth = [sim.energy_j(0, a, b) + sim.energy_j(1, a, b) for a, b in zip(bounds, bounds[1:])]
    skip = 8  # the first 0.2 s: every tool's warm-up
    errors = sorted(abs(e - tr) / tr for e, tr in zip(est[skip:], truth[skip:]))
    total_err = (sum(est[skip:]) - sum(truth[skip:])) / sum(truth[skip:])
    return {"tool": tool, "counter_ms": counter_ms, "mode": mode, "steps": len(errors),
            "median_err": errors[len(errors) // 2], "p95_err": errors[int(0.95 * len(errors))],
            "total_err": total_err}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["fit", "accuracy"])
    ap.add_argument("tool")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--counter-ms", type=float, default=20.0)
    ap.add_argument("--mode", default="square")
    ap.add_argument("--step-ms", type=float, default=25.0)
    ap.add_argument("--uri", required=True)
    ap.add_argument("--root", default=".")
    ap.add_argument("--sample-interval-s", type=float, default=0.02)
    args = ap.parse_args()
    os.environ.setdefault("WATTLOG_SPOOL_DIR", os.path.join(args.root, "spool"))
    os.environ["PEERS_URI"] = args.uri
    SAMPLE_S[0] = args.sample_interval_s
    if args.part == "fit":
        out = run_fit(args.tool, args.steps, args.uri, args.root)
    else:
        out = run_accuracy(args.tool, args.counter_ms, args.steps, args.step_ms / 1e3, args.mode, args.uri)
    print("RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)  # peers' atexit hooks (codecarbon, zeus) are not what is measured


if __name__ == "__main__":
    main()
