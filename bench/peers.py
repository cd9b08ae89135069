"""wattlog side by side with Zeus, CodeCarbon and MLflow system metrics, on simulated GPUs under the real pynvml.

The ``control`` configuration is no tool plus the background work wattlog adds, without wattlog: a thread
waking every 20 ms to read the GPUs, and a child process at nice +10 that imports mlflow and opens the store
(the delivery process's start-up). Its throughput separates what any such background work costs on the
machine from wattlog's own.

Run (one command, about 25 minutes on a 2-core machine with the default 2 rounds; peers from the ``[bench]`` extra):

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/peers.py [--rounds 2] [--steps 250] [--acc-steps 200] [--short-steps 30]
                                    [--coverage-steps 2400] [--tools wattlog,control] [--sample-interval-s 0.02]
                                    [--out bench/results/peers.md]

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
3. **A short fit**, ``--short-steps`` steps (~1 s; 0 skips it), without a tool and with wattlog, interleaved
   once per round: what a stage shorter than the delivery process's start-up costs (fit() wall time and the
   training thread's time in wattlog's calls).
4. **A longer fit**, the same fit with ``--coverage-steps`` steps (~1 min with the default 2400; 0 skips it),
   wattlog at per-step logging and no tool, interleaved once per round: throughput where the fixed costs
   (the delivery process's start-up) are spread thinner, the share of ``trainer.fit()`` measured, and where
   the rest lies.
   Parts 1 and 4 split the unmeasured time of ``fit()`` into Lightning's own (before the first callback's
   ``setup``, after the last one's ``teardown``) and the tool's (from that ``setup`` to its first reading, from
   its final reading to that ``teardown``).

A peer that is not installed is skipped with a message. Writes a markdown table to ``--out`` and the raw results
next to it (``.jsonl``). ``--readme README.md`` then copies the overhead and per-step error tables, whole, into
that file's performance section (``--readme-only``: copy from an existing ``--out`` without running anything).
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
    ("control", "control: no tool, a 20 ms thread and a niced child importing mlflow", None),
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
    ap.add_argument("--short-steps", type=int, default=30)
    ap.add_argument("--coverage-steps", type=int, default=2400)
    ap.add_argument("--tools", help="comma-separated fit configurations to run (default: all installed), e.g. "
                    "wattlog,wattlog_every1: shorter rounds, less drift between a tool and its no-tool run")
    ap.add_argument("--readme", help="copy the overhead and error tables into this markdown file")
    ap.add_argument("--readme-only", action="store_true", help="only copy them, from an existing --out")
    ap.add_argument("--sample-interval-s", type=float, default=0.02,
                    help="wattlog's sample_interval_s in the fits (its default: 0.02)")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    if args.readme_only:
        if not args.readme:
            ap.error("--readme-only needs --readme PATH")
        copy_tables(args.out, args.readme)
        return
    skipped = sorted({need for _, _, need in FIT + ACC if need and not available(need)})
    for name in skipped:
        print(f"{name} is not installed (pip install -e '.[bench]'): its columns are skipped", flush=True)
    fit_cfgs = [c for c in FIT if available(c[2])]
    if args.tools:
        wanted = args.tools.split(",")
        unknown = sorted(set(wanted) - {c[0] for c in FIT})
        if unknown:
            ap.error(f"--tools: unknown {', '.join(unknown)} (known: {', '.join(c[0] for c in FIT)})")
        fit_cfgs = [c for c in fit_cfgs if c[0] in wanted]
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
        common = ["--uri", uri, "--root", tmp, "--sample-interval-s", str(args.sample_interval_s)]
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
        if args.short_steps > 0:
            run_paired("short", "wattlog", args.short_steps, args, common, env, rows,
                       lambda o: f"fit {o['fit_s']:.2f} s, fixed {o['fixed_s']:.3f} s")
        if args.coverage_steps > 0:
            run_paired("coverage", "wattlog_every1", args.coverage_steps, args, common, env, rows,
                       lambda o: f"fit {o['fit_s']:.1f} s, {o['steps_per_s']:.2f} steps/s, {o['coverage']:.4f} of "
                                 f"fit(), {o['coverage_of_callbacks']:.4f} of the callbacks' span")
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
    if args.readme:
        copy_tables(args.out, args.readme)


def run_paired(part: str, tool: str, steps: int, args, common: list[str], env: dict[str, str], rows: list[dict],
               describe) -> None:
    """``tool`` and no tool on a ``steps``-step fit once per round, alternating which runs first; rows get ``part``."""
    for r in range(args.rounds):
        for name in (("none", tool) if r % 2 == 0 else (tool, "none")):
            out = child(["fit", name, "--steps", str(steps), *common], env)
            if out is not None:
                out.update(part=part, round=r)
                rows.append(out)
                print(f"{part} round {r} {name:14s} " + describe(out), flush=True)


TABLE_HEADS = ("| figure | wattlog | wattlog, log every step", "| energy counter period |")
"""The first row of each table copied into the README: the overhead table, the per-step error table."""


def _tables(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line index of every block of consecutive table lines."""
    out: list[tuple[int, int]] = []
    for i, line in enumerate(lines):
        if line.startswith("|"):
            out.append((out.pop()[0], i) if out and out[-1][1] == i - 1 else (i, i))
    return out


