"""The power chart of a stage, drawn in a short-lived child process (``python -m wattlog.artifacts``).

:class:`ChartJob` writes the stage's plot rows to a JSON file and starts a child that draws
``energy/power.png`` with :func:`wattlog.plots.plot_power_trace` (a ``matplotlib.figure.Figure`` on
the Agg canvas). A process, not a thread: matplotlib's import and the drawing take about a second of
CPU with the GIL held, and in a thread they slowed what the training process does next (Lightning's
own end of fit, the next stage). :func:`draw_into` runs one job into a sink; the session calls it on
its ``wattlog-finish`` thread once a stage is suspended (see :meth:`wattlog.session.EnergySession.suspend`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from wattlog import keys
from wattlog.helper_processes import HelperProcess

ROWS_JSON = "rows.json"


class ChartError(RuntimeError):
    """The chart process failed; the message ends with the last line it wrote to stderr."""


class ChartJob:
    """Draw the power chart of ``rows`` in a child process.

    Args:
        rows: :meth:`wattlog.ledger.TraceLog.plot_rows` (taken by the caller, so the trace may change after).
        estimated: the estimated kinds for the chart's note, or None.
    """

    def __init__(self, rows: list[dict[str, object]], estimated: str | None) -> None:
        self._dir = tempfile.mkdtemp(prefix="wattlog-chart-")
        self._png = os.path.join(self._dir, keys.POWER_PNG)
        rows_path = os.path.join(self._dir, ROWS_JSON)
        with open(rows_path, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "estimated": estimated}, f)
        self._proc = HelperProcess(
            [sys.executable, "-m", "wattlog.artifacts", rows_path, self._png],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "MPLBACKEND": "Agg"})

    def collect(self, timeout_s: float | None) -> tuple[str | None, BaseException | None]:
        """Wait (at most ``timeout_s``) for the chart: ``(path, None)`` or ``(None, the error)``."""
        try:
            _out, err = self._proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            return None, TimeoutError(f"not drawn within {timeout_s} s")
        if self._proc.returncode == 0 and os.path.isfile(self._png):
            return self._png, None
        lines = (err or b"").decode("utf-8", "replace").strip().splitlines()
        return None, ChartError(lines[-1] if lines else f"the chart process exited with {self._proc.returncode}")

    def cleanup(self) -> None:
        """Stop the child if it still runs and delete the temporary folder (after the sink copied the file)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()
        shutil.rmtree(self._dir, ignore_errors=True)


def draw_into(sink: Any, rows: list[dict[str, object]], estimated: str | None,
              timeout_s: float | None) -> BaseException | None:
    """Draw the chart of ``rows`` (at most ``timeout_s``) and log it into ``sink`` under ``energy/``.

    Returns:
        None when the chart is in the sink, else why it is not (the caller applies the failure policy).
    """
    job = None
    try:
        job = ChartJob(rows, estimated)
        path, error = job.collect(timeout_s)
        if error is None:
            sink.log_artifact(path, keys.ARTIFACT_DIR)
        return error
    except OSError as exc:  # no process or temporary folder: skipped like a failed chart
        return exc
    finally:
        if job is not None:
            job.cleanup()


def main(argv: list[str] | None = None) -> int:
    """``python -m wattlog.artifacts ROWS_JSON PNG``: draw the chart (what :class:`ChartJob` runs)."""
    rows_path, png = (sys.argv[1:] if argv is None else argv)[:2]
    if hasattr(os, "nice"):
        os.nice(10)  # behind the training for the CPU, like the delivery process
    with open(rows_path, encoding="utf-8") as f:
        job: dict[str, Any] = json.load(f)
    from wattlog import plots

    plots.plot_power_trace(job["rows"], png, estimated=job.get("estimated"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
