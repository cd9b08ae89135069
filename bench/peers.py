"""wattlog side by side with Zeus, CodeCarbon and MLflow system metrics, on simulated GPUs under the real pynvml.

Run (one command, about 9 minutes on a 2-core machine with the default 2 rounds; peers from the ``[bench]`` extra):

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/peers.py [--rounds 2] [--steps 250] [--acc-steps 200] [--out bench/results/peers.md]

Every measurement runs in a fresh process (bench/peers_child.py), with two simulated H100s behind the real
``pynvml`` (bench/simgpu.py replaces only ``pynvml.nvmlLib``; a stub ``nvidia-smi`` on PATH lets CodeCarbon
see them), so every peer runs unmodified. Two parts:

1. **Overhead**, the same tiny Lightning fit (``--steps`` steps of ~25 ms: a small CPU MLP plus a 20 ms wait,
   like a GPU-bound step; MLFlowLogger on one sqlite store; the trainer's log_every_n_steps=50) without any
   tool and with each tool, interleaved: ``--rounds`` rounds, each round every configuration once, in an order
   rotated per round; ratios are paired within a round. Spreads are [min, max] over rounds.
2. **Per-step accuracy**, ``--acc-steps`` steps of 25 ms (no Lightning) under square-wave power (100 W <->
   400 W, 1 s period, GPU 1 at 0.8x), with energy counters updating every 1, 20 and 100 ms and an instant-power
   field every 20 ms: each tool's per-step GPU energy against the simulator's exact integral (the first 8 steps
   are everyone's warm-up and left out).

A peer that is not installed is skipped with a message. Writes a markdown table to ``--out`` and the raw results
next to it (``.jsonl``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CHILD = os.path.join(HERE, "peers_child.py")

FIT = [  # (config, column title, needs)
    ("wattlog", "wattlog", None),
    ("wattlog_every1", "wattlog, log every step", None),
    ("zeus_step", "Zeus 0.16, window per step", "zeus"),
    ("zeus_fit", "Zeus, window over the fit", "zeus"),
    ("codecarbon_fit", "CodeCarbon, tracker over the fit", "codecarbon"),
    ("codecarbon_tasks", "CodeCarbon, task per step", "codecarbon"),
    ("mlflow", "MLflow system metrics (1 s)", None),
]
ACC = [("wattlog", "wattlog", None), ("zeus", "Zeus (window per step)", "zeus"),
       ("codecarbon", "CodeCarbon (task per step)", "codecarbon"), ("mlflow", "MLflow system metrics", None)]
COUNTERS_MS = (1.0, 20.0, 100.0)


def available(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


def child(args: list[str], env: dict[str, str], timeout_s: float = 600) -> dict | None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, CHILD, *args], env=env, capture_output=True, text=True, timeout=timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["process_s"] = time.perf_counter() - t0
            return out
    print(f"  failed: {' '.join(args[:2])}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}", flush=True)
    return None


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--acc-steps", type=int, default=200)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "peers.md"))
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    skipped = sorted({need for _, _, need in FIT + ACC if need and not available(need)})
    for name in skipped:
        print(f"{name} is not installed (pip install -e '.[bench]'): its columns are skipped", flush=True)
    fit_cfgs = [c for c in FIT if available(c[2])]
    acc_cfgs = [c for c in ACC if available(c[2])]
    started = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="wattlog-peers-") as tmp:
        fakebin = os.path.join(tmp, "bin")
        os.makedirs(fakebin)
        with open(os.path.join(fakebin, "nvidia-smi"), "w") as f:
            f.write("#!/bin/sh\nexit 0\n")  # CodeCarbon looks for nvidia-smi before it uses pynvml
        os.chmod(os.path.join(fakebin, "nvidia-smi"), 0o755)
        env = dict(os.environ, PATH=fakebin + os.pathsep + os.environ.get("PATH", ""), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.path.join(REPO, "plugin") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        uri = f"sqlite:///{tmp}/peers.db"
        common = ["--uri", uri, "--root", tmp]
        if not args.skip_fit:
            print("warm-up (store schema, imports)", flush=True)
            child(["fit", "none", "--steps", "20", *common], env)
            configs = [("none", "no tool", None), *fit_cfgs]
            for r in range(args.rounds):
                order = configs[r % len(configs):] + configs[:r % len(configs)]
                for name, _, _ in order:
                    out = child(["fit", name, "--steps", str(args.steps), *common], env)
                    if out is not None:
                        out.update(part="fit", round=r)
                        rows.append(out)
                        print(f"round {r} {name:17s} {out['steps_per_s']:6.1f} steps/s, hooks "
                              f"{out['hook_step_us']:6.1f} us/step, fixed {out['fixed_s']:.3f} s, "
                              f"coverage {out['coverage']:.3f}", flush=True)
        if not args.skip_accuracy:
            for counter in COUNTERS_MS:
                for name, _, _ in acc_cfgs:
                    if name == "mlflow" and counter != COUNTERS_MS[-1]:
                        continue  # MLflow reads the 1-s average power, never the counter: once is enough
                    out = child(["accuracy", name, "--counter-ms", str(counter), "--steps", str(args.acc_steps),
                                 *common], env)
                    if out is not None:
                        out["part"] = "accuracy"
                        rows.append(out)
                        print(f"accuracy {name:10s} counter {counter:5.0f} ms: median {100 * out['median_err']:.1f} %"
                              f", p95 {100 * out['p95_err']:.1f} %", flush=True)
    write(args, rows, fit_cfgs, acc_cfgs, skipped, started)


def write(args, rows, fit_cfgs, acc_cfgs, skipped, started) -> None:
    fits = [r for r in rows if r["part"] == "fit"]
    base = {r["round"]: r for r in fits if r["tool"] == "none"}

    def col(tool: str, fn) -> list[float]:
        return [fn(r, base[r["round"]]) for r in fits if r["tool"] == tool and r["round"] in base]

    lines = [f"# wattlog vs peers ({started}; `bench/peers.py --rounds {args.rounds} --steps {args.steps} "
             f"--acc-steps {args.acc_steps}`)", ""]
    lines += ["Simulated GPUs under the real pynvml (bench/simgpu.py), each measurement in a fresh process, "
              "rounds interleaved; median [min, max] over rounds. Machine: "
              f"{os.cpu_count()} CPUs, shared with other jobs (timings are noisy; read ratios and orders of "
              "magnitude).", ""]
    if skipped:
        lines += [f"Skipped (not installed): {', '.join(skipped)}.", ""]
    if fits:
        none_rows = [r for r in fits if r["tool"] == "none"]
        lines += [f"## Overhead: {args.steps}-step Lightning fit, ~25 ms steps (no tool: "
                  f"{spread([r['steps_per_s'] for r in none_rows], '{:.1f}')} steps/s, main-thread CPU "
                  f"{spread([r['main_cpu_ms_per_step'] for r in none_rows], '{:.2f}')} ms/step)", ""]
        head = "| figure | " + " | ".join(t for _, t, _ in fit_cfgs) + " |"
        lines += [head, "|" + "---|" * (len(fit_cfgs) + 1)]
        figures = [
            ("throughput vs no tool", lambda r, b: r["steps_per_s"] / b["steps_per_s"], "{:.3f}"),
            ("training-thread time in the tool's per-step calls, us/step (median step)",
             lambda r, b: r.get("hook_step_median_us", r["hook_step_us"]), "{:.0f}"),
            ("training-thread time in the tool's per-step calls, us/step (mean)", lambda r, b: r["hook_step_us"], "{:.0f}"),
            ("  the timer's own floor: two empty hooks timed the same way, us/step (median step)",
             lambda r, b: r.get("empty_hooks_step_median_us", 0.0), "{:.0f}"),
            ("extra process CPU per step, ms", lambda r, b: r["cpu_ms_per_step"] - b["cpu_ms_per_step"], "{:+.2f}"),
            ("  of which main thread, ms", lambda r, b: r["main_cpu_ms_per_step"] - b["main_cpu_ms_per_step"],
             "{:+.2f}"),
            ("CPU of child processes per step, ms", lambda r, b: r["children_cpu_ms_per_step"], "{:.2f}"),
            ("fixed cost per fit on the training thread, s", lambda r, b: r["fixed_s"], "{:.3f}"),
            ("share of trainer.fit() wall time measured", lambda r, b: r["coverage"], "{:.3f}"),
            ("share of the callbacks' span (first setup to last teardown) measured",
             lambda r, b: r.get("coverage_of_callbacks", r["coverage"]), "{:.3f}"),
        ]
        for title, fn, fmt in figures:
            lines.append(f"| {title} | " + " | ".join(spread(col(c, fn), fmt) for c, _, _ in fit_cfgs) + " |")
        lines.append("")
    accs = [r for r in rows if r["part"] == "accuracy"]
    if accs:
        lines += [f"## Per-step GPU energy error, square-wave power, 25 ms steps ({args.acc_steps} steps; "
                  "median / p95 of |error| per step; total error over the steps)", ""]
        lines += ["| energy counter period | " + " | ".join(t for _, t, _ in acc_cfgs) + " |",
                  "|" + "---|" * (len(acc_cfgs) + 1)]
        for counter in COUNTERS_MS:
            cells = []
            for name, _, _ in acc_cfgs:
                hit = [r for r in accs if r["tool"] == name and (r["counter_ms"] == counter or name == "mlflow")]
                cells.append(f"{100 * hit[0]['median_err']:.1f} / {100 * hit[0]['p95_err']:.0f} % "
                             f"(total {100 * hit[0]['total_err']:+.1f} %)" if hit else "—")
            lines.append(f"| {counter:g} ms | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Notes: training-thread time is wall time inside the tool's calls on the training thread (hooks, "
              "begin/end_window, start/stop_task); the fixed cost is the same outside the steps (set-up, end of "
              "fit, tracker start/stop). Coverage: the span the tool measures over trainer.fit()'s wall time "
              "(1 for tools started before fit and stopped after it); the callbacks' span is what any Lightning callback "
              f"can reach, from the first callback's setup to the last one's teardown (no tool: "
              f"{spread([r.get('callbacks_share_of_fit', 1.0) for r in fits if r['tool'] == 'none'])} of fit(); the rest is "
              "Lightning before setup and after teardown, with the MLFlowLogger's finalize). MLflow system metrics read "
              "nvmlDeviceGetPowerUsage (a 1-s average) every second, never the counter.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
