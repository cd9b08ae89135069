"""Parts 4 and 5 of the GPU validation: EnergyMonitor's overhead on a BERT-base fit, and CUDA-event step
boundaries against ``sync_cuda=True``.

Both fit a BERT-base masked LM from ``BertConfig()`` (random init, no download) in bf16-mixed, batch 32 x
128 tokens of random ids, with an ``MLFlowLogger`` on a local sqlite store. A ``Probe`` callback (in every
fit, with or without the monitor) times the steps after a warm-up between two ``cuda.synchronize()`` and
reads every thread's CPU time (psutil) over the same window.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import DRY, P, Result, Skip, has_cuda, install_nvml, log, quantile, quiet_warnings, rel, sub

HOOKS = ("on_train_batch_start", "on_train_batch_end")


def scratch(name: str) -> Path:
    root = Path(os.environ.get("WATTLOG_GPU_SCRATCH") or tempfile.mkdtemp(prefix="wattlog-gpu-"))
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_j(metrics: dict[str, float], key: str) -> float | None:
    """A joule metric, or its pre-rename ``*_kwh`` twin converted (the lead renames kwh -> j)."""
    if metrics.get(key) is not None:
        return float(metrics[key])
    legacy = key[:-2] + "_kwh" if key.endswith("_j") else None
    if legacy and metrics.get(legacy) is not None:
        return float(metrics[legacy]) * 3.6e6
    return None


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) per thread of this process; threads without a Python name are summed."""
    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for th in psutil.Process().threads():
        name = names.get(th.id, "(non-Python threads: torch, CUDA, ...)")
        out[name] = out.get(name, 0.0) + th.user_time + th.system_time
    return out


def children_cpu() -> dict[int, dict[str, Any]]:
    """This process's child processes (wattlog's delivery process, ...): command line and CPU seconds."""
    import psutil

    out: dict[int, dict[str, Any]] = {}
    for c in psutil.Process().children(recursive=True):
        try:
            out[c.pid] = {"cmd": " ".join(c.cmdline())[:200], "cpu_s": sum(c.cpu_times()[:2])}
        except psutil.Error:
            pass
    return out


