"""`wattlog devices`: what this machine can measure, how, and why not."""

from __future__ import annotations

import argparse
import json
from typing import Any

from wattlog.errors import WattlogError


def describe_devices(**select_kwargs: Any) -> list[dict[str, Any]]:
    """One row per kind (gpu, cpu, ram): method, measured or estimated, domains and the reason.

    Opens and closes each candidate source once; nothing is left running.
    """
    from wattlog.sources import select_sources

    rows = []
    for choice in select_sources(**select_kwargs):
        row: dict[str, Any] = {
            "kind": choice.kind,
            "method": choice.method,
            "label": "none" if choice.method == "none" else ("estimated" if choice.estimated else "measured"),
            "reason": choice.reason,
            "domains": [],
            "provenance": {},
        }
        if choice.source is not None:
            try:
                row["domains"] = [d.name for d in choice.source.start()]
                row["provenance"] = choice.source.provenance()
            finally:
                choice.source.close()
        rows.append(row)
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    headers = ("kind", "method", "label", "domains", "why")
    table = [(r["kind"], r["method"], r["label"], ",".join(r["domains"]) or "-", r["reason"]) for r in rows]
    widths = [max(len(h), *(len(str(t[i])) for t in table)) for i, h in enumerate(headers[:-1])]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)) + "  " + headers[-1])
    for t in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(t, widths)) + "  " + t[-1])
    for r in rows:
        for key, value in r["provenance"].items():
            print(f"  {r['kind']}.{key} = {value}")


def run(args: argparse.Namespace) -> int:
    try:
        rows = describe_devices(gpus=args.gpus, cpu=args.cpu, ram=args.ram)
    except WattlogError as exc:
        print(f"wattlog devices: {exc}", file=__import__("sys").stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``devices`` subcommand."""
    p = subparsers.add_parser("devices", help="show what this machine can measure and how")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--gpus", default="auto", help="auto | none (default auto)")
    p.add_argument("--cpu", default="auto", help="auto | rapl | estimate | none")
    p.add_argument("--ram", default="auto", help="auto | rapl | estimate | none")
    p.set_defaults(func=run)
