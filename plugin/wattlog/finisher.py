"""The end of a stage, off the training thread: its ``power.png`` drawn into its sink, then the sink closed.

Drawing takes about a second (a child process imports matplotlib), so it runs on a ``wattlog-finish``
thread (not a daemon: a script that ends right after ``fit()`` still gets its chart). A next stage of
the same run (``trainer.test()`` right after ``fit()``) does not wait for it: it takes the finishing
stage's sink over (:meth:`StageFinisher.adopt`), the chart lands in it whenever drawn, and that stage's
own end closes it. A sink with another destination waits, so that one spool never has two writers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from wattlog.sinks.base import MultiSink, split_primary

__all__ = ["StageFinisher"]


class _Job:
    __slots__ = ("sink", "close", "thread", "adopted", "closing")

    def __init__(self, sink: Any, close: Callable[[Any], None]) -> None:
        self.sink = sink
        self.close = close
        self.thread: threading.Thread | None = None
        self.adopted = False  # a next stage writes through this sink and closes it itself
        self.closing = False  # past the point where it could be adopted


class StageFinisher:
    """Finishes stages one after another; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: _Job | None = None

    def finish(self, sink: Any, draw: Callable[[Any], None] | None, close: Callable[[Any], None],
               background: bool) -> None:
        """``draw(sink)`` (if given), then ``close(sink)`` unless adopted meanwhile; on a thread if
        ``background``, else here (strict mode: a failure raises to the caller)."""
        if sink is None:
            return
        previous, job = self._job, _Job(sink, close)
        self._job = job

        def run() -> None:
            try:
                if previous is not None and previous.thread is not None:
                    previous.thread.join()  # charts land in stage order: the later one has every stage's rows
                if draw is not None:
                    draw(sink)
            finally:
                with self._lock:
                    job.closing = not job.adopted
                if job.closing:
                    close(sink)

        if background:
            job.thread = threading.Thread(target=run, name="wattlog-finish")
            job.thread.start()
        else:
            run()

    def adopt(self, sink: Any) -> Any:
        """The sink a starting stage should use: the finishing stage's own one when ``sink`` writes to
        the same destination and it is not closing yet (no wait); else ``sink``, once the last stage's
        sink is closed."""
        job = self._job
        primary, others = split_primary(sink)
        destination = getattr(primary, "destination", None)
        if job is not None and destination is not None:
            with self._lock:
                if (job.thread is not None and job.thread.is_alive() and not job.closing
                        and getattr(job.sink, "destination", None) == destination):
                    job.adopted = True
                    return MultiSink([job.sink, *others]) if others else job.sink
        self.wait()
        return sink

    def adopted(self, sink: Any) -> bool:
        """``sink`` is a finishing stage's, taken over by the stage that runs now."""
        job = self._job
        return job is not None and job.adopted and job.sink is sink

    def release(self, sink: Any) -> None:
        """A stage that took ``sink`` over could not start: its finishing stage closes it after all
        (here, once its chart is in, if that stage already went past closing)."""
        primary, _others = split_primary(sink)
        job = self._job
        if job is None or not job.adopted or job.sink is not primary:
            return
        with self._lock:
            job.adopted = False
        if job.thread is not None:
            job.thread.join()
        if not job.closing:
            job.closing = True
            job.close(primary)

    def wait(self) -> None:
        """Until every stage's chart is in and its sink closed (or adopted)."""
        job, self._job = self._job, None
        if job is not None and job.thread is not None:
            job.thread.join()  # each job joins the one before it