class Env:
    """torch, Lightning, the model factory and the MLflow store of one part."""

    def __init__(self, name: str) -> None:
        quiet_warnings()
        self.sim = install_nvml()
        import lightning.pytorch as pl
        import torch
        from mlflow import MlflowClient

        quiet_warnings()
        self.pl, self.torch = pl, torch
        self.cuda = has_cuda()
        if not self.cuda:
            torch.set_num_threads(1)
        self.dir = scratch(name)
        self.uri = f"sqlite:///{self.dir / 'mlflow.db'}"
        t0 = time.perf_counter()
        self.client = MlflowClient(self.uri)
        self.client.search_experiments()  # creates and migrates the sqlite store: outside every fit
        self.mlflow_init_s = time.perf_counter() - t0
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.Probe = _probe_class(pl, self.sync, P["train_warmup_steps"])
        self.Module = _module_class(pl, torch)
        self.fits = 0

    def data(self, steps: int) -> Any:
        from torch.utils.data import DataLoader

        cfg = self.bert_config()
        ds = _Tokens(self.torch, steps * P["train_batch"], P["train_seq"], cfg.vocab_size)
        return DataLoader(ds, batch_size=P["train_batch"], shuffle=False, num_workers=0, pin_memory=self.cuda)

    def bert_config(self) -> Any:
        from transformers import BertConfig

        return BertConfig(**P["bert"])

    def fit(self, label: str, steps: int, monitor_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """One fit of ``steps`` steps; ``monitor_kwargs`` None: without EnergyMonitor."""
        from lightning.pytorch.loggers import MLFlowLogger

        self.fits += 1
        self.torch.manual_seed(0)
        module = self.Module(self.bert_config(), "cuda" if self.cuda else "cpu")
        probe = self.Probe()
        callbacks: list[Any] = [probe]
        monitor = None
        if monitor_kwargs is not None:
            from wattlog import EnergyMonitor

            monitor = _timed(EnergyMonitor(**monitor_kwargs))
            callbacks.append(monitor)  # after the probe: its on_train_end runs before the monitor stops
        logger = MLFlowLogger(
            experiment_name="gpu-validation", tracking_uri=self.uri, run_name=f"{self.fits:02d}-{label}"
        )
        root = self.dir / f"fit{self.fits:02d}"
        quiet_warnings()  # importing wattlog's sink (mlflow) puts Lightning's banner logger back to INFO
        trainer = self.pl.Trainer(
            accelerator="gpu" if self.cuda else "cpu",
            devices=1,
            precision="bf16-mixed",
            max_steps=steps,
            logger=logger,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            log_every_n_steps=50,
            default_root_dir=str(root),
        )
        t0 = time.perf_counter()
        trainer.fit(module, self.data(steps))
        wall = time.perf_counter() - t0
        out = probe.result()
        out.update(
            label=label,
            run_id=logger.run_id,
            steps=steps,
            fit_wall_s=round(wall, 3),
            overhead_s=round(wall - out["timed_s"], 3),
        )
        if monitor is not None:
            out["hook_us_per_step"] = round(1e6 * monitor.hook_s / max(1, monitor.hook_calls / len(HOOKS)), 2)
            cost = getattr(monitor, "mark_cost_us", None)  # not in every wattlog version
            out["mark_cost_us"] = round(cost, 2) if isinstance(cost, (int, float)) else None
            out["mlflow"] = self.run_facts(logger.run_id)
        log(
            f"fit {self.fits} {label}: {out['steps_per_s']:.2f} steps/s over {out['timed_steps']} steps "
            f"({out['timed_s']:.1f} s), wall {wall:.1f} s"
        )
        del trainer, module
        if self.cuda:
            self.torch.cuda.empty_cache()
        return out

    def run_facts(self, run_id: str) -> dict[str, Any]:
        run = self.client.get_run(run_id)
        m = run.data.metrics
        hist = self.client.get_metric_history(run_id, "energy/step_j")
        steps = sorted(int(h.step) for h in hist)
        warm = P["train_warmup_steps"]
        return {
            "step_j_points": len(steps),
            "first_step": steps[0] if steps else None,
            "step_j_after_warmup": _lumps([float(h.value) for h in hist if h.step > warm]),
            "last_step": steps[-1] if steps else None,
            "total_j": read_j(m, "energy/total_j"),
            "gpu_j": read_j(m, "energy/gpu_j"),
            "cpu_j": read_j(m, "energy/cpu_j"),
            "ram_j": read_j(m, "energy/ram_j"),
            "avg_power_w": m.get("energy/avg_power_w"),
            "j_per_sample": m.get("energy/j_per_sample"),
            "params": {k: v for k, v in run.data.params.items() if k.startswith("energy.")},
            "tags": {k: v for k, v in run.data.tags.items() if k.startswith("energy.")},
            "metric_keys": sorted(k for k in m if k.startswith("energy/")),
        }

    def step_j(self, run_id: str) -> dict[int, float]:
        return {int(h.step): float(h.value) for h in self.client.get_metric_history(run_id, "energy/step_j")}

    def calibrate(self, res: Result, fit_s: float, n_fits: int, min_fit_s: float) -> tuple[int, float]:
        """A short fit without the monitor (warms kernels up); returns steps per fit and the fit length,
        shortened if the part's deadline would not hold ``n_fits`` fits."""
        warm = P["train_warmup_steps"]
        c = self.fit("calibrate", warm + (20 if not DRY else 5), None)
        step_s = c["timed_s"] / max(1, c["timed_steps"])
        per_fit_overhead = c["overhead_s"] + warm * step_s + 2.0
        available = res.remaining_s() - 15.0
        planned = fit_s
        if math.isfinite(available) and n_fits * (fit_s + per_fit_overhead) > available:
            fit_s = max(min_fit_s, available / n_fits - per_fit_overhead)
        steps = warm + max(10, int(round(fit_s / step_s)))
        res["calibration"] = {
            "step_ms": round(step_s * 1e3, 3),
            "fit_overhead_s": round(per_fit_overhead, 2),
            "planned_fit_s": planned,
            "effective_fit_s": round(fit_s, 2),
            "steps_per_fit": steps,
            "mlflow_init_s": round(self.mlflow_init_s, 2),
        }
        res.save()
        log(f"calibration: {step_s * 1e3:.2f} ms/step -> {steps} steps per fit (~{fit_s:.1f} s)")
        return steps, step_s


class _Tokens:
    def __init__(self, torch: Any, n: int, seq: int, vocab: int, pool: int = 1024) -> None:
        g = torch.Generator().manual_seed(1234)
        self.pool = torch.randint(0, vocab, (pool, seq), generator=g)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.pool[i % len(self.pool)]


def _module_class(pl: Any, torch: Any) -> type:
    class MaskedLM(pl.LightningModule):
        def __init__(self, config: Any, device: str) -> None:
            super().__init__()
            from transformers import BertForMaskedLM

            with torch.device(device):
                self.model = BertForMaskedLM(config)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = self.model(input_ids=batch, labels=batch).loss
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    return MaskedLM


def _probe_class(pl: Any, sync: Any, warmup: int) -> type:
    class Probe(pl.Callback):
        """Times the steps after ``warmup`` (synchronised at both ends) and reads thread CPU over them."""

        def __init__(self) -> None:
            self.t0: float | None = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.t0 is None and trainer.global_step >= warmup:
                sync()
                self.step0 = trainer.global_step
                self.cpu0 = thread_cpu_s()
                self.kids0 = children_cpu()
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            sync()
            self.t1 = time.perf_counter()
            self.cpu1 = thread_cpu_s()
            self.step1 = trainer.global_step
            self.kids1 = children_cpu()

        def result(self) -> dict[str, Any]:
            dt = self.t1 - self.t0
            n = self.step1 - self.step0
            cpu = {k: round(100.0 * (v - self.cpu0.get(k, 0.0)) / dt, 2) for k, v in self.cpu1.items()}
            kids = [{"pid": pid, "cmd": c["cmd"],
                     "cpu_pct": round(100.0 * (c["cpu_s"] - self.kids0.get(pid, {}).get("cpu_s", 0.0)) / dt, 2),
                     "alive_at_start": pid in self.kids0} for pid, c in self.kids1.items()]
            return {
                "timed_steps": n,
                "timed_s": round(dt, 4),
                "steps_per_s": n / dt,
                "step_ms": round(1e3 * dt / max(1, n), 4),
                "thread_cpu_pct": cpu,
                "child_processes": kids,
            }

    return Probe


def _timed(monitor: Any) -> Any:
    """Wrap the monitor's per-step hooks to add up their wall time on the training thread."""
    monitor.hook_s = 0.0
    monitor.hook_calls = 0
    for name in HOOKS:
        fn = getattr(monitor, name)

        def wrapper(*a: Any, _fn: Any = fn, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                monitor.hook_s += time.perf_counter() - t0
                monitor.hook_calls += 1

        setattr(monitor, name, wrapper)
    return monitor


# ---------------------------------------------------------------------------------------------- part 4


def run_train(res: Result) -> None:
    env = Env("train")
    pairs = int(P["train_pairs"])
    res["plan"] = {
        "model": "BertForMaskedLM(BertConfig(" + (str(P["bert"]) if P["bert"] else "") + "))",
        "precision": "bf16-mixed",
        "batch": P["train_batch"],
        "seq": P["train_seq"],
        "pairs": pairs,
        "fit_s": P["train_fit_s"],
        "order": "ABBA: (off,on), (on,off), (off,on), ...",
        "monitor": "EnergyMonitor(gpus=[0], log_every_n_steps=1), cpu/ram auto",
        "target": "median throughput ratio with/without >= 0.995",
        "cuda": env.cuda,
    }
    steps, _ = env.calibrate(res, P["train_fit_s"], 2 * pairs, min_fit_s=4.0)
    mon = {"gpus": [0], "log_every_n_steps": 1, "spool_dir": str(env.dir / "spool")}
    res["fits"] = []
    ratios: list[float] = []
    fit_wall: list[float] = []
    for i in range(pairs):
        order = ("off", "on") if i % 2 == 0 else ("on", "off")
        need = 2 * (max(fit_wall) if fit_wall else 0.0) + 5.0
        if res.remaining_s() < need:
            res["stopped_early"] = (
                f"after {i} pair(s): {res.remaining_s():.0f} s left, a pair needs ~{need:.0f} s"
            )
            log(f"train: {res['stopped_early']}")
            break
        got: dict[str, dict[str, Any]] = {}
        for variant in order:
            r = env.fit(f"pair{i}-{variant}", steps, mon if variant == "on" else None)
            fit_wall.append(r["fit_wall_s"])
            got[variant] = r
            res["fits"].append(r)
            res.save()
        ratios.append(got["on"]["steps_per_s"] / got["off"]["steps_per_s"])
        _train_summary(res, ratios)
        res.save()


def _train_summary(res: Result, ratios: list[float]) -> None:
    on = [f for f in res["fits"] if f["label"].endswith("-on")]
    off = [f for f in res["fits"] if f["label"].endswith("-off")]
    threads: dict[str, list[float]] = {}
    for f in on:
        for name, pct in f["thread_cpu_pct"].items():
            if name.startswith("wattlog") or name == "MainThread":
                threads.setdefault(name, []).append(pct)
    ratio_median = quantile(ratios, 0.5)
    res["summary"] = {
        "pairs_done": len(ratios),
        "ratios": [round(x, 4) for x in ratios],
        "ratio_median": ratio_median,
        "ratio_of_medians": (
            quantile([f["steps_per_s"] for f in on], 0.5) / quantile([f["steps_per_s"] for f in off], 0.5)
        ),
        "ratio_pass": ratio_median >= 0.995,
        "step_ms_without": quantile([f["step_ms"] for f in off], 0.5),
        "step_ms_with": quantile([f["step_ms"] for f in on], 0.5),
        "hook_us_per_step": quantile([f["hook_us_per_step"] for f in on], 0.5),
        "mark_cost_us": quantile([f["mark_cost_us"] for f in on if f["mark_cost_us"] is not None], 0.5),
        "thread_cpu_pct": {k: round(quantile(v, 0.5), 2) for k, v in sorted(threads.items())},
        "child_processes": {c["cmd"]: c["cpu_pct"] for f in on[-1:] for c in f["child_processes"]},
        "step_j_points_vs_steps": [(f["mlflow"]["step_j_points"], f["steps"]) for f in on],
        "zero_step_fraction": [f["mlflow"]["step_j_after_warmup"].get("zero_fraction") for f in on],
        "degraded": sorted({f["mlflow"]["tags"].get("energy.degraded", "") for f in on} - {""}),
        "gpu_method": sorted({f["mlflow"]["params"].get("energy.gpu_method", "?") for f in on}),
    }


# ---------------------------------------------------------------------------------------------- part 5


def _lumps(values: list[float]) -> dict[str, Any]:
    """How lumpy per-step energies are: a counter that updates slower than a step gives 0 J steps."""
    if not values:
        return {"n": 0}
    mean = sum(values) / len(values)
    return {
        "n": len(values),
        "mean_j": mean,
        "zero_fraction": sum(1 for v in values if v <= 0) / len(values),
        "below_10pct_of_mean_fraction": sum(1 for v in values if v < 0.1 * mean) / len(values),
        "cv": (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 / mean if mean else math.nan,
    }


def _compare(a: dict[int, float], b: dict[int, float], skip_below: int) -> dict[str, Any]:
    """(b - a) / mean(a) per step, and per block of k consecutive steps, over the steps both have.

    Blocks show from which granularity per-step attribution agrees (the counter's update period sets it).
    """
    common = sorted(s for s in set(a) & set(b) if s > skip_below)
    if not common:
        return {"steps": 0}
    out: dict[str, Any] = {
        "steps": len(common),
        "a": _lumps([a[s] for s in common]),
        "b": _lumps([b[s] for s in common]),
        "sum_rel": rel(sum(b[s] for s in common), sum(a[s] for s in common)),
    }
    for k in (1, 10, 50):
        blocks = [common[i : i + k] for i in range(0, len(common) - k + 1, k)]
        if len(blocks) < 3:
            continue
        sa = [sum(a[s] for s in blk) for blk in blocks]
        sb = [sum(b[s] for s in blk) for blk in blocks]
        mean = sum(sa) / len(sa)
        if not mean:
            continue
        d = [(y - x) / mean for x, y in zip(sa, sb)]
        out[f"per_{k}_steps"] = {
            "blocks": len(blocks),
            "median_rel": quantile(d, 0.5),
            "median_abs_rel": quantile([abs(x) for x in d], 0.5),
            "p95_abs_rel": quantile([abs(x) for x in d], 0.95),
            "max_abs_rel": max(map(abs, d)),
        }
    return out


def event_wait_cpu(seconds: float = 2.0) -> dict[str, Any]:
    """CPU that a thread waiting on CUDA events burns: ``torch.cuda.Event()`` vs ``Event(blocking=True)``.

    The main thread queues bf16 matmuls and records an event after each (like a step boundary); a waiter
    thread calls ``event.synchronize()`` on each, as wattlog's ``wattlog-cuda-marks`` thread does. Reports the
    waiter's CPU time per wall second (100 % = one core spinning) and the main thread's matmul rate.
    """
    import queue

    import torch

    if not has_cuda():
        raise Skip("no CUDA (CUDA events need a CUDA GPU)" + (" [dry run]" if DRY else ""))
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    out: dict[str, Any] = {}
    for blocking in (False, True):
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        cpu: dict[str, float] = {}

        def waiter() -> None:
            t0 = time.thread_time()
            while (ev := q.get()) is not None:
                ev.synchronize()
            cpu["s"] = time.thread_time() - t0

        th = threading.Thread(target=waiter, name="event-waiter")
        th.start()
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            for _ in range(4):
                a @ a
            ev = torch.cuda.Event(blocking=blocking)
            ev.record()
            q.put(ev)
            n += 1
            if q.qsize() > 64:  # keep the host at most ~64 boundaries ahead, as a training loop would be
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        q.put(None)
        th.join()
        out[f"blocking={blocking}"] = {"waiter_cpu_pct": round(100 * cpu["s"] / wall, 1),
                                       "boundaries_per_s": round(n / wall, 1)}
    return out


def run_boundaries(res: Result) -> None:
    env = Env("boundaries")
    res["plan"] = {
        "fits": ["events", "sync_cuda", "events_again"],
        "fit_s": P["boundaries_fit_s"],
        "monitor": "EnergyMonitor(gpus=[0], cpu='none', ram='none', log_every_n_steps=1[, sync_cuda=True])",
        "compared": "energy/step_j (GPU only) of the same step numbers; same seed, data and steps",
        "cuda": env.cuda,
    }
    if not env.cuda:
        res["note_boundaries"] = (
            "no CUDA: both variants mark on the host (sync_cuda is a no-op on CPU), so this "
            "exercises the code and the analysis only"
        )
    steps, _ = env.calibrate(res, P["boundaries_fit_s"], 3, min_fit_s=3.0)
    base = {
        "gpus": [0],
        "cpu": "none",
        "ram": "none",
        "log_every_n_steps": 1,
        "spool_dir": str(env.dir / "spool"),
    }
    fits: dict[str, dict[str, Any]] = {}
    series: dict[str, dict[int, float]] = {}
    for label, extra in (("events", {}), ("sync_cuda", {"sync_cuda": True}), ("events_again", {})):
        r = env.fit(label, steps, {**base, **extra})
        series[label] = env.step_j(r["run_id"])
        r["step_j_sum"] = sum(series[label].values())
        fits[label] = r
        res["fits"] = fits
        res.save()
    if res.remaining_s() > 15:
        sub(res, "event_wait_cpu", event_wait_cpu)
    warm = P["train_warmup_steps"]
    res["sync_vs_events"] = _compare(series["events"], series["sync_cuda"], warm)
    res["events_vs_events_again"] = _compare(series["events"], series["events_again"], warm)
    res["sync_vs_events_again"] = _compare(series["events_again"], series["sync_cuda"], warm)
    sv = res["sync_vs_events"].get("per_1_steps", {})
    rp = res["events_vs_events_again"].get("per_1_steps", {})
    ev_rate = (fits["events"]["steps_per_s"] + fits["events_again"]["steps_per_s"]) / 2
    res["summary"] = {
        "median_abs_rel": sv.get("median_abs_rel"),
        "p95_abs_rel": sv.get("p95_abs_rel"),
        "median_rel": sv.get("median_rel"),
        "repeat_median_abs_rel": rp.get("median_abs_rel"),
        "repeat_p95_abs_rel": rp.get("p95_abs_rel"),
        "per_10_steps_p95_abs_rel": res["sync_vs_events"].get("per_10_steps", {}).get("p95_abs_rel"),
        "per_50_steps_p95_abs_rel": res["sync_vs_events"].get("per_50_steps", {}).get("p95_abs_rel"),
        "zero_step_fraction": {
            k: round(_lumps([v for s_, v in series[k].items() if s_ > warm]).get("zero_fraction", math.nan), 3)
            for k in series
        },
        "sync_throughput_ratio": fits["sync_cuda"]["steps_per_s"] / ev_rate,
        "gpu_j": {k: v["mlflow"]["gpu_j"] for k, v in fits.items()},
        "degraded": sorted({v["mlflow"]["tags"].get("energy.degraded", "") for v in fits.values()} - {""}),
        "event_wait_cpu": res.get("event_wait_cpu"),
    }
