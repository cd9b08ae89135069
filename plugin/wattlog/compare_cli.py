"""``wattlog compare``: the command (arguments, tracking-server probe, errors as one line, output formats)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from wattlog import render
from wattlog.compare import MODES, SORT_KEYS, add_payback, compare_runs, group_runs
from wattlog.compare_table import print_table, to_markdown, to_records
from wattlog.errors import ConfigError
from wattlog.redact import redact_uri

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

class CliError(Exception):
    """A user-facing error: printed without traceback, exit code 2."""


def resolve_tracking_uri(uri: str | None) -> str | None:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _redact_text(text: str, uri: str | None) -> str:
    from wattlog.redact import redact_text

    if uri:
        text = text.replace(uri, redact_uri(uri))
        parts = urlsplit(uri)
        if "@" in parts.netloc:
            text = text.replace(parts.netloc.rsplit("@", 1)[0] + "@", "")
    return redact_text(text)


def probe_tracking(uri: str | None, timeout_s: int = 5) -> None:
    """Fails fast (CliError) when the tracking store cannot be reached.

    For HTTP servers the probe runs with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=timeout_s`` (unless the user set them); the environment is
    restored afterwards. A ``sqlite:///`` URI must point at an existing file.
    """
    from mlflow import MlflowClient

    if uri and uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :].split("?", 1)[0]
        if path != ":memory:" and not os.path.exists(path):
            raise CliError(f"no MLflow database at {path} (tracking URI {redact_uri(uri)})")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "unreachable"; reported, exit 2
        reason = _redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, uri)
        raise CliError(
            f"cannot reach the MLflow tracking server at {redact_uri(uri or _default_uri())}: {reason}"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _default_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def run_cli(body: Callable[[], int], uri: str | None) -> int:
    """Runs a CLI body; ConfigError/CliError/MlflowException become ``error: ...`` and exit 2."""
    from mlflow.exceptions import MlflowException

    try:
        return body()
    except (ConfigError, CliError) as exc:
        print(f"error: {_redact_text(str(exc), uri)}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"error: MLflow: {_redact_text(exc.message, uri)}", file=sys.stderr)
        return 2


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``compare`` to an argparse subparsers object (sets ``func``)."""
    p = subparsers.add_parser(
        "compare",
        help="compare MLflow runs by energy, metric and Pareto front",
        description="One row per run (replicates grouped: mean±sd): energy, Δ vs a baseline, the metric, "
        "the Pareto front and a one-line verdict. Fits the terminal (or 100 columns when piped); "
        "--wide for every column, --format csv/json for machines (joules).",
    )
    p.add_argument(
        "-e",
        "--experiment",
        dest="experiments",
        action="append",
        required=True,
        metavar="EXPERIMENT",
        help="experiment name or id (repeatable)",
    )
    p.add_argument("--filter", default=None, help="MLflow search filter, e.g. \"params.quantize = 'int8'\"")
    p.add_argument("--metric", default=None, help="objective metric key, e.g. val_acc")
    p.add_argument(
        "--mode", choices=MODES, default="max", help="is a larger (max) or smaller (min) metric better"
    )
    p.add_argument(
        "--baseline",
        default="first",
        metavar="RUN|first|best|none",
        help="run (id or name) to compute deltas against (default: first, the earliest run with energy)",
    )
    p.add_argument(
        "--target", type=float, default=None, help="add the energy to first reach this metric value"
    )
    p.add_argument(
        "--sort", default="energy", help=f"one of {', '.join(SORT_KEYS)} or a column name (default: energy)"
    )
    p.add_argument(
        "--format",
        choices=("table", "csv", "json", "markdown"),
        default="table",
        help="table (human, auto units), csv/json (one row per run, SI units), markdown",
    )
    p.add_argument(
        "--wide", action="store_true", help="every column (per-domain energy, CO2e, J/sample, params)"
    )
    p.add_argument(
        "--unit",
        default="J",
        metavar="UNIT",
        help="energy unit: J or Wh (auto-scaled, default J) or a fixed one such as kWh or kJ",
    )
    p.add_argument(
        "--no-group",
        dest="group",
        action="store_false",
        help="one row per run even when runs share their params",
    )
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="write a metric-vs-energy scatter with the front"
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--params", default=None, help="comma list of params to show (default: those that differ)")
    p.add_argument(
        "--payback",
        action="store_true",
        help="add the payback column: inference samples until a variant's make energy (energy/make_j) is "
        "repaid by its J/test-sample saving vs the baseline",
    )
    p.set_defaults(func=cli_compare)


