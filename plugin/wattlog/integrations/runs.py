"""Where a session writes, for every framework: an MLflow run, or a local ``energy/`` folder.

Framework-neutral (no lightning, transformers or mlflow import: MLflow is read from ``sys.modules``,
so an adapter only finds an active run when the user's code has imported MLflow). The Lightning
adapter adds its ``MLFlowLogger`` lookup in front of :func:`resolve_run`.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from wattlog.errors import NoRunError, strict_mode
from wattlog.options import MonitorOptions


@dataclass(frozen=True)
class RunTarget:
    """Where a session writes: an MLflow run (``run_id``), or a local folder when there is none."""

    run_id: str | None
    tracking_uri: str | None
    local_dir: str | None


def resolve_run(options: MonitorOptions, root_dir: str | None, *, run_id: str | None = None,
                fallback_run_id: str | None = None, tracking_uri: str | None = None, who: str = "wattlog",
                hint: str = "start one with mlflow.start_run()") -> RunTarget:
    """``run_id`` if given, else MLflow's active run, else ``fallback_run_id``, else a local folder.

    Args:
        options: the monitor options (``require_mlflow``).
        root_dir: the local folder's parent is ``<root_dir>/energy`` (default: the working directory).
        run_id: an explicit MLflow run id.
        fallback_run_id: used when no run is active (``MLFLOW_RUN_ID``, or the run of an earlier stage).
        tracking_uri: the store of an explicit run (default: MLflow's current tracking URI).
        who, hint: for the error message.

    Raises:
        NoRunError: no MLflow run and ``require_mlflow=True`` or strict mode.
    """
    mlflow = sys.modules.get("mlflow")
    current_uri = tracking_uri or (mlflow.get_tracking_uri() if mlflow is not None else None) or os.environ.get(
        "MLFLOW_TRACKING_URI")
    if run_id:
        return RunTarget(run_id, current_uri, None)
    active = mlflow.active_run() if mlflow is not None else None
    if active is not None:
        return RunTarget(active.info.run_id, current_uri, None)
    if fallback_run_id:
        return RunTarget(fallback_run_id, current_uri, None)
    if options.require_mlflow or strict_mode():
        raise NoRunError(f"{who} found no MLflow run: {hint}; or pass require_mlflow=False (and unset "
                         "WATTLOG_STRICT) to write energy to a local folder")
    return local_target(root_dir)


def local_target(root_dir: str | None) -> RunTarget:
    """A fresh local folder ``<root_dir>/energy/<time>-<id>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RunTarget(None, None, os.path.join(root_dir or os.getcwd(), "energy", f"{stamp}-{uuid.uuid4().hex[:6]}"))


def primary_sink(target: RunTarget, options: MonitorOptions, root_dir: str | None) -> Any:
    """The MLflow spool sink of ``target`` (spool: ``spool_dir``, ``$WATTLOG_SPOOL_DIR`` or
    ``<root_dir>/.wattlog/spool``), or the local folder's sink when there is no run."""
    from wattlog.sinks.base import LocalSink

    if target.run_id is None:
        return LocalSink(target.local_dir or "energy")
    from wattlog.sinks.mlflow import MlflowSink

    spool = options.spool_dir or os.environ.get("WATTLOG_SPOOL_DIR") or os.path.join(
        root_dir or ".", ".wattlog", "spool")
    return MlflowSink(target.run_id, tracking_uri=target.tracking_uri, spool_dir=spool)
