"""The power chart of a stage, rendered off the training thread.

:class:`ChartJob` draws ``energy/power.png`` (:func:`wattlog.plots.plot_power_trace`, a
``matplotlib.figure.Figure`` on the Agg canvas: no pyplot state, safe outside the main thread) on a
daemon thread from rows taken on the caller's thread; the session collects it when the stage's sink
closes, so matplotlib's import and the drawing overlap the end-of-stage delivery wait instead of
adding to it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Any

from wattlog import keys


class ChartJob:
    """Render the power chart of ``rows`` on a background thread.

    Args:
        rows: :meth:`wattlog.ledger.TraceLog.plot_rows` (taken by the caller, so the trace may change after).
        estimated: the estimated kinds for the chart's note, or None.
    """

    def __init__(self, rows: list[dict[str, object]], estimated: str | None) -> None:
        self._dir = tempfile.mkdtemp(prefix="wattlog-chart-")
        self._path: Any = None
        self._error: BaseException | None = None
        rows = [dict(r) for r in rows]  # the trace goes on changing in the next stage
        self._thread = threading.Thread(target=self._run, args=(rows, estimated), name="wattlog-chart", daemon=True)
        self._thread.start()

    def _run(self, rows: list[dict[str, object]], estimated: str | None) -> None:
        try:
            from wattlog import plots

            self._path = plots.plot_power_trace(rows, os.path.join(self._dir, keys.POWER_PNG), estimated=estimated)
        except Exception as exc:  # noqa: BLE001 - reported by collect(): a chart must not fail the run
            self._error = exc

    def collect(self, timeout_s: float | None) -> tuple[str | None, BaseException | None]:
        """Wait (at most ``timeout_s``) for the chart: ``(path, None)`` or ``(None, the error)``."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            return None, TimeoutError(f"not drawn within {timeout_s} s")
        return (str(self._path), None) if self._error is None else (None, self._error)

    def cleanup(self) -> None:
        """Delete the chart's temporary folder (after the sink has copied the file)."""
        shutil.rmtree(self._dir, ignore_errors=True)