def sort_frame(df: pd.DataFrame, key: str, metric: str | None, mode: str) -> pd.DataFrame:
    """Sorts by a ``SORT_KEYS`` key or a column, ties by the best metric; missing values last.

    Works on a :func:`compare_runs` frame and on a :func:`group_runs` frame (group means); attrs kept.
    """
    attrs = dict(df.attrs)
    column = SORT_KEYS.get(key, key)
    ascending = True
    if column == "<metric>":
        if metric is None:
            raise CliError("--sort metric needs --metric")
        column, ascending = metric, mode == "min"
    if column not in df.columns:
        raise ConfigError("sort", key, [*SORT_KEYS, *[c for c in df.columns if c not in SORT_KEYS.values()]])
    if metric is not None and column != metric and metric in df.columns:  # ties: best metric first
        out = df.sort_values(
            [column, metric], ascending=[ascending, mode == "min"], na_position="last", kind="stable"
        )
    else:
        out = df.sort_values(column, ascending=ascending, na_position="last", kind="stable")
    out.attrs.update(attrs)
    return out


def cli_compare(args: argparse.Namespace) -> int:
    """``wattlog compare``: prints the table (or csv/json/markdown) and writes ``--plot``."""
    uri = resolve_tracking_uri(args.tracking_uri)

    def body() -> int:
        if args.target is not None and not args.metric:
            raise CliError("--target needs --metric")
        if args.plot and not args.metric:
            raise CliError("--plot needs --metric")
        baseline = None if str(args.baseline).lower() == "none" else args.baseline
        if baseline == "best" and not args.metric:
            raise CliError("--baseline best needs --metric")
        unit = getattr(args, "unit", "J")
        try:
            render.energy_unit(unit)
        except ValueError:
            raise ConfigError("unit", unit, ["J", "Wh", "kWh", "kJ", "MJ", "Wh", "mWh", "..."]) from None
        probe_tracking(uri)
        params = [p.strip() for p in args.params.split(",") if p.strip()] if args.params else None
        df = compare_runs(
            experiments=args.experiments,
            filter=args.filter,
            metric=args.metric,
            mode=args.mode,
            baseline=baseline,
            tracking_uri=uri,
            params=params,
            target=args.target,
        )
        if df.empty:
            print(f"no runs in {', '.join(args.experiments)} match", file=sys.stderr)
            return 0
        group = getattr(args, "group", True)
        groups = group_runs(df, args.metric, args.mode, group=group)
        if getattr(args, "payback", False):
            if baseline is None:
                raise CliError("--payback needs a baseline (--baseline first, or a run's name or id)")
            add_payback(groups)
        if args.format in ("csv", "json"):
            df = sort_frame(df, args.sort, args.metric, args.mode)
            by_group = groups.set_index("group")
            df["group_pareto"] = (
                [bool(by_group.loc[g, "pareto"]) for g in df["group"]] if group else df["pareto"]
            )
            if args.format == "csv":
                sys.stdout.write(df.to_csv(index=False))
            else:
                import json

                sys.stdout.write(json.dumps(to_records(df), indent=1) + "\n")
        else:
            groups = sort_frame(groups, args.sort, args.metric, args.mode)
            if args.format == "markdown":
                sys.stdout.write(to_markdown(groups, args.metric, unit=unit))
            else:
                n_groups = len(groups)
                title = f"{', '.join(args.experiments)}: {len(df)} runs" + (
                    f" in {n_groups} groups" if n_groups < len(df) else ""
                )
                print_table(groups, args.metric, title=title, wide=args.wide, unit=unit)
        if args.plot:
            from wattlog.plots import plot_pareto

            path = plot_pareto(groups, args.metric, args.mode, args.plot, unit=unit)
            print(f"wrote {path}", file=sys.stderr)
        return 0

    return run_cli(body, uri)
