"""The background thread that reads energy sources at a fixed cadence.

The training thread never reads hardware: it only records boundaries (see ``meter.py``).
This thread appends each source's cumulative joules to a :class:`Trace`, which the meter
interpolates at those boundaries.
"""

from __future__ import annotations

import bisect
import random
import threading
import time
from collections.abc import Callable, Sequence

from wattlog.sources.base import Domain, EnergySource

_DITHER = 0.25
"""Relative jitter of the sampler's cadence (uniform, zero mean)."""


class Trace:
    """Cumulative joules of one source's domains over time; thread-safe, append-only.

    Values are kept non-decreasing per domain: a reading below the previous one is held at
    the previous value (the source should already have corrected it; this is the last guard).
    """

    def __init__(self, domains: Sequence[Domain]) -> None:
        self.names = [d.name for d in domains]
        self.times_s: list[float] = []
        self.values_j: list[tuple[float, ...]] = []
        self.dead_reason: str | None = None
        self.finished = False
        """Set after the final reading: the trace is flat from its last sample on."""
        self._lock = threading.Lock()

    def append(self, time_s: float, energy_j: dict[str, float]) -> bool:
        """Append a reading; returns False if a value went backwards and was held."""
        values = tuple(float(energy_j.get(n, 0.0)) for n in self.names)
        monotonic = True
        with self._lock:
            if self.values_j:
                last = self.values_j[-1]
                if any(v < p for v, p in zip(values, last)):
                    monotonic = False
                    values = tuple(max(v, p) for v, p in zip(values, last))
                if time_s <= self.times_s[-1]:
                    time_s = self.times_s[-1] + 1e-9
            self.times_s.append(time_s)
            self.values_j.append(values)
        return monotonic

    def resolved(self, time_s: float) -> bool:
        """True when the trace covers ``time_s`` (a later sample exists, or the source is dead)."""
        return self.finished or self.dead_reason is not None or (bool(self.times_s) and self.times_s[-1] >= time_s)

    def last_time_s(self) -> float | None:
        return self.times_s[-1] if self.times_s else None

    def at(self, time_s: float) -> tuple[float, ...]:
        """Cumulative joules per domain at ``time_s``, linearly interpolated between samples.

        Before the first sample the first value is used; after the last, the last value.
        """
        with self._lock:
            times, values = self.times_s, self.values_j
            if not times:
                return tuple(0.0 for _ in self.names)
            i = bisect.bisect_left(times, time_s)
            if i == 0:
                return values[0]
            if i >= len(times):
                return values[-1]
            t0, t1 = times[i - 1], times[i]
            v0, v1 = values[i - 1], values[i]
        frac = (time_s - t0) / (t1 - t0)
        return tuple(a + (b - a) * frac for a, b in zip(v0, v1))

    def prune_before(self, time_s: float) -> None:
        """Drop samples no longer needed to interpolate at or after ``time_s``."""
        with self._lock:
            i = bisect.bisect_left(self.times_s, time_s) - 1
            if i > 0:
                del self.times_s[:i]
                del self.values_j[:i]

    def __len__(self) -> int:
        return len(self.times_s)


class Sampler:
    """Reads every source every ``interval_s`` seconds on a daemon thread.

    A source that raises is marked dead (its trace stays flat from its last sample) and
    ``on_failure(source_index, exc)`` is called once, unless the exception has
    ``transient = True``: then only this sample is skipped and ``on_note`` gets each of its
    ``notes`` (or its message). ``on_note(text)`` is called for each anomaly a source reports
    in ``Reading.notes``.
    """

    def __init__(
        self,
        sources: Sequence[EnergySource],
        traces: Sequence[Trace],
        interval_s: float,
        on_failure: Callable[[int, BaseException], None],
        on_note: Callable[[str], None],
    ) -> None:
        self._sources = list(sources)
        self._traces = list(traces)
        self._interval_s = interval_s
        self._on_failure = on_failure
        self._on_note = on_note
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cpu_time_s = 0.0
        """Thread CPU time spent reading sources (for the overhead benchmark)."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wattlog-sampler", daemon=True)
        self._thread.start()

    def sample_once(self, final: bool = False) -> None:
        """Read every live source once (on the calling thread); ``final`` forces slow sources to update.

        A reading no newer than the trace's last one (a source that updates on its own, slower
        cadence) carries no news and is skipped (its notes still count). A reading with ``history``
        (earlier final points, e.g. a shaped slow counter) gets those appended first.
        """
        for i, (source, trace) in enumerate(zip(self._sources, self._traces)):
            if trace.dead_reason is not None:
                continue
            try:
                reading = source.read_final() if final else source.read()
            except Exception as exc:  # noqa: BLE001 - any failure degrades this source only
                if getattr(exc, "transient", False):  # skip this sample: the trace interpolates the gap
                    for note in getattr(exc, "notes", ()) or (str(exc),):
                        self._on_note(note)
                    continue
                trace.dead_reason = f"{type(exc).__name__}: {exc}"
                self._on_failure(i, exc)
                continue
            monotonic = True
            for time_s, energy_j in (*getattr(reading, "history", ()), (reading.time_s, reading.energy_j)):
                last_s = trace.last_time_s()
                if last_s is None or time_s > last_s:
                    monotonic = trace.append(time_s, energy_j) and monotonic
            if not monotonic:
                self._on_note(f"{type(source).__name__}: cumulative energy went backwards; held")
            for note in reading.notes:
                self._on_note(note)

    def _run(self) -> None:
        # While a source asks for it (a slow counter being shaped), the cadence is dithered by +-25 % (same
        # mean): reads then land at varying phases of the counter's updates, which is what narrows down when
        # it updates (sources/shaping.py). Otherwise the cadence is regular: a counter about as fast as the
        # reads is then read at a steady phase, so its slope between reads stays right.
        dither = random.Random()
        next_s = time.perf_counter()
        while not self._stop.is_set():
            t_cpu = time.thread_time()
            self.sample_once()
            self.cpu_time_s += time.thread_time() - t_cpu
            jitter = _DITHER if any(getattr(s, "wants_dither", False) for s in self._sources) else 0.0
            next_s += self._interval_s * (1.0 + jitter * dither.uniform(-1.0, 1.0))
            delay_s = next_s - time.perf_counter()
            if delay_s < 0:  # fell behind (slow source or busy interpreter): don't burst
                next_s = time.perf_counter()
                delay_s = 0.0
            self._stop.wait(delay_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
