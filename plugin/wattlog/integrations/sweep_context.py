"""The sweep context: how a job of a Hydra multirun finds the energy sweep it belongs to.

Framework-light on purpose: importing this module imports neither Hydra nor MLflow, and every function
returns an empty value at once outside a Hydra multirun (Hydra is only looked at when the running
program has imported it already), so an ``EnergyMonitor`` can call :func:`sweep_link_tags` in every
run at setup.

Files (written by :class:`wattlog.integrations.hydra_sweep.EnergySweepCallback`, in a 0700 directory
``<hydra.sweep.dir>/.wattlog/``, each 0600, never through a symlink):

- ``sweep.json``: ``{"wattlog_sweep": 1, "parent_run_id", "sweep_id", "experiment_name",
  "experiment_id", "metric", "mode", "tracking_uri", "tracking_uri_redacted", "overrides"}``. It holds
  no credentials: the tracking URI and the overrides are stored redacted (jobs read their own
  environment and config for credentials);
- ``jobs/<num>.json``: one per job, ``{"num", "overrides" (redacted), "status"}``, so the callback can
  name each job whose run did not link itself to the sweep.

Tags a linked run carries (:func:`sweep_link_tags`): ``mlflow.parentRunId`` (MLflow nests the run
under the sweep's parent), ``energy.sweep_id``, ``energy.sweep_job`` (Hydra's job number) and
``energy.overrides`` (JSON list of the job's overrides, redacted).
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from wattlog.redact import redact_override, redact_overrides

CONTEXT_DIR = ".wattlog"
SWEEP_FILE = f"{CONTEXT_DIR}/sweep.json"
JOBS_DIR = f"{CONTEXT_DIR}/jobs"
SWEEP_FORMAT = 1
SWEEP_CALLBACK_TARGETS = (
    "wattlog.integrations.hydra.EnergySweepCallback",
    "wattlog.integrations.hydra_sweep.EnergySweepCallback",
)

T_PARENT_RUN_ID = "mlflow.parentRunId"
T_SWEEP_ID = "energy.sweep_id"
T_SWEEP_JOB = "energy.sweep_job"
T_OVERRIDES = "energy.overrides"
T_ROLE = "wattlog.role"  # "sweep" on the parent run (compare leaves such runs out)
LEGACY_T_SWEEP_ID = "wattlog.sweep_id"  # wattlog <= 0.1 children
LEGACY_T_JOB_NUM = "wattlog.job_num"
LEGACY_T_OVERRIDES = "wattlog.overrides"

OVERRIDE_PARAM_PREFIX = "override."
MAX_RUN_NAME = 40
_PARAM_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,255}$")
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# ---------------------------------------------------------------------- overrides


def override_key(override: str) -> str | None:
    """The config key of a Hydra override (``+a.b=1`` -> ``a.b``; ``db@pkg=x`` -> ``db_pkg``); None for
    a deletion or a string without ``=``. Made a valid MLflow param name."""
    key, sep, _ = str(override).partition("=")
    if not sep:
        return None
    return _PARAM_KEY_BAD.sub("_", key.lstrip("+~"))


def override_params(overrides: Iterable[str], prefix: str = OVERRIDE_PARAM_PREFIX) -> dict[str, str]:
    """Params for a run's overrides, redacted: ``["prune.amount=0.3"]`` -> ``{"override.prune.amount": "0.3"}``.

    The ``override.`` prefix keeps them apart from wattlog's own ``energy.*`` params (an override
    ``energy.pue=1.2`` becomes ``override.energy.pue``, never a conflicting ``energy.pue``).
    """
    params: dict[str, str] = {}
    for item in redact_overrides(overrides):
        key = override_key(item)
        if key:
            params[f"{prefix}{key}"] = item.partition("=")[2][:6000]
    return params


def _is_sweep_value(value: str) -> bool:
    v = value.strip()
    return "," in v or bool(re.match(r"^(range|choice|interval|glob|tag|sort|shuffle)\(", v))


def run_name(job_overrides: Iterable[str], sweep_overrides: Iterable[str] = (), job_num: Any = None) -> str:
    """A short, readable run name for a sweep job: the values of its overrides that differ between jobs.

    An override also given, identically, to the whole multirun (``energy=estimate``) is the same in
    every job and left out; so are overrides of ``hydra.*``. Values are redacted, joined by spaces and
    cut to :data:`MAX_RUN_NAME` characters. ``job 3`` when nothing differs.

    Args:
        job_overrides: the job's ``hydra.overrides.task`` (``["model.hidden=8", "energy=estimate"]``).
        sweep_overrides: the multirun's task overrides (``["model.hidden=2,8,32", "energy=estimate"]``).
        job_num: Hydra's job number, for the fallback name.
    """
    fixed = {o for o in redact_overrides(sweep_overrides) if not _is_sweep_value(o.partition("=")[2])}
    values = []
    for item in redact_overrides(job_overrides):
        key, sep, value = item.partition("=")
        if not sep or item in fixed or key.lstrip("+~").startswith("hydra."):
            continue
        values.append(value if len(value) <= 16 else value[:15] + "…")
    name = " ".join(values)
    if len(name) > MAX_RUN_NAME:
        name = name[: MAX_RUN_NAME - 1] + "…"
    return name or (f"job {job_num}" if job_num is not None else "job")


# ---------------------------------------------------------------------- files


def _private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700; an existing one must be a real directory of this user (tightened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"refusing {path}: a symlink or not a directory")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise PermissionError(f"refusing {path}: owned by uid {st.st_uid}, not by this user")
    if stat.S_IMODE(st.st_mode) != _DIR_MODE:
        os.chmod(path, _DIR_MODE)


def write_private_json(path: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically: mode 0600 in a 0700 directory, never through a symlink."""
    _private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, _FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_private_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` (not followed if a symlink); None if the file is absent.

    Raises:
        ValueError: not a JSON object, a symlink, or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"refusing {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"refusing {path}: not a regular file")
        data = f.read(1 << 20)
    try:
        obj = json.loads(data)
    except ValueError:
        raise ValueError(f"{path} is not a wattlog sweep file (not JSON)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a wattlog sweep file")
    return obj


def read_sweep_file(path: Path) -> dict[str, Any] | None:
    """The sweep record in ``path`` (``<sweep dir>/.wattlog/sweep.json``), or None if absent.

    Raises:
        ValueError: the file is not a wattlog sweep file (or names an invalid parent run id).
    """
    info = read_private_json(Path(path))
    if info is None:
        return None
    if not isinstance(info.get("parent_run_id"), str) or not _RUN_ID_RE.match(info["parent_run_id"]):
        raise ValueError(f"{path} is not a wattlog sweep file")
    return info


def write_job_record(sweep_dir: Path, num: Any, overrides: Iterable[str], status: str) -> None:
    """Record that job ``num`` of the sweep ran (``jobs/<num>.json``; overrides redacted)."""
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", str(num))[:64] or "unknown"
    write_private_json(Path(sweep_dir) / JOBS_DIR / f"{name}.json",
                       {"num": str(num), "overrides": redact_overrides(overrides), "status": str(status)})


def read_job_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job record of the sweep, by job number; unreadable ones are left out."""
    folder = Path(sweep_dir) / JOBS_DIR
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(st.st_mode):
        return []
    records = []
    for p in folder.glob("*.json"):
        try:
            rec = read_private_json(p)
        except ValueError:
            continue
        if rec is not None and "num" in rec:
            records.append(rec)

    def order(r: dict[str, Any]) -> tuple[int, str]:
        n = str(r["num"])
        return (int(n), n) if n.isdigit() else (1 << 62, n)

    return sorted(records, key=order)


# ---------------------------------------------------------------------- the running job


def _hydra_config() -> Any:
    """The running job's ``hydra`` node, or None; never imports Hydra."""
    mod = sys.modules.get("hydra.core.hydra_config")
    if mod is None:
        return None
    try:
        if not mod.HydraConfig.initialized():
            return None
        return mod.HydraConfig.get()
    except Exception:  # noqa: BLE001 - a half-initialised Hydra is "not in a job"
        return None


def in_energy_sweep(hc: Any) -> bool:
    """True for a multirun job whose Hydra config enables :class:`EnergySweepCallback`."""
    mode = hc.get("mode")
    if getattr(mode, "name", str(mode)) != "MULTIRUN":
        return False
    callbacks = hc.get("callbacks") or {}
    for c in callbacks.values():
        try:
            target = c.get("_target_")
        except AttributeError:
            continue
        if target in SWEEP_CALLBACK_TARGETS:
            return True
    return False


def sweep_dir_of(hc: Any) -> Path:
    """``hydra.sweep.dir`` as an absolute path (relative ones are under ``hydra.runtime.cwd``)."""
    sweep_dir = Path(str(hc.sweep.dir))
    if not sweep_dir.is_absolute():
        runtime = hc.get("runtime") or {}
        base = runtime.get("cwd") if hasattr(runtime, "get") else None
        sweep_dir = Path(str(base or os.getcwd())) / sweep_dir
    return sweep_dir


def job_overrides() -> list[str]:
    """The running Hydra job's task overrides (``hydra.overrides.task``), unredacted; [] outside one."""
    hc = _hydra_config()
    if hc is None:
        return []
    try:
        return [str(o) for o in hc.overrides.task]
    except Exception:  # noqa: BLE001
        return []


def current_sweep() -> dict[str, Any] | None:
    """The sweep record of the running job plus ``job_num`` and ``job_overrides`` (unredacted), or None
    outside an energy sweep (or when its parent run could not be opened: no ``sweep.json``)."""
    hc = _hydra_config()
    if hc is None or not in_energy_sweep(hc):
        return None
    try:
        info = read_sweep_file(sweep_dir_of(hc) / SWEEP_FILE)
    except (ValueError, OSError):
        return None
    if info is None:
        return None
    num = hc.job.get("num") if hasattr(hc, "job") else None
    return {**info, "job_num": num, "job_overrides": job_overrides()}


def sweep_link_tags() -> dict[str, str]:
    """Tags that link the running job's MLflow run into its energy sweep; ``{}`` outside one.

    Cheap (imports neither MLflow nor Hydra, reads one small file), so a monitor can call it for every
    run at setup and set the tags on whatever run its logger made.

    Returns:
        ``{"mlflow.parentRunId": <parent run id>, "energy.sweep_id": <id>, "energy.sweep_job": <job num>,
        "energy.overrides": <JSON list of the job's overrides, redacted>}`` (the last two when known).
    """
    ctx = current_sweep()
    if ctx is None:
        return {}
    tags = {T_PARENT_RUN_ID: str(ctx["parent_run_id"]), T_SWEEP_ID: str(ctx.get("sweep_id", ""))}
    if ctx.get("job_num") is not None:
        tags[T_SWEEP_JOB] = str(ctx["job_num"])
    if ctx["job_overrides"]:
        tags[T_OVERRIDES] = json.dumps(redact_overrides(ctx["job_overrides"]))[:5000]
    return tags


def sweep_run_name() -> str | None:
    """A short name for the running sweep job's run (:func:`run_name`), or None outside an energy sweep."""
    ctx = current_sweep()
    if ctx is None:
        return None
    return run_name(ctx["job_overrides"], ctx.get("overrides") or [], ctx.get("job_num"))


def redacted_overrides_json(overrides: Iterable[str]) -> str:
    """JSON list of ``overrides``, each redacted (for the ``energy.overrides`` tag)."""
    return json.dumps([redact_override(o) for o in overrides])[:5000]


__all__ = [
    "SWEEP_FILE",
    "T_OVERRIDES",
    "T_PARENT_RUN_ID",
    "T_SWEEP_ID",
    "T_SWEEP_JOB",
    "current_sweep",
    "job_overrides",
    "override_params",
    "read_sweep_file",
    "run_name",
    "sweep_link_tags",
    "sweep_run_name",
]
