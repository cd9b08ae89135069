"""ChartJob: the stage's power chart drawn in a short-lived child process, collected later."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from wattlog.artifacts import ChartError, ChartJob

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(n: int = 20) -> list[dict[str, object]]:
    return [{"stage": "train", "step": i, "t_start_s": 0.1 * i, "t_end_s": 0.1 * (i + 1), "duration_s": 0.1,
             "samples": 8, "total_j": 10.0 + i, "power_w": 100.0 + 10 * i, "gpu0_j": 10.0 + i} for i in range(n)]


def test_chart_is_drawn_in_a_child_process_and_collected() -> None:
    job = ChartJob(_rows(), estimated="cpu")
    child_pid = job._proc.pid
    path, error = job.collect(timeout_s=120)
    assert error is None and child_pid != os.getpid()
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    job.cleanup()
    assert not os.path.exists(path)


def test_the_training_process_never_imports_matplotlib_for_the_chart() -> None:
    code = ("import sys\n"
            "from wattlog.artifacts import ChartJob\n"
            f"job = ChartJob({_rows()!r}, estimated=None)\n"
            "path, error = job.collect(120)\n"
            "assert error is None, error\n"
            "print('matplotlib' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_failing_chart_is_reported_not_raised() -> None:
    job = ChartJob([{"stage": "train"}], estimated=None)  # a row without times: the child fails
    path, error = job.collect(timeout_s=120)
    assert path is None and isinstance(error, ChartError) and str(error)
    job.cleanup()


def test_a_chart_that_does_not_finish_times_out() -> None:
    job = ChartJob(_rows(), estimated=None)
    path, error = job.collect(timeout_s=0.001)  # no Python starts, let alone draws, in a millisecond
    assert path is None and isinstance(error, TimeoutError)
    assert job._proc.poll() is not None  # the child was stopped
    job.cleanup()


@pytest.mark.parametrize("rows", [[]])
def test_cleanup_is_idempotent(rows) -> None:
    job = ChartJob(rows, estimated=None)
    job.collect(timeout_s=120)
    job.cleanup()
    job.cleanup()
