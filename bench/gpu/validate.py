"""The GPU validation of issue 16, one part per process (validate.sh runs each under its own timeout).

    python bench/gpu/validate.py plan                      # the parts, their planned times, the budget
    python bench/gpu/validate.py run PART --out FILE [--deadline-s S]
    python bench/gpu/validate.py mark PART FILE MESSAGE    # after a timeout/crash: status error, keep numbers
    python bench/gpu/validate.py summary RESULTS_DIR       # every item against its target

Parts: devices (1), periods (2), integrate (3), train (4), boundaries (5), zeus (6), inference (7).
``WATTLOG_GPU_DRYRUN=1``: simulated NVML, CPU, tiny durations (see common.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BUDGET_S, DRY, INSTALL_RESERVE_S, ORDER, PARTS, P, now_utc, part  # noqa: E402


def _runner(name: str) -> Any:
    if name in ("devices", "periods", "integrate"):
        import nvml_parts as m

        return {"devices": m.run_devices, "periods": m.run_periods, "integrate": m.run_integrate}[name]
    if name in ("train", "boundaries"):
        import train_parts as m

        return {"train": m.run_train, "boundaries": m.run_boundaries}[name]
    if name == "zeus":
        import zeus_part

        return zeus_part.run_zeus
    if name == "inference":
        import inference_part

        return inference_part.run_inference
    raise SystemExit(f"unknown part {name!r}; parts: {', '.join(ORDER)}")


def cmd_plan(args: argparse.Namespace) -> int:
    if args.shell:  # for validate.sh: "name file planned cap" per line
        for name in ORDER:
            p = PARTS[name]
            print(name, p["file"], p["planned_s"], p["cap_s"])
        return 0
    total = INSTALL_RESERVE_S + sum(p["planned_s"] for p in PARTS.values())
    mode = "DRY RUN (simulated NVML, CPU, tiny durations)" if DRY else "H200"
    print(
        f"GPU validation plan ({mode}); budget {BUDGET_S} s, planned {total} s "
        f"(install {INSTALL_RESERVE_S} s + parts):"
    )
    pp, tp = P["periods_idle_s"], P["train_pairs"]
    detail = {
        "devices": "wattlog devices --json, raw NVML facts, CUDA->NVML mapping, Hydra energy group",
        "periods": f"poll counter/instant/avg every {P['poll_period_s'] * 1e3:g} ms: {pp:g} s idle + "
        f"{P['periods_load_s']:g} s matmul load",
        "integrate": f"{len(P['integrate_levels'])} windows of {P['integrate_window_s']:g} s: "
        f"{', '.join(P['integrate_levels'])}",
        "train": f"BERT-base bf16 batch {P['train_batch']}x{P['train_seq']}: {tp}+{tp} interleaved fits of "
        f"~{P['train_fit_s']:g} s without/with EnergyMonitor(log_every_n_steps=1) (60 s cut to fit 8 minutes)",
        "boundaries": f"3 fits of ~{P['boundaries_fit_s']:g} s: CUDA events, sync_cuda=True, CUDA events again",
        "zeus": f"ZeusMonitor window vs wattlog meter over one {P['zeus_span_s']:g} s training span",
        "inference": f"MiniLM-shaped BERT, batch {P['infer_batch']}x{P['infer_seq']}, ~{P['infer_variant_s']:g} s "
        "each: fp32, fp16, bf16, int8_weight_only (torchao)",
    }
    for name in ORDER:
        p = PARTS[name]
        print(
            f"  {p['item']}. {name:<10} planned {p['planned_s']:>3} s, timeout <= {p['cap_s']:>3} s -> "
            f"{p['file']}: {detail[name]}"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    fn = _runner(args.part)
    with part(args.part, args.out, args.deadline_s) as res:
        fn(res)
    return 0


def cmd_mark(args: argparse.Namespace) -> int:
    """After the shell saw a part fail (timeout, crash): mark its file, keeping whatever it measured."""
    path = Path(args.file)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"part": args.part, "item": PARTS[args.part]["item"], "dry_run": DRY}
    if data.get("status") in (None, "running", "ok") or args.force:
        data["status"] = "skipped" if args.message.startswith("skipped") else "error"
        data["error"] = args.message if not data.get("error") else f"{data['error']}; {args.message}"
        data["marked_utc"] = now_utc()
        path.write_text(json.dumps(data, indent=1) + "\n")
    return 0


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else format(x, spec)
    return str(x)


def _summary_lines(name: str, s: dict[str, Any]) -> list[str]:
    """One part's summary, a few lines against its targets."""
    f, g = s.get, _fmt
    pct = lambda v: g(v, "+.3%")  # noqa: E731
    apct = lambda v: g(v, ".3%")  # noqa: E731
    out: list[str] = []
    if name == "devices":
        out.append(f"gpu {f('gpu')}, driver {f('driver')}, power limit {g(f('power_limit_w'))} W, "
                   f"methods {f('methods')}")
    elif name == "periods":
        for ph in ("idle", "load"):
            q = s.get(ph) or {}
            out.append(f"{ph}: counter updates every {g(q.get('counter_update_ms_median'))} ms (min step "
                       f"{g(q.get('counter_min_increment_mj'))} mJ), instant field every "
                       f"{g(q.get('instant_update_ms_median'))} ms (driver ts {g(q.get('instant_driver_ts_ms_median'))}"
                       f" ms), 1-s avg every {g(q.get('power_usage_update_ms_median'))} ms; polled every "
                       f"{g(q.get('poll_period_ms_median'))} ms")
    elif name == "integrate":
        for lvl, q in s.items():
            verdict = "PASS" if q.get("pass") else "FAIL" if "pass" in q else q.get("error")
            out.append(f"{lvl:<14} {g(q.get('mean_power_counter_w'))} W: instant vs counter "
                       f"{pct(q.get('rel_diff_trapz'))} (20 ms cadence {pct(q.get('rel_diff_every_20ms'))}), "
                       f"target <= 2 %: {verdict}")
    elif name == "train":
        out.append(f"throughput ratio with/without median {g(f('ratio_median'), '.4f')} (pairs {f('ratios')}), "
                   f"target >= 0.995: {f('ratio_pass')}")
        out.append(f"step {g(f('step_ms_without'), '.2f')} ms; training-thread hooks "
                   f"{g(f('hook_us_per_step'), '.1f')} us/step, mark() {g(f('mark_cost_us'), '.1f')} us")
        out += [f"thread {t}: {g(c, '.1f')} % of a core" for t, c in (f("thread_cpu_pct") or {}).items()]
        for cmd, c in (f("child_processes") or {}).items():
            out.append(f"child process {cmd[:90]}: {g(c, '.1f')} % of a core")
    elif name == "boundaries":
        out.append(f"step_j sync_cuda vs events: median |diff| {apct(f('median_abs_rel'))}, p95 "
                   f"{apct(f('p95_abs_rel'))}, bias {pct(f('median_rel'))}; events vs events again: median "
                   f"{apct(f('repeat_median_abs_rel'))}, p95 {apct(f('repeat_p95_abs_rel'))}")
        out.append(f"per 10 steps p95 |diff| {apct(f('per_10_steps_p95_abs_rel'))}, per 50 steps "
                   f"{apct(f('per_50_steps_p95_abs_rel'))}; sync throughput x{g(f('sync_throughput_ratio'), '.4f')}; "
                   f"steps with 0 J: {f('zero_step_fraction')}")
        out.append(f"CPU of a thread waiting on CUDA events: {f('event_wait_cpu')}")
    elif name == "zeus":
        out.append(f"wattlog {g(f('wattlog_j'), '.1f')} J vs Zeus {g(f('zeus_j'), '.1f')} J over "
                   f"{g(f('span_s'), '.2f')} s: {pct(f('rel_diff'))}, target <= 1 %: {f('pass')}")
    elif name == "inference":
        for v, q in s.items():
            out.append(f"{v:<18} {g(q.get('j_per_sample'), '.4g')} J/sample, {g(q.get('samples_per_s'), '.0f')} "
                       f"samples/s, {g(q.get('avg_power_w'), '.0f')} W {q.get('error') or ''}")
    return out


