"""The `wattlog` command: devices | compare | report | sync | measure.

Every bad input (a number that is negative, NaN or infinite, an output path that is a directory or a
file where a folder is wanted, a malformed tracking URI, an unknown option) ends the command with
exit code 2 and one line ``wattlog <command>: error: <what is wrong>`` on stderr, before any work
starts. The checks live here (:func:`validate_args`), so each subcommand's module keeps its own logic.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

MAX_MEASURE_SECONDS = 3600.0


class CliInputError(ValueError):
    """A bad command-line value; the message names the option, the value and what is allowed."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: message``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        from wattlog.redact import redact_text

        self.exit(2, f"{self.prog}: error: {redact_text(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered (each module imports lazily)."""
    from wattlog import __version__, compare_cli, devices, measure, report
    from wattlog.sinks import mlflow as mlflow_sink

    parser = _Parser(prog="wattlog", description="Energy of ML training, logged into MLflow.")
    parser.add_argument("--version", action="version", version=f"wattlog {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    devices.register_cli(sub)
    measure.register_cli(sub)
    compare_cli.register_cli(sub)
    report.register_cli(sub)
    mlflow_sink.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``wattlog``; returns the exit code (0 ok, 1 partly done, 2 bad input or error)."""
    from wattlog.errors import WattlogError
    from wattlog.redact import redact_text

    parser = build_parser()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact read: noise
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prog = f"wattlog {args.command}"
    try:
        validate_args(args)
    except CliInputError as exc:
        print(f"{prog}: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (WattlogError, OSError) as exc:  # a subcommand that let one escape: still one line
        text = str(exc).strip().splitlines()
        print(f"{prog}: error: {redact_text(text[0] if text else type(exc).__name__)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------ checks


def validate_args(args: argparse.Namespace) -> None:
    """Check the parsed arguments of ``args.command`` before it runs; normalises a few in place
    (``--gpus 0,1`` becomes ``[0, 1]``).

    Raises:
        CliInputError: the first bad value, named as the user typed it.
    """
    check = _CHECKS.get(str(getattr(args, "command", "")))
    if check is not None:
        check(args)


def _devices(args: argparse.Namespace) -> None:
    _sources(args)


def _measure(args: argparse.Namespace) -> None:
    args.seconds = finite_number("--seconds", args.seconds, above=0.0, at_most=MAX_MEASURE_SECONDS)
    _sources(args)


def _compare(args: argparse.Namespace) -> None:
    for e in args.experiments or []:
        if not str(e).strip():
            raise CliInputError("-e/--experiment: an experiment name or id must not be empty")
    if args.target is not None:
        args.target = finite_number("--target", args.target)
    if args.plot is not None:
        output_file("--plot", args.plot)
    tracking_uri("--tracking-uri", args.tracking_uri)


def _report(args: argparse.Namespace) -> None:
    if args.out is not None:
        output_dir("--out", args.out)
    tracking_uri("--tracking-uri", args.tracking_uri)


def _sync(args: argparse.Namespace) -> None:
    for name, value in (("--spool", getattr(args, "spool", None)), ("SPOOL", getattr(args, "spool_arg", None))):
        if value is not None and not str(value).strip():
            raise CliInputError(f"{name}: must not be empty")
    tracking_uri("--tracking-uri", args.tracking_uri)


_CHECKS: dict[str, Callable[[argparse.Namespace], None]] = {
    "devices": _devices,
    "measure": _measure,
    "compare": _compare,
    "report": _report,
    "sync": _sync,
}


def _sources(args: argparse.Namespace) -> None:
    from wattlog.errors import ConfigError
    from wattlog.sources import validate_choices

    args.gpus = gpus_value(args.gpus)
    try:
        validate_choices(args.gpus, args.cpu, args.ram)
    except ConfigError as exc:
        raise CliInputError(f"--{exc}") from None


def gpus_value(text: Any) -> Any:
    """``--gpus``: ``auto``, ``none`` or comma-separated CUDA device indices (``0,1`` -> ``[0, 1]``).

    Raises:
        CliInputError: not one of those forms.
    """
    value = str(text).strip()
    if value in ("auto", "none"):
        return value
    parts = [p.strip() for p in value.split(",")]
    if not value or not all(re.fullmatch(r"\d{1,4}", p) for p in parts):
        raise CliInputError(f"--gpus={text!r} is not valid; allowed: auto, none, or CUDA device indices such as 0,1")
    ids = [int(p) for p in parts]
    if len(set(ids)) != len(ids):
        raise CliInputError(f"--gpus={text!r} is not valid: a device is listed twice")
    return ids


def finite_number(name: str, value: Any, *, above: float | None = None, at_most: float | None = None) -> float:
    """``value`` as a finite float, optionally ``> above`` and ``<= at_most``.

    Raises:
        CliInputError: NaN, infinite, out of range, or not a number.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CliInputError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise CliInputError(f"{name}={value!r} is not valid; allowed: a finite number")
    if above is not None and not number > above:
        limit = f" and at most {at_most:g}" if at_most is not None else ""
        raise CliInputError(f"{name}={value!r} is not valid; allowed: a number greater than {above:g}{limit}")
    if at_most is not None and number > at_most:
        raise CliInputError(f"{name}={value!r} is not valid; allowed: at most {at_most:g}")
    return number


def _first_existing_ancestor(path: Path) -> Path:
    p = path.absolute().parent
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def output_file(name: str, value: str) -> None:
    """An output file path: not an existing directory; no existing ancestor is a file.

    Raises:
        CliInputError: it cannot be written as a file.
    """
    if not str(value).strip() or "\0" in str(value):
        raise CliInputError(f"{name}={value!r} is not valid; allowed: a file name such as pareto.png")
    path = Path(value)
    if path.is_dir():
        raise CliInputError(f"{name}={value!r} is a directory; allowed: a file name such as {path / 'pareto.png'}")
    if os.path.lexists(path) and not path.is_file():
        raise CliInputError(f"{name}={value!r} exists and is not a regular file")
    parent = _first_existing_ancestor(path)
    if not parent.is_dir():
        raise CliInputError(f"{name}={value!r} is not valid: {parent} is a file, not a directory")


def output_dir(name: str, value: str) -> None:
    """An output folder: an existing directory or a path whose first existing ancestor is a directory.

    Raises:
        CliInputError: it exists as a file, or lies under one.
    """
    if not str(value).strip() or "\0" in str(value):
        raise CliInputError(f"{name}={value!r} is not valid; allowed: a folder")
    path = Path(value)
    if os.path.lexists(path) and not path.is_dir():
        raise CliInputError(f"{name}={value!r} is not valid: it exists and is not a directory; allowed: a folder")
    parent = _first_existing_ancestor(path)
    if not parent.is_dir():
        raise CliInputError(f"{name}={value!r} is not valid: {parent} is a file, not a directory")


_KNOWN_SCHEMES = {"http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                  "databricks-uc", "uc"}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9.\-]*)(\+[A-Za-z0-9_]+)?:")


def tracking_uri(name: str, value: str | None) -> None:
    """A tracking URI that MLflow can use: ``http(s)://host[:port]``, ``sqlite:///path``, a database URI
    (``postgresql+psycopg2://...``), ``file:`` or a plain path, ``databricks``, or a scheme an MLflow
    plugin registered. None (the default) is fine.

    Raises:
        CliInputError: empty, whitespace or control characters, a bad port, no host, ``sqlite:`` without
            ``///``, or an unknown scheme. The message shows the URI redacted.
    """
    from urllib.parse import urlsplit

    from wattlog.redact import redact_uri

    if value is None:
        return
    shown = redact_uri(value) or repr(value)
    if not value.strip():
        raise CliInputError(f"{name}: must not be empty")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise CliInputError(f"{name}={shown!r} is not a valid tracking URI: it contains spaces or control characters")
    m = _SCHEME_RE.match(value)
    if m is None or (len(m.group(1)) == 1 and os.name == "nt"):
        return  # a plain local path: a file store
    scheme = m.group(1).lower()
    if scheme in ("databricks", "databricks-uc", "uc"):
        return
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise CliInputError(f"{name}={shown!r} is not a valid tracking URI: {exc}") from None
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise CliInputError(f"{name}={shown!r} is not a valid tracking URI: no host (e.g. http://host:5000)")
        if port == 0:
            raise CliInputError(f"{name}={shown!r} is not a valid tracking URI: port 0")
        return
    if scheme == "sqlite":
        if not value.startswith("sqlite:///") or len(value.split("?", 1)[0]) <= len("sqlite:///"):
            raise CliInputError(f"{name}={shown!r} is not a valid tracking URI; allowed: sqlite:///relative/path.db "
                                "or sqlite:////absolute/path.db")
        return
    if scheme in ("postgresql", "mysql", "mssql"):
        if not parts.hostname and not parts.path.strip("/"):
            raise CliInputError(f"{name}={shown!r} is not a valid tracking URI: no host or database")
        return
    if scheme == "file":
        return
    if scheme not in _plugin_schemes():
        raise CliInputError(f"{name}={shown!r} is not a valid tracking URI: unknown scheme {scheme!r}; allowed: "
                            "http(s)://, sqlite:///, postgresql://, mysql://, file:, a path, databricks")


def _plugin_schemes() -> set[str]:
    """Schemes of tracking stores MLflow knows here (plugins included); empty if that cannot be told."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return {str(s).lower() for s in _tracking_store_registry._registry}
    except Exception:  # noqa: BLE001 - a private MLflow detail: when it moves, accept nothing unknown
        return set()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
