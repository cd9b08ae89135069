"""The `wattlog` command: devices | compare | report | sync | measure."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered (each module imports lazily)."""
    from wattlog import __version__, compare, devices, measure, report
    from wattlog.sinks import mlflow as mlflow_sink

    parser = argparse.ArgumentParser(prog="wattlog", description="Energy of ML training, logged into MLflow.")
    parser.add_argument("--version", action="version", version=f"wattlog {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    devices.register_cli(sub)
    measure.register_cli(sub)
    compare.register_cli(sub)
    report.register_cli(sub)
    mlflow_sink.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
