"""Step boundaries on the CUDA timeline without ``torch.cuda.synchronize()``.

The training thread records a CUDA event (microseconds, asynchronous) and queues it; a
daemon thread waits for each event to complete and marks the meter at that moment, so a
boundary lands when the GPU actually reaches it, not when Python queued the kernels.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any


class CudaBoundaries:
    """Mark ``session`` when the GPU reaches each boundary; marks keep their order."""

    def __init__(self, session: Any, event_factory: Any = None) -> None:
        self._session = session
        self._event_factory = event_factory
        self._queue: queue.SimpleQueue[tuple[Any, Any, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._event_factory is None:
            import torch

            self._event_factory = torch.cuda.Event
        self._thread = threading.Thread(target=self._run, name="wattlog-cuda-marks", daemon=True)
        self._thread.start()

    def mark(self, label: Any, step: int | None = None) -> None:
        """Training thread: record an event on the current stream and queue it (``step``: a step end)."""
        event = self._event_factory()
        event.record()
        self._queue.put((event, label, step))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            event, label, step = item
            event.synchronize()  # blocks this thread only; the GIL is released while waiting
            if step is None:
                self._session.mark(label, time.perf_counter())
            else:
                self._session.step_completed(step, time.perf_counter())

    def stop(self, timeout_s: float = 30.0) -> None:
        """Wait for queued boundaries to complete, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)
            self._thread = None
