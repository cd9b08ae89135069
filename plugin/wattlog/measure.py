"""`wattlog measure`: a framework-free measurement of a short CPU workload, printed as a table.

It shows the meter working on any machine: idle, then a busy phase, each a segment.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from typing import Any

from wattlog.errors import WattlogError
from wattlog.units import j_to_kwh


def _busy(seconds: float) -> int:
    end = time.perf_counter() + seconds
    data, n = b"wattlog", 0
    while time.perf_counter() < end:
        data = hashlib.sha256(data).digest()
        n += 1
    return n


def measure_workload(seconds: float = 2.0, **select_kwargs: Any) -> list[dict[str, Any]]:
    """Measure an idle phase and a busy phase of ``seconds`` each; one row per phase and domain.

    Raises:
        ConfigError: ``seconds`` is not a finite number > 0, or a bad source choice.
        SourceUnavailable: a source that was asked for explicitly cannot measure here.
    """
    import math

    from wattlog.errors import ConfigError
    from wattlog.meter import EnergyMeter
    from wattlog.sources import select_sources

    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise ConfigError("seconds", seconds, "a finite number of seconds > 0")
    choices = select_sources(**select_kwargs)
    meter = EnergyMeter([c.source for c in choices if c.source is not None])
    meter.start()
    try:
        meter.mark("idle")
        time.sleep(seconds)
        meter.mark("busy (sha256 loop, 1 thread)")
        _busy(seconds)
        meter.mark("end")
    finally:
        segments = meter.close()
    kinds = {d.name: d for d in meter.domains}
    rows = []
    for seg in segments:
        if seg.label not in ("idle", "busy (sha256 loop, 1 thread)"):
            continue
        for name, joules in seg.energy_j.items():
            d = kinds[name]
            rows.append({
                "phase": seg.label, "domain": name, "method": d.method,
                "label": "estimated" if d.estimated else "measured",
                "duration_s": seg.duration_s, "energy_j": joules,
                "power_w": joules / seg.duration_s if seg.duration_s else 0.0,
                "energy_kwh": j_to_kwh(joules),
            })
    return rows


def run(args: argparse.Namespace) -> int:
    try:
        rows = measure_workload(args.seconds, gpus=args.gpus, cpu=args.cpu, ram=args.ram)
    except WattlogError as exc:
        print(f"wattlog measure: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'phase':<30} {'domain':<8} {'method':<9} {'label':<10} {'time_s':>7} {'energy_j':>10} {'power_w':>8} {'kwh':>11}")
    for r in rows:
        print(f"{r['phase']:<30} {r['domain']:<8} {r['method']:<9} {r['label']:<10} {r['duration_s']:>7.2f} "
              f"{r['energy_j']:>10.2f} {r['power_w']:>8.2f} {r['energy_kwh']:>11.3e}")
    if any(r["label"] == "estimated" for r in rows):
        print("estimated: CPU = TDP x utilisation, RAM = 0.3725 W/GB in use; no hardware sensor was read.")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``measure`` subcommand."""
    p = subparsers.add_parser("measure", help="measure an idle and a busy CPU phase (framework-free demo)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each phase, > 0 and <= 3600 (default 2)")
    p.add_argument("--gpus", default="auto", help="auto | none | CUDA device indices such as 0,1 (default auto)")
    p.add_argument("--cpu", default="auto", help="auto | rapl | estimate | none")
    p.add_argument("--ram", default="auto", help="auto | rapl | estimate | none")
    p.set_defaults(func=run)