def copy_tables(results_md: str, readme: str) -> None:
    """Replace the first of ``readme``'s tables that starts like each of TABLE_HEADS with the results' first."""
    src = open(results_md, encoding="utf-8").read().splitlines()
    dst = open(readme, encoding="utf-8").read().splitlines()
    for head in TABLE_HEADS:
        found = [t for t in _tables(src) if src[t[0]].startswith(head)]
        into = [t for t in _tables(dst) if dst[t[0]].startswith(head)]
        if not found or not into:
            raise SystemExit(f"no table starting {head!r} in {results_md if not found else readme}")
        (a, b), (c, d) = found[0], into[0]
        dst = dst[:c] + src[a:b + 1] + dst[d + 1:]
    with open(readme, "w", encoding="utf-8") as f:
        f.write("\n".join(dst) + "\n")
    print(f"copied {len(TABLE_HEADS)} tables from {results_md} into {readme}")


GAPS = [("before_setup", "Lightning, fit() entry to the first callback's setup"),
        ("setup_to_start", "the tool, that setup to its first reading"),
        ("end_to_teardown", "the tool, its final reading to the last callback's teardown"),
        ("after_teardown", "Lightning, that teardown to fit()'s return (MLFlowLogger.finalize)")]


def gap_table(title: str, rows: list[dict], cfgs: list[tuple[str, str]], shares: bool = False,
              first: list[str] | None = None) -> list[str]:
    """Rows of ``gaps_ms`` (median [min, max] per tool), after the ``first`` rows; tools measured over the
    whole fit have none."""
    cfgs = [(c, t) for c, t in cfgs if any(r["tool"] == c and r.get("gaps_ms") for r in rows)]
    if not cfgs:
        return []

    def cells(fn, fmt) -> str:
        return " | ".join(spread([fn(r) for r in rows if r["tool"] == c and r.get("gaps_ms")], fmt) for c, _ in cfgs)

    out = [title, "", "| figure | " + " | ".join(t for _, t in cfgs) + " |", "|" + "---|" * (len(cfgs) + 1)]
    out += first or []
    if shares:
        out.append("| share of trainer.fit() wall time measured | " + cells(lambda r: r["coverage"], "{:.4f}") + " |")
        out.append("| share of the callbacks' span measured | "
                   + cells(lambda r: r["coverage_of_callbacks"], "{:.4f}") + " |")
        out.append("| the callbacks' span, share of fit() | " + cells(lambda r: r["callbacks_share_of_fit"], "{:.4f}")
                   + " |")
    for key, label in GAPS:
        out.append(f"| {label}, ms | " + cells(lambda r, k=key: r["gaps_ms"][k], "{:.1f}") + " |")
    return out + [""]


def write(args, rows, fit_cfgs, acc_cfgs, skipped, started) -> None:
    fits = [r for r in rows if r["part"] == "fit"]
    base = {r["round"]: r for r in fits if r["tool"] == "none"}

    def col(tool: str, fn) -> list[float]:
        return [fn(r, base[r["round"]]) for r in fits if r["tool"] == tool and r["round"] in base]

    lines = [f"# wattlog vs peers ({started}; `bench/peers.py --rounds {args.rounds} --steps {args.steps} "
             f"--acc-steps {args.acc_steps} --short-steps {args.short_steps} --coverage-steps "
             f"{args.coverage_steps}{' --tools ' + args.tools if args.tools else ''}"
             f"{' --skip-accuracy' if args.skip_accuracy else ''}"
             f"{f' --sample-interval-s {args.sample_interval_s:g}' if args.sample_interval_s != 0.02 else ''}`)", ""]
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
        lines += gap_table(f"## Where the unmeasured part of the {args.steps}-step fit() lies, ms", fits,
                           [(c, t) for c, t, _ in fit_cfgs])
    shorts = [r for r in rows if r["part"] == "short"]
    if shorts:
        short_base = {r["round"]: r for r in shorts if r["tool"] == "none"}
        paired = [(r, short_base[r["round"]]) for r in shorts if r["tool"] == "wattlog" and r["round"] in short_base]
        lines += [f"## A short fit: {args.short_steps} steps (no tool: fit() "
                  f"{spread([b['fit_s'] for _, b in paired], '{:.2f}')} s)", "",
                  "| figure | wattlog |", "|---|---|",
                  f"| fit() wall time, s | {spread([r['fit_s'] for r, _ in paired], '{:.2f}')} |",
                  f"| fit() wall time, extra over no tool, s | {spread([r['fit_s'] - b['fit_s'] for r, b in paired], '{:+.3f}')} |",
                  f"| fixed cost on the training thread, s | {spread([r['fixed_s'] for r, _ in paired])} |",
                  f"| share of trainer.fit() wall time measured | {spread([r['coverage'] for r, _ in paired])} |", ""]
    covs = [r for r in rows if r["part"] == "coverage"]
    if covs:
        cov_base = {r["round"]: r for r in covs if r["tool"] == "none"}
        cov_tool = [r for r in covs if r["tool"] != "none"]
        ratios = [r["steps_per_s"] / cov_base[r["round"]]["steps_per_s"] for r in cov_tool if r["round"] in cov_base]
        lines += gap_table(f"## A longer fit: {args.coverage_steps} steps, wattlog at per-step logging against no tool, "
                           f"paired per round (fit() {spread([r['fit_s'] for r in cov_tool], '{:.1f}')} s)", cov_tool,
                           [(cov_tool[0]["tool"], "wattlog, log every step")] if cov_tool else [], shares=True,
                           first=[f"| throughput vs no tool | {spread(ratios)} |"] if ratios else [])
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