def cmd_summary(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    print(f"== GPU validation summary ({'DRY RUN' if DRY else 'real GPU'}), {now_utc()}")
    if DRY:
        print(
            "   DRY RUN: simulated NVML on a CPU; every number below exercises the code, none measures hardware"
        )
    for name in ORDER:
        p = PARTS[name]
        path = root / p["file"]
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"{p['item']}. {name}: NO RESULT ({exc})")
            continue
        status, error = r.get("status"), r.get("error")
        head = f"{p['item']}. {name} [{error if status == 'skipped' and error else status}"
        head += f": {error}]" if error and status != "skipped" else "]"
        print(head)
        s = r.get("summary") or {}
        for line in _summary_lines(name, s):
            print("   " + line)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    p = sp.add_parser("plan")
    p.add_argument("--shell", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sp.add_parser("run")
    p.add_argument("part", choices=ORDER)
    p.add_argument("--out", required=True)
    p.add_argument("--deadline-s", type=float, default=None)
    p.set_defaults(func=cmd_run)
    p = sp.add_parser("mark")
    p.add_argument("part", choices=ORDER)
    p.add_argument("file")
    p.add_argument("message")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_mark)
    p = sp.add_parser("summary")
    p.add_argument("dir")
    p.set_defaults(func=cmd_summary)
    args = ap.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
