"""ChartJob: the stage's power chart drawn on a background thread, collected later."""

from __future__ import annotations

import os
import threading

import pytest

from wattlog.artifacts import ChartJob

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_chart_is_drawn_off_the_calling_thread_and_collected(monkeypatch) -> None:
    import wattlog.plots

    real = wattlog.plots.plot_power_trace
    drawn_on: list[str] = []

    def spy(*args, **kwargs):
        drawn_on.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(wattlog.plots, "plot_power_trace", spy)
    rows = [{"stage": "train", "step": i, "t_start_s": 0.1 * i, "t_end_s": 0.1 * (i + 1), "power_w": 100.0 + i}
            for i in range(20)]
    job = ChartJob(rows, estimated="cpu")
    path, error = job.collect(timeout_s=60)
    assert error is None and drawn_on == ["wattlog-chart"]
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    job.cleanup()
    assert not os.path.exists(path)


def test_a_failing_chart_is_reported_not_raised(monkeypatch) -> None:
    import wattlog.plots

    def broken(*args, **kwargs):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(wattlog.plots, "plot_power_trace", broken)
    job = ChartJob([], estimated=None)
    path, error = job.collect(timeout_s=10)
    assert path is None and isinstance(error, RuntimeError)
    job.cleanup()


def test_a_chart_that_does_not_finish_times_out(monkeypatch) -> None:
    import wattlog.plots

    release = threading.Event()
    monkeypatch.setattr(wattlog.plots, "plot_power_trace", lambda *a, **k: release.wait(10))
    job = ChartJob([], estimated=None)
    path, error = job.collect(timeout_s=0.05)
    assert path is None and isinstance(error, TimeoutError)
    release.set()
    job.cleanup()


@pytest.mark.parametrize("rows", [[]])
def test_cleanup_is_idempotent(rows) -> None:
    job = ChartJob(rows, estimated=None)
    job.collect(timeout_s=30)
    job.cleanup()
    job.cleanup()
