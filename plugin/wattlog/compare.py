"""Compare runs by energy: read runs back from MLflow into one table.

``compare_runs`` answers "which run got the metric for the least energy, and by how much?".
It reads each run's *latest* metric values, params and tags with paged
``MlflowClient.search_runs`` calls (no per-step histories), so it stays fast on thousands of
runs. ``energy_to_target`` is the one function that reads per-step histories.

Energy is read in joules (``energy/total_j``, ...); runs logged by wattlog < 0.2 with the old
``*_kwh`` keys are converted (:func:`wattlog.keys.read_j`). Human output (the table, Markdown,
the verdict) is formatted by :mod:`wattlog.render`; csv/json keep SI units.

Runs with the same params (seeds aside) are *replicates*: :func:`group_runs` folds them into one
row with mean ± standard deviation, and differences inside that run-to-run spread are said to
be so (never starred as a Pareto win, never called the best trade-off).

Module-level imports are cheap: pandas, mlflow and rich are imported inside functions. The human
table lives in :mod:`wattlog.compare_table` and the ``wattlog compare`` command in
:mod:`wattlog.compare_cli`; their names are re-exported here.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from wattlog.redact import redact_uri  # noqa: F401 - re-exported for callers of wattlog.compare
from wattlog import keys, payback, render
from wattlog.errors import ConfigError
from wattlog.pareto import pareto_mask, pareto_mask_noisy
from wattlog.units import J_PER_KWH

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow import MlflowClient

PAGE_SIZE = 5000
"""Runs per ``search_runs`` page (the MLflow server and sqlite store accept up to 50,000)."""

T_SHORT_RUN = getattr(keys, "T_SHORT_RUN", "energy.short_run")
"""Tag set on a run shorter than its energy method can resolve (its value says why)."""
T_ROLE = "wattlog.role"

ENERGY_COLUMNS: dict[str, str] = {
    "total_j": keys.TOTAL_J,
    "gpu_j": keys.kind_j("gpu"),
    "cpu_j": keys.kind_j("cpu"),
    "ram_j": keys.kind_j("ram"),
    "emissions_g": keys.EMISSIONS_G,
    "j_per_sample": keys.stage_j_per_sample("train"),
    "test_j_per_sample": keys.stage_j_per_sample("test"),
    "avg_power_w": keys.AVG_POWER_W,
    "make_j": keys.MAKE_J,
}
"""DataFrame column -> MLflow metric key (latest value; joule keys also read from legacy kWh keys)."""

NUMERIC_COLUMNS = ("duration_s", *ENERGY_COLUMNS)
BASE_COLUMNS = ["run_id", "run_name", "experiment", "status", "start_time", *NUMERIC_COLUMNS]
FLAG_COLUMNS = ["estimated", "short_run", "degraded", "gpu_measured", "missing_energy"]
MODES = ("max", "min")
SORT_KEYS: dict[str, str] = {
    "energy": "total_j",
    "kwh": "total_j",
    "emissions": "emissions_g",
    "power": "avg_power_w",
    "j_per_sample": "j_per_sample",
    "duration": "duration_s",
    "name": "run_name",
    "start": "start_time",
    "delta": "delta_j",
    "metric": "<metric>",
    "target": "j_to_target",
    "payback": "payback_samples",
}
"""``--sort`` keys -> columns; ``metric`` sorts best first, the others ascending (``kwh`` = ``energy``)."""

SEED_PARAM = re.compile(r"(?i)(^|[._/-])(seed|random_state|run_seed)$")
"""Params that tell replicates apart and are ignored when grouping (``seed``, ``data.seed``, ...)."""

_ESTIMATED_PARAMS = {"cpu": keys.P_CPU_METHOD, "ram": keys.P_RAM_METHOD, "gpu": keys.P_GPU_METHOD}
_NO = ("", "none", "false", "0", "no")


# --------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------


def compare_runs(
    experiments: str | Sequence[str] | None = None,
    runs: Sequence[str] | None = None,
    filter: str | None = None,  # the documented keyword (shadows the builtin)
    metric: str | None = None,
    mode: str = "max",
    baseline: str | None = None,
    tracking_uri: str | None = None,
    params: Sequence[str] | None = None,
    target: float | None = None,
) -> pd.DataFrame:
    """One row per run: energy, emissions, the objective metric, deltas and the Pareto flag.

    Reads each run's latest metrics (``energy/total_j``, ``energy/gpu_j``, ``energy/cpu_j``,
    ``energy/ram_j`` or their legacy ``*_kwh`` names, ``energy/emissions_g``,
    ``energy/j_per_sample``, ``energy/test_j_per_sample``, ``energy/avg_power_w``,
    ``energy/duration_s`` and ``metric``), the ``energy.*_method`` params and the
    ``energy.estimated``, ``energy.short_run`` and ``energy.degraded`` tags. Per-step histories
    are read only when ``target`` is given.

    Args:
        experiments: experiment name(s) or id(s). Required unless ``runs`` is given.
        runs: run ids to compare (any experiments); combined with ``experiments`` it restricts
            them to these runs.
        filter: an MLflow search filter, e.g. ``"params.quantize = 'int8'"``.
        metric: the objective metric key, e.g. ``val_acc``; enables the Pareto flag.
        mode: ``max`` when a larger metric is better, ``min`` when smaller is.
        baseline: ``None`` (no delta columns), a compared run's id or name, ``first`` (the
            earliest started run with energy) or ``best`` (best ``metric`` among runs with energy).
        tracking_uri: MLflow tracking URI; default: ``MLFLOW_TRACKING_URI`` / MLflow's default.
        params: param names to add as ``params.<name>`` columns; default: every param whose
            value differs between the runs (``energy.*`` params excluded) and does not follow
            from another one shown (``prune.name`` when ``prune`` is shown).
        target: with ``metric``, adds ``j_to_target`` (see :func:`energy_to_target`).

    Returns:
        A DataFrame ordered by start time with columns ``run_id``, ``run_name``,
        ``experiment``, ``status``, ``start_time`` (ISO 8601, UTC), ``duration_s`` (the
        measured ``energy/duration_s``, else the run's wall time), ``total_j``, ``gpu_j``,
        ``cpu_j``, ``ram_j`` (joules), ``emissions_g``, ``j_per_sample``,
        ``test_j_per_sample``, ``avg_power_w``, then ``<metric>`` and ``j_to_target`` when
        asked, ``delta_j``, ``delta_j_pct``, ``delta_<metric>`` with a baseline, then ``pareto``
        (bool, this run alone), ``estimated`` (comma list of estimated domain kinds, ``""`` when
        all measured), ``short_run`` (bool: tagged ``energy.short_run``), ``degraded`` (the
        ``energy.degraded`` tag or ``""``), ``gpu_measured`` (bool: ``energy.gpu_method`` is
        set and not ``none``, or a GPU energy was logged), ``missing_energy`` (bool: no total
        energy; such runs are never on the front), ``group`` (int: runs with the same params
        but seeds share it, see :func:`group_runs`), ``group_size`` and ``params.<name>``
        columns. Missing values are NaN. A logged NaN or +-inf (MLflow's SQL stores return
        +-inf as +-1.797e308) is read as NaN too, so such runs count as missing that value;
        ``df.attrs["non_finite"]`` lists them as ``"<run name>: <key>"``;
        ``df.attrs["implied_params"]`` maps each differing param left out to the shown param(s)
        it follows from.

    Raises:
        ConfigError: unknown experiment, run, metric or baseline; bad mode or filter.
        mlflow.exceptions.MlflowException: the tracking server failed.
    """
    import pandas as pd

    _check_mode(mode)
    if target is not None and metric is None:
        raise ConfigError("target", target, "a target needs a metric")
    client = _client(tracking_uri)
    found = _fetch_runs(client, experiments, runs, filter)
    exp_names = _experiment_names(client, {r.info.experiment_id for r in found})
    rows = [_row(r, metric, exp_names) for r in found]
    non_finite = [f"{row['run_name']}: {key}" for row in rows for key in row.pop("_non_finite")]

    columns = list(BASE_COLUMNS)
    if metric is not None:
        columns.append(metric)
    df = pd.DataFrame(rows, columns=[*columns, *FLAG_COLUMNS])
    if metric is not None and len(found) and not any(metric in r.data.metrics for r in found):
        raise ConfigError("metric", metric, _available_metrics(found))
    if target is not None:
        df["j_to_target"] = [
            math.nan if miss else energy_to_target(rid, metric, target, mode, client=client)
            for rid, miss in zip(df["run_id"], df["missing_energy"])
        ]
    base_ref = _add_deltas(df, baseline, metric, mode) if baseline is not None else None
    if metric is not None and len(df):
        energy = [math.nan if miss else e for e, miss in zip(df["total_j"], df["missing_energy"])]
        df["pareto"] = pareto_mask(list(df[metric]), energy, mode)
    else:
        df["pareto"] = False
    for col in ("pareto", "short_run", "gpu_measured", "missing_energy"):
        df[col] = df[col].astype(bool)
    ordered = [c for c in df.columns if c not in FLAG_COLUMNS]
    df = df[[*ordered, *FLAG_COLUMNS]]
    group_ids = _group_ids(found, [str(e) for e in df["experiment"]])
    df["group"] = group_ids
    df["group_size"] = [group_ids.count(g) for g in group_ids]
    param_df, implied = _param_columns(found, params)
    if param_df:
        df = pd.concat([df, pd.DataFrame(param_df, index=df.index)], axis=1)
    df.attrs.update(metric=metric, mode=mode, non_finite=non_finite, implied_params=implied)
    if base_ref is not None:
        df.attrs["baseline_run_id"], df.attrs["baseline_run_name"] = base_ref
    return df


def energy_to_target(
    run_id: str,
    metric: str,
    value: float,
    mode: str = "max",
    tracking_uri: str | None = None,
    *,
    client: MlflowClient | None = None,
) -> float:
    """Cumulative joules spent until ``metric`` first reached ``value`` (energy-to-accuracy).

    Reads two per-step histories: ``metric`` and ``energy/total_j`` (or, for runs logged by
    wattlog < 0.2, ``energy/total_kwh``, converted). The target step is the smallest step whose
    ``metric`` value is ``>= value`` (mode ``max``) or ``<= value`` (mode ``min``). The energy at
    that step is linearly interpolated between the two logged points around it (the last value
    wins when one step was logged twice); before the first logged point it is interpolated from
    (step 0, 0 J); after the last point it is the last (final) value.

    Args:
        run_id: the MLflow run.
        metric: the metric key, e.g. ``val_acc``.
        value: the target value.
        mode: ``max`` or ``min``.
        tracking_uri: MLflow tracking URI (ignored when ``client`` is given).
        client: an existing ``MlflowClient`` to reuse.

    Returns:
        Joules, or NaN when the target was never reached or the run has no energy history.

    Raises:
        ConfigError: bad mode.
    """
    _check_mode(mode)
    client = client or _client(tracking_uri)
    target_step = None
    for point in sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp)):
        reached = point.value >= value if mode == "max" else point.value <= value
        if reached and is_finite_metric(point.value):
            target_step = point.step
            break
    if target_step is None:
        return math.nan
    scale, history = 1.0, client.get_metric_history(run_id, keys.TOTAL_J)
    if not history:
        scale, history = J_PER_KWH, client.get_metric_history(run_id, keys.LEGACY_KWH[keys.TOTAL_J])
    by_step: dict[int, float] = {}
    for point in sorted(history, key=lambda m: m.timestamp):
        if is_finite_metric(point.value):
            by_step[point.step] = point.value * scale
    return interpolate_cumulative(sorted(by_step.items()), target_step)


def interpolate_cumulative(points: Sequence[tuple[float, float]], step: float) -> float:
    """A cumulative value at ``step`` from sorted ``(step, value)`` points, as documented above.

    Returns NaN when there are no points.
    """
    if not points:
        return math.nan
    first_step, first_value = points[0]
    if step <= first_step:
        if first_step <= 0:
            return first_value
        return first_value * max(step, 0) / first_step
    for (s0, e0), (s1, e1) in itertools.pairwise(points):
        if s0 <= step <= s1:
            return e0 if s1 == s0 else e0 + (e1 - e0) * (step - s0) / (s1 - s0)
    return points[-1][1]


interpolate_kwh = interpolate_cumulative
"""Deprecated name of :func:`interpolate_cumulative` (it never depended on the unit)."""


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError("mode", mode, MODES)


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _resolve_experiments(client: MlflowClient, experiments: str | Sequence[str]) -> list[str]:
    from mlflow.exceptions import MlflowException

    names = [experiments] if isinstance(experiments, str) else list(experiments)
    ids: list[str] = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None and str(name).isdigit():
            try:
                exp = client.get_experiment(str(name))
            except MlflowException:
                exp = None
        if exp is None or exp.lifecycle_stage == "deleted":
            raise ConfigError("experiment", name, _known_experiments(client))
        if exp.experiment_id not in ids:
            ids.append(exp.experiment_id)
    return ids


def _known_experiments(client: MlflowClient, limit: int = 20) -> str:
    page = client.search_experiments(max_results=limit + 1)
    names = [e.name for e in page]
    text = ", ".join(repr(n) for n in sorted(names[:limit]))
    if len(names) > limit:
        text += ", ..."
    return text or "(no experiments on this tracking server)"


def _fetch_runs(
    client: MlflowClient,
    experiments: str | Sequence[str] | None,
    runs: Sequence[str] | None,
    filter_string: str | None,
) -> list[Any]:
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    if not experiments and not runs:
        raise ConfigError("experiments", experiments, "one or more experiment names or ids, or runs=")
    exp_ids = _resolve_experiments(client, experiments) if experiments else []
    clauses = [filter_string.strip()] if filter_string and filter_string.strip() else []
    if runs:
        run_ids = list(dict.fromkeys(runs))
        for rid in run_ids:
            if not re.fullmatch(r"[0-9a-zA-Z_-]+", rid):
                raise ConfigError("runs", rid, "MLflow run ids")
        if not exp_ids:
            for rid in run_ids:
                try:
                    info = client.get_run(rid).info
                except MlflowException as exc:
                    if _is_not_found(exc):
                        raise ConfigError("runs", rid, "ids of existing runs") from None
                    raise
                if info.experiment_id not in exp_ids:
                    exp_ids.append(info.experiment_id)
        clauses.append("attributes.run_id IN (" + ", ".join(f"'{r}'" for r in run_ids) + ")")
    found: list[Any] = []
    token = None
    while True:
        try:
            page = client.search_runs(
                exp_ids,
                filter_string=" AND ".join(clauses),
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=PAGE_SIZE,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
        except MlflowException as exc:
            if filter_string and _is_bad_request(exc):
                raise ConfigError(
                    "filter",
                    filter_string,
                    f"an MLflow search filter, e.g. \"params.lr = '0.1'\" ({exc.message})",
                ) from None
            raise
        # a sweep's parent run (tag wattlog.role=sweep) summarises its children: not a row of its own
        found.extend(r for r in page if runs or r.data.tags.get("wattlog.role") != "sweep")
        token = page.token
        if not token:
            return found


def _is_not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _is_bad_request(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")


def _experiment_names(client: MlflowClient, ids: Iterable[str]) -> dict[str, str]:
    names = {}
    for exp_id in ids:
        names[exp_id] = client.get_experiment(exp_id).name
    return names


def _row(run: Any, metric: str | None, exp_names: dict[str, str]) -> dict[str, Any]:
    info, data = run.info, run.data
    metrics, params, tags = data.metrics, data.params, data.tags
    row: dict[str, Any] = {
        "run_id": info.run_id,
        "run_name": info.run_name or tags.get("mlflow.runName") or info.run_id[:8],
        "experiment": exp_names.get(info.experiment_id, info.experiment_id),
        "status": info.status,
        "start_time": _iso(info.start_time),
    }
    non_finite: list[str] = []

    def value(key: str) -> float:
        name = key
        if (
            metrics.get(key) is None
            and key in keys.LEGACY_KWH
            and metrics.get(keys.LEGACY_KWH[key]) is not None
        ):
            name = keys.LEGACY_KWH[key]
        got = metrics.get(name)
        if got is None:
            return math.nan
        if not is_finite_metric(got):
            non_finite.append(name)
            return math.nan
        read = keys.read_j({name: got}, key) if name != key else float(got)
        return math.nan if read is None else read

    duration_s = value(keys.DURATION_S)
    if math.isnan(duration_s) and info.start_time and info.end_time:
        duration_s = (info.end_time - info.start_time) / 1000.0
    row["duration_s"] = duration_s
    for column, key in ENERGY_COLUMNS.items():
        row[column] = value(key)
    if math.isnan(row["make_j"]) and any(keys.stage_j(s) in metrics for s in keys.MAKE_STAGES):
        row["make_j"] = payback.make_energy_j(metrics)
    if metric is not None:
        row[metric] = value(metric)
    row["estimated"] = estimated_domains(params, tags)
    row["short_run"] = str(tags.get(T_SHORT_RUN, "")).strip().lower() not in _NO
    row["degraded"] = str(tags.get(keys.T_DEGRADED, "") or "")
    gpu_method = params.get(keys.P_GPU_METHOD)
    row["gpu_measured"] = (
        str(gpu_method).lower() not in _NO if gpu_method is not None else bool(row["gpu_j"] > 0)
    )
    row["missing_energy"] = math.isnan(row["total_j"])
    row["_non_finite"] = non_finite
    return row


def is_finite_metric(value: float) -> bool:
    """False for NaN, +-inf and +-1.7976931348623157e308 (what MLflow's SQL stores return for +-inf)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and abs(number) < sys.float_info.max


def estimated_domains(params: dict[str, str], tags: dict[str, str]) -> str:
    """Comma list of estimated domain kinds: the ``energy.estimated`` tag, else the
    ``energy.{gpu,cpu,ram}_method`` params equal to ``estimate``; ``""`` when none."""
    tag = tags.get(keys.T_ESTIMATED)
    if tag is not None:
        kinds = [k.strip() for k in tag.split(",") if k.strip() and k.strip().lower() != "none"]
        return ",".join(kinds)
    return ",".join(kind for kind, key in _ESTIMATED_PARAMS.items() if params.get(key) == "estimate")


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc).isoformat(timespec="seconds")


def _available_metrics(found: Sequence[Any]) -> str:
    keys_ = sorted({k for r in found for k in r.data.metrics if not k.startswith(keys.PREFIX)})
    return ", ".join(keys_) if keys_ else "(the runs log no metrics besides energy/*)"


def _differing_params(found: Sequence[Any]) -> list[str]:
    names = sorted({k for r in found for k in r.data.params if not k.startswith("energy.")})
    return [n for n in names if len({r.data.params.get(n) for r in found}) > 1]


def _param_columns(
    found: Sequence[Any], names: Sequence[str] | None
) -> tuple[dict[str, list[Any]], dict[str, list[str]]]:
    """``params.<name>`` columns, and each differing param left out -> the shown params it follows from.

    By default every differing param is a candidate; candidates are taken shortest dotted path
    first (``prune`` before ``prune.name``), and one whose value across the runs is fully
    determined by those already taken says nothing new and is left out.
    """
    implied: dict[str, list[str]] = {}
    if names is None:
        candidates = sorted(_differing_params(found), key=lambda n: (n.count("."), len(n), n))
        chosen: list[str] = []
        for name in candidates:
            mapping: dict[tuple[Any, ...], Any] = {}
            determined = bool(chosen)
            for r in found:
                key = tuple(r.data.params.get(c) for c in chosen)
                val = r.data.params.get(name)
                if mapping.setdefault(key, val) != val:
                    determined = False
                    break
            if determined:
                # the fewest chosen params that already determine it, for the footnote
                implied[name] = _determining(found, chosen, name)
            else:
                chosen.append(name)
        order = sorted(_differing_params(found))
        names = [n for n in order if n in chosen]
    return {f"params.{n}": [r.data.params.get(n) for r in found] for n in names}, implied


def _determining(found: Sequence[Any], chosen: list[str], name: str) -> list[str]:
    for c in chosen:
        mapping: dict[Any, Any] = {}
        if all(
            mapping.setdefault(r.data.params.get(c), r.data.params.get(name)) == r.data.params.get(name)
            for r in found
        ):
            return [c]
    return list(chosen)


def _group_ids(found: Sequence[Any], experiments: Sequence[str]) -> list[int]:
    """Group number of each run: same experiment and the same value of every differing param
    except seed-like ones (:data:`SEED_PARAM`). Runs that log no params are never grouped."""
    differing = [n for n in _differing_params(found) if not SEED_PARAM.search(n)]
    ids: dict[tuple[Any, ...], int] = {}
    out = []
    for r, exp in zip(found, experiments):
        if not r.data.params:
            key: tuple[Any, ...] = ("run", r.info.run_id)
        else:
            key = (exp, *[r.data.params.get(n) for n in differing])
        out.append(ids.setdefault(key, len(ids)))
    return out


def _add_deltas(df: pd.DataFrame, baseline: str, metric: str | None, mode: str) -> tuple[str, str]:
    """Adds ``delta_j``, ``delta_j_pct`` and ``delta_<metric>``; returns the baseline's id and name."""
    with_energy = df[~df["missing_energy"]]
    if baseline == "first":
        if with_energy.empty:
            raise ConfigError("baseline", baseline, "needs at least one run with energy/total_j")
        base = with_energy.iloc[0]  # rows are ordered by start time
    elif baseline == "best":
        if metric is None:
            raise ConfigError("baseline", baseline, "'best' needs a metric")
        ranked = with_energy[with_energy[metric].notna()]
        if ranked.empty:
            raise ConfigError("baseline", baseline, f"needs a run with energy and {metric}")
        idx = ranked[metric].idxmax() if mode == "max" else ranked[metric].idxmin()
        base = ranked.loc[idx]
    else:
        match = df[(df["run_id"] == baseline) | (df["run_name"] == baseline)]
        if match.empty:
            raise ConfigError("baseline", baseline, "'first', 'best', or the id or name of a compared run")
        base = match.iloc[0]
        if base["missing_energy"]:
            raise ConfigError("baseline", baseline, "a run that logged energy/total_j")
    base_j = float(base["total_j"])
    df["delta_j"] = df["total_j"] - base_j
    df["delta_j_pct"] = 100.0 * df["delta_j"] / base_j if base_j else math.nan
    if metric is not None:
        df[f"delta_{metric}"] = df[metric] - base[metric]
    return str(base["run_id"]), str(base["run_name"])


# --------------------------------------------------------------------------------------------
# Groups of replicates, noise, the verdict
# --------------------------------------------------------------------------------------------

SPREAD_COLUMNS = ("duration_s", *ENERGY_COLUMNS)


def group_runs(
    df: pd.DataFrame, metric: str | None = None, mode: str | None = None, *, group: bool = True
) -> pd.DataFrame:
    """One row per group of replicate runs (``df["group"]``), with means, spreads, noise and the front.

    Columns: ``group``, ``n`` (runs), ``run_ids`` (comma list), ``run_name`` (the first run's
    name), ``experiment``, ``status`` (``FINISHED`` or e.g. ``1 FAILED/3``), ``start_time``
    (first), the mean of every numeric column of ``df`` (``total_j``, ``<metric>``, ...) and its
    sample standard deviation ``<col>_sd`` (NaN for one run), ``estimated`` (union),
    ``short_run``/``gpu_measured`` (any), ``degraded`` (joined), ``missing_energy`` (no run of
    the group has energy), ``params.*`` (the first run's), then:

    - ``energy_noise_j`` / ``metric_noise``: run-to-run standard deviation of the group, or,
      for a single run, the pooled spread of the groups that have replicates (energy as a
      relative spread, the metric as an absolute one); NaN when no group has replicates;
    - ``pareto``: on the noise-aware front (:func:`wattlog.pareto.pareto_mask_noisy`);
    - with a baseline in ``df.attrs``: ``is_baseline``, ``delta_j``, ``delta_j_pct``,
      ``delta_<metric>`` (group mean minus the baseline group's mean) and ``delta_j_in_noise``,
      ``delta_<metric>_in_noise`` (True when the difference is within the combined noise).

    Args:
        df: a :func:`compare_runs` frame (its ``group`` column and attrs).
        metric: the objective; default ``df.attrs["metric"]``.
        mode: ``max`` or ``min``; default ``df.attrs["mode"]``.
        group: False: every run is its own group (no replicates, noise unknown).

    Returns:
        The group frame, in order of each group's first run in ``df``; attrs copied from ``df``
        plus ``grouped=True`` and ``noise_known`` (some group has replicates).
    """
    import pandas as pd

    metric = metric if metric is not None else df.attrs.get("metric")
    mode = mode or df.attrs.get("mode", "max")
    gid = list(df["group"]) if group and "group" in df.columns else list(range(len(df)))
    order: list[Any] = list(dict.fromkeys(gid))
    numeric = [c for c in (*SPREAD_COLUMNS, metric, "j_to_target") if c and c in df.columns]
    params = [c for c in df.columns if c.startswith("params.")]
    base_id = df.attrs.get("baseline_run_id")
    out: list[dict[str, Any]] = []
    for g in order:
        part = df[[x == g for x in gid]]
        first = part.iloc[0]
        n = len(part)
        rec: dict[str, Any] = {
            "group": g,
            "n": n,
            "run_ids": ",".join(str(r) for r in part["run_id"]),
            "run_name": str(first["run_name"]),
            "experiment": first["experiment"],
            "status": _group_status(list(part["status"])),
            "start_time": first["start_time"],
        }
        for c in numeric:
            values = [float(v) for v in part[c] if render.is_number(v)]
            rec[c] = sum(values) / len(values) if values else math.nan
            rec[f"{c}_sd"] = _sd(values)
        kinds = sorted({k for e in part["estimated"] for k in str(e).split(",") if k})
        rec["estimated"] = ",".join(kinds)
        rec["short_run"] = bool(part["short_run"].any()) if "short_run" in part else False
        rec["degraded"] = "; ".join(dict.fromkeys(str(d) for d in part.get("degraded", []) if str(d)))
        rec["gpu_measured"] = bool(part["gpu_measured"].any()) if "gpu_measured" in part else True
        rec["missing_energy"] = bool(part["missing_energy"].all())
        rec["is_baseline"] = base_id is not None and base_id in set(part["run_id"])
        for c in params:
            values = list(dict.fromkeys(str(v) for v in part[c] if v is not None and str(v) != "nan"))
            joined = ",".join(values)
            rec[c] = (
                values[0] if len(values) == 1 else (joined if len(joined) <= 12 else f"{len(values)} values")
            )
        out.append(rec)
    groups = pd.DataFrame(out)
    groups.attrs.update(dict(df.attrs))
    groups.attrs["grouped"] = True
    if groups.empty:
        groups.attrs["noise_known"] = False
        return groups
    energy_cv = _pooled(
        [
            (r["n"], r["total_j_sd"] / r["total_j"])
            for r in out
            if r["n"] > 1 and render.is_number(r["total_j_sd"]) and r["total_j"]
        ]
    )
    groups["energy_noise_j"] = [
        r["total_j_sd"] if r["n"] > 1 and render.is_number(r["total_j_sd"]) else energy_cv * r["total_j"]
        for r in out
    ]
    if metric and metric in groups.columns:
        metric_sd = _pooled(
            [(r["n"], r[f"{metric}_sd"]) for r in out if r["n"] > 1 and render.is_number(r[f"{metric}_sd"])]
        )
        groups["metric_noise"] = [
            r[f"{metric}_sd"] if r["n"] > 1 and render.is_number(r[f"{metric}_sd"]) else metric_sd
            for r in out
        ]
        energy = [math.nan if r["missing_energy"] else r["total_j"] for r in out]
        groups["pareto"] = pareto_mask_noisy(
            list(groups[metric]), energy, mode, list(groups["metric_noise"]), list(groups["energy_noise_j"])
        )
    else:
        groups["metric_noise"] = math.nan
        groups["pareto"] = False
    groups["pareto"] = groups["pareto"].astype(bool)
    groups.attrs["noise_known"] = bool((groups["n"] > 1).any())
    if groups["is_baseline"].any():
        base = groups[groups["is_baseline"]].iloc[0]
        groups["delta_j"] = groups["total_j"] - base["total_j"]
        groups["delta_j_pct"] = 100.0 * groups["delta_j"] / base["total_j"] if base["total_j"] else math.nan
        groups["delta_j_in_noise"] = [
            _inside(d, a, base["energy_noise_j"]) for d, a in zip(groups["delta_j"], groups["energy_noise_j"])
        ]
        if metric and metric in groups.columns:
            groups[f"delta_{metric}"] = groups[metric] - base[metric]
            groups[f"delta_{metric}_in_noise"] = [
                _inside(d, a, base["metric_noise"])
                for d, a in zip(groups[f"delta_{metric}"], groups["metric_noise"])
            ]
    return groups


def _group_status(statuses: list[str]) -> str:
    bad = [s for s in statuses if s != "FINISHED"]
    if not bad:
        return "FINISHED"
    if len(statuses) == 1:
        return statuses[0]
    worst = max(set(bad), key=bad.count)
    return f"{len(bad)} {worst}/{len(statuses)}"


def _sd(values: list[float]) -> float:
    """Sample standard deviation; NaN for fewer than 2 values, 0 for float round-off only."""
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return 0.0 if sd <= 1e-9 * max(abs(mean), 1e-300) else sd


def _pooled(items: list[tuple[int, float]]) -> float:
    """Pooled standard deviation of groups ``(n, sd)``; NaN without any."""
    dof = sum(n - 1 for n, _ in items)
    if not dof:
        return math.nan
    return math.sqrt(sum((n - 1) * sd**2 for n, sd in items) / dof)


def _inside(delta: float, noise_a: float, noise_b: float) -> bool:
    """True when ``delta`` is within the combined noise of two values (unknown noise: False)."""
    if not render.is_number(delta):
        return False
    known = [float(x) for x in (noise_a, noise_b) if render.is_number(x)]
    if not known:
        return False
    noise = math.hypot(*known) if len(known) == 2 else known[0] * math.sqrt(2)
    return abs(float(delta)) <= noise


def add_payback(groups: pd.DataFrame) -> pd.DataFrame:
    """Adds ``payback_samples`` (:func:`wattlog.payback.payback_samples` of the group means against the
    baseline group's ``test_j_per_sample``; inf: never, NaN: the baseline or no J/sample),
    ``payback_samples_sd`` (propagated spread) and ``payback_in_noise`` (the J/sample saving is inside
    the run-to-run spread) to a :func:`group_runs` frame; ``make_j`` missing counts as 0.

    Raises:
        ConfigError: the frame has no baseline group.
    """
    if "is_baseline" not in groups.columns or not groups["is_baseline"].any():
        raise ConfigError("payback", True, "a baseline run (--baseline first, or a run's name or id)")
    base = groups[groups["is_baseline"]].iloc[0]
    base_j, base_sd = base.get("test_j_per_sample", math.nan), base.get("test_j_per_sample_sd", math.nan)
    values, spreads, noisy = [], [], []
    for _, r in groups.iterrows():
        j, sd = r.get("test_j_per_sample", math.nan), r.get("test_j_per_sample_sd", math.nan)
        make = float(r["make_j"]) if render.is_number(r.get("make_j")) else 0.0
        if bool(r["is_baseline"]) or not (render.is_number(j) and j > 0 and render.is_number(base_j) and base_j > 0):
            values.append(math.nan), spreads.append(math.nan), noisy.append(False)
            continue
        value = payback.payback_samples(make, float(j), float(base_j))
        saved_sd = math.hypot(*[float(x) for x in (sd, base_sd) if render.is_number(x)] or [math.nan])
        values.append(value)
        spreads.append(payback.payback_spread(value, make, r.get("make_j_sd", math.nan), base_j - j, saved_sd))
        noisy.append(payback.saving_in_spread(base_j - j, sd, base_sd))
    groups["payback_samples"], groups["payback_samples_sd"], groups["payback_in_noise"] = values, spreads, noisy
    return groups


@dataclass(frozen=True)
class Verdict:
    """The one-line conclusion under the table.

    Attributes:
        text: the line, e.g. ``best trade-off: int8: −62 % energy for −0.012 test_acc``.
        run_name: the run (group) it names, or None when it names none.
        group: its group number, or None.
    """

    text: str
    run_name: str | None
    group: Any = None


def verdict(
    groups: pd.DataFrame, metric: str | None = None, mode: str | None = None, unit: str = "J"
) -> Verdict:
    """The conclusion of a comparison of groups (:func:`group_runs`), in one line.

    With a metric: the *best trade-off* is the group on the noise-aware front that uses less
    energy than the reference beyond the run-to-run spread and maximises
    ``energy saved / reference energy - metric lost / metric range across groups``. The
    reference is the baseline group, else the group with the best metric. A run that does not
    save energy beyond the spread is never named. Without a metric: the group with the least
    energy. The line says when the spread is unknown (no replicates) or a metric difference is
    inside it.
    """
    metric = metric if metric is not None else groups.attrs.get("metric")
    mode = mode or groups.attrs.get("mode", "max")
    ok = groups[~groups["missing_energy"]] if len(groups) else groups
    if ok.empty:
        return Verdict("no run logged energy", None)
    if len(ok) == 1:
        return Verdict("one run (group) with energy: nothing to compare", None)
    noise_known = bool(groups.attrs.get("noise_known"))
    unknown = "" if noise_known else " (single runs)"
    has_metric = bool(metric) and metric in ok.columns and ok[metric].notna().any()
    if "is_baseline" in ok.columns and ok["is_baseline"].any():
        ref = ok[ok["is_baseline"]].iloc[0]
    elif has_metric:
        ranked = ok[ok[metric].notna()]
        ref = ranked.loc[ranked[metric].idxmax() if mode == "max" else ranked[metric].idxmin()]
    else:
        ref = ok.loc[ok["total_j"].idxmax()]
    ref_j = float(ref["total_j"])

    def saving(r: Any) -> tuple[float, bool]:
        d = float(r["total_j"]) - ref_j
        return (100.0 * d / ref_j if ref_j else math.nan), _inside(
            d, r["energy_noise_j"], ref["energy_noise_j"]
        )

    others = [r for _, r in ok.iterrows() if r["group"] != ref["group"]]
    if not has_metric:
        best = min(others + [ref], key=lambda r: float(r["total_j"]))
        if best["group"] == ref["group"]:
            text = f"least energy: {_label(ref)} ({render.format_energy(ref_j, unit)}), the baseline"
            return Verdict(text, str(ref["run_name"]), ref["group"])
        pct, inside = saving(best)
        if inside:
            return Verdict(
                f"no run differs from {ref['run_name']} in energy beyond the run-to-run spread", None
            )
        most = "" if bool(ref.get("is_baseline", False)) else " (most energy)"
        text = (
            f"least energy: {_label(best)}: {render.format_energy(best['total_j'], unit)}, "
            f"{render.format_percent(pct)} vs {ref['run_name']}{most}{unknown}"
        )
        return Verdict(text, str(best["run_name"]), best["group"])
    cheaper = [
        r
        for r in others
        if float(r["total_j"]) < ref_j and render.is_number(r[metric])
    ]
    real = [r for r in cheaper if not saving(r)[1]]
    pool = [ref, *real]  # the front among them
    mask = pareto_mask_noisy(
        [float(r[metric]) for r in pool],
        [float(r["total_j"]) for r in pool],
        mode,
        [r.get("metric_noise", math.nan) for r in pool],
        [r.get("energy_noise_j", math.nan) for r in pool],
    )
    cands = [r for r, on in zip(pool[1:], mask[1:]) if on]
    if not cands:
        if cheaper:
            return Verdict(f"no run saves energy vs {ref['run_name']} beyond the run-to-run spread", None)
        return Verdict(f"no run uses less energy than {ref['run_name']}{unknown}", None)
    values = [float(v) for v in ok[metric] if render.is_number(v)]
    span = (max(values) - min(values)) or 1.0
    sign = 1.0 if mode == "max" else -1.0

    def score(r: Any) -> float:
        return (ref_j - float(r["total_j"])) / ref_j - sign * (float(ref[metric]) - float(r[metric])) / span

    best = max(cands, key=score)
    pct, _ = saving(best)
    dm = float(best[metric]) - float(ref[metric])
    dm_noise = _inside(dm, best.get("metric_noise", math.nan), ref.get("metric_noise", math.nan))
    if dm == 0:
        trade = f"{render.format_percent(pct)} energy, same {metric}"
    elif sign * dm > 0:
        trade = f"{render.format_percent(pct)} energy and {render.format_signed(dm)} {metric}: better on both"
    else:
        trade = f"{render.format_percent(pct)} energy for {render.format_signed(dm)} {metric}"
    if dm_noise:
        trade += " (inside spread)"
    short = "; shorter than its energy method resolves" if bool(best.get("short_run", False)) else ""
    text = f"best trade-off: {_label(best)}: {trade} vs {ref['run_name']}{unknown}{short}"
    return Verdict(text, str(best["run_name"]), best["group"])

def _label(r: Any) -> str:
    n = int(r.get("n", 1) or 1)
    return str(r["run_name"]) + (f" ×{n}" if n > 1 else "")


_MOVED = {**dict.fromkeys(['DEFAULT_WIDTH', 'IN_NOISE', '_EST_NOTE', 'Column', '_as_groups', '_notes_cell', '_spread_cell', '_delta_pct_cell', '_delta_metric_cell', '_payback_cell', 'table_columns', '_signed_energy', '_param_text', '_cell_len', '_fit', 'display_rows', '_layout', 'footnotes', 'to_markdown', 'table_width', 'print_table', 'to_records', '_plain'], "wattlog.compare_table"),
          **dict.fromkeys(['CliError', 'resolve_tracking_uri', '_redact_text', 'probe_tracking', '_default_uri', 'run_cli', 'register_cli', 'sort_frame', 'cli_compare'], "wattlog.compare_cli")}


def __getattr__(name: str) -> Any:
    """The table and CLI names, from their own modules (imported on first use: no import cycle)."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'wattlog.compare' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
