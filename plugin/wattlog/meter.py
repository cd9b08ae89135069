"""EnergyMeter: the framework-free core (no torch, lightning, mlflow or hydra imports).

The meter owns the sources and a background :class:`~wattlog.sampler.Sampler`. The caller
records boundaries with :meth:`EnergyMeter.mark` (a deque append: microseconds, any thread);
each boundary starts a new *segment* labelled with what was passed to ``mark``. Energy of a
segment is the difference of each domain's cumulative counter, linearly interpolated at the
two boundaries, so segment energies telescope: they sum exactly to the counter delta between
the first and the last boundary.

Example::

    meter = EnergyMeter(auto_sources())
    meter.start()
    for step in range(100):
        meter.mark(("train", step))
        train_step()
    segments = meter.close()          # every segment, each with joules per domain
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from wattlog.errors import ConfigError, SourceError, degrade, strict_mode
from wattlog.sampler import Sampler, Trace
from wattlog.sources.base import Domain, EnergySource

DEFAULT_SAMPLE_INTERVAL_S = 0.02


@dataclass(frozen=True)
class Segment:
    """The energy between two consecutive boundaries.

    Attributes:
        label: what was passed to ``mark()`` at the start of the segment (``None`` for the
            segment from ``start()`` to the first mark).
        start_s, end_s: ``time.perf_counter()`` of the boundaries.
        energy_j: joules per domain name.
    """

    label: Hashable
    start_s: float
    end_s: float
    energy_j: dict[str, float]

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def total_j(self) -> float:
        return sum(self.energy_j.values())

    @property
    def power_w(self) -> float:
        """Mean total power over the segment (0 for an empty segment)."""
        return self.total_j / self.duration_s if self.duration_s > 0 else 0.0


@dataclass
class Window:
    """Result of :meth:`EnergyMeter.window`; filled in when the ``with`` block exits."""

    label: Hashable = None
    start_s: float = 0.0
    end_s: float = 0.0
    energy_j: dict[str, float] = field(default_factory=dict)

    @property
    def total_j(self) -> float:
        return sum(self.energy_j.values())

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def power_w(self) -> float:
        return self.total_j / self.duration_s if self.duration_s > 0 else 0.0


class EnergyMeter:
    """Measure energy per segment and per window from a set of sources.

    Args:
        sources: the sources to read; construct them cheaply, they are opened by ``start()``.
        sample_interval_s: the sampler's cadence (default 20 ms).

    Attributes:
        domains: the measured domains, after ``start()``.
        degraded: reasons for every degradation seen (source failures, corrected anomalies).
    """

    def __init__(self, sources: Sequence[EnergySource], sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S) -> None:
        if not (isinstance(sample_interval_s, (int, float)) and 0.001 <= sample_interval_s <= 10.0):
            raise ConfigError("sample_interval_s", sample_interval_s, "a number of seconds in [0.001, 10]")
        self.sources = list(sources)
        self.sample_interval_s = float(sample_interval_s)
        self.domains: list[Domain] = []
        self.degraded: list[str] = []
        self._traces: list[Trace] = []
        self._slices: list[tuple[Trace, list[str]]] = []
        self._marks: deque[tuple[float, Hashable]] = deque()
        self._open: tuple[float, Hashable] | None = None
        self._closed_boundaries: list[tuple[float, Hashable, float]] = []
        self._open_windows: list[float] = []
        self._sampler: Sampler | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._offset_j: dict[str, float] = {}
        self._first_j: dict[str, float] = {}
        self._started = False
        self._closed = False
        self.start_s = 0.0
        self.end_s: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> list[Domain]:
        """Open the sources, take the first reading and start the sampler thread.

        Raises:
            SourceUnavailable: a source cannot be opened (the others are closed again).
        """
        if self._started:
            raise RuntimeError("EnergyMeter.start() called twice")
        opened: list[EnergySource] = []
        try:
            for source in self.sources:
                domains = source.start()
                opened.append(source)
                self.domains.extend(domains)
                self._traces.append(Trace(domains))
        except BaseException:
            for source in opened:
                source.close()
            raise
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ConfigError("sources", names, "sources with distinct domain names")
        self._sampler = Sampler(self.sources, self._traces, self.sample_interval_s, self._on_failure, self._on_note)
        self._sampler.sample_once()
        for trace in self._traces:
            if trace.values_j:
                self._first_j.update(zip(trace.names, trace.values_j[0]))
        self.start_s = min((t.last_time_s() or time.perf_counter()) for t in self._traces) if self._traces else (
            time.perf_counter()
        )
        self._open = (self.start_s, None)
        self._sampler.start()
        self._started = True
        return list(self.domains)

    def close(self) -> list[Segment]:
        """Stop the sampler, take a final reading, close the sources; return the remaining segments.

        Idempotent: a second call returns an empty list.
        """
        if self._closed or not self._started:
            return []
        self._closed = True
        assert self._sampler is not None
        self._sampler.stop()
        self._sampler.sample_once(final=True)
        for trace in self._traces:
            trace.finished = True
        # end at the final sample, so the segments add up to exactly the counters' delta
        end_s = max((t.last_time_s() or 0.0 for t in self._traces), default=time.perf_counter())
        if self._marks and self._marks[-1][0] > end_s:
            end_s = self._marks[-1][0]
        for source in self.sources:
            try:
                source.close()
            except Exception as exc:  # noqa: BLE001 - closing must not mask the run's results
                self._on_note(f"{type(source).__name__}.close() failed: {exc}")
        self.mark("__end__", end_s)
        segments = self.drain()
        self.end_s = end_s
        self._marks = deque(maxlen=0)  # a late mark() or append_boundary() is dropped, never kept
        return segments

    # -- boundaries and segments -----------------------------------------------------------

    def mark(self, label: Hashable = None, time_s: float | None = None) -> None:
        """Start a new segment labelled ``label`` at ``time_s`` (default: now). Thread-safe, O(1).

        Boundaries must be marked in time order.
        """
        self._marks.append((time.perf_counter() if time_s is None else time_s, label))

    @property
    def append_boundary(self) -> Callable[[tuple[float, Hashable]], None]:
        """The boundary queue's own ``append``: ``append((time.perf_counter(), label))`` is ``mark(label)``
        without a Python call, for the hottest paths. Times must not decrease; after :meth:`close` what
        it appends is never read."""
        return self._marks.append

    def drain(self) -> list[Segment]:
        """Return the segments completed since the last call whose end the sampler has covered.

        A segment whose end boundary is newer than the latest sample stays pending until the
        next call (or ``close()``), so callers get lagged but exact segments.

        Raises:
            SourceError: under ``WATTLOG_STRICT=1``, a failure seen by the sampler thread.
        """
        self._raise_pending_error()
        with self._lock:
            while self._marks:
                t, label = self._marks.popleft()
                assert self._open is not None, "mark() before start()"
                self._closed_boundaries.append((self._open[0], self._open[1], t))
                self._open = (t, label)
            ready: list[Segment] = []
            while self._closed_boundaries:
                start_s, label, end_s = self._closed_boundaries[0]
                if not all(trace.resolved(end_s) for trace in self._traces):
                    break
                self._closed_boundaries.pop(0)
                ready.append(Segment(label, start_s, end_s, self._energy_between(start_s, end_s)))
            if ready:
                keep_from = ready[-1].end_s
                if self._open_windows:
                    keep_from = min(keep_from, min(self._open_windows))
                for trace in self._traces:
                    trace.prune_before(keep_from)
        return ready

    @property
    def pending_segments(self) -> int:
        """Completed segments not yet resolved by the sampler, plus unprocessed marks."""
        return len(self._closed_boundaries) + len(self._marks)

    # -- windows -----------------------------------------------------------------------------

    @contextmanager
    def window(self, label: Hashable = None, timeout_s: float = 5.0) -> Iterator[Window]:
        """Measure the energy of the enclosed block; the result is filled in at exit.

        Exiting waits (up to one sample interval, typically) for the sampler to pass the end.
        Windows may nest and overlap with segments; they do not create boundaries.
        """
        if not self._started or self._closed:
            raise RuntimeError("EnergyMeter.window() needs a started, open meter")
        result = Window(label=label, start_s=time.perf_counter())
        with self._lock:
            self._open_windows.append(result.start_s)
        try:
            yield result
        finally:
            result.end_s = time.perf_counter()
            deadline_s = result.end_s + timeout_s
            while not all(trace.resolved(result.end_s) for trace in self._traces):
                if time.perf_counter() > deadline_s:
                    self._on_note(f"window {label!r}: no sample after its end within {timeout_s} s")
                    break
                time.sleep(self.sample_interval_s / 4)
            with self._lock:
                self._open_windows.remove(result.start_s)
                result.energy_j = self._energy_between(result.start_s, result.end_s)

    # -- totals and state --------------------------------------------------------------------

    def energy_j(self) -> dict[str, float]:
        """Cumulative joules per domain at the latest sample, plus any loaded offsets."""
        totals: dict[str, float] = {}
        for trace in self._traces:
            last = trace.last_time_s()
            values = trace.at(last) if last is not None else tuple(0.0 for _ in trace.names)
            for name, value in zip(trace.names, values):
                totals[name] = value - self._first_j.get(name, 0.0) + self._offset_j.get(name, 0.0)
        return totals

    def state_dict(self) -> dict[str, object]:
        """Running totals, for checkpoints: ``{"version": 1, "energy_j": {domain: J}}``."""
        return {"version": 1, "energy_j": self.energy_j()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Continue the totals of a previous run (call before or after ``start()``)."""
        energy = state.get("energy_j", {})
        if not isinstance(energy, dict):
            raise ConfigError("state_dict['energy_j']", energy, "a dict of domain -> joules")
        self._offset_j = {str(k): float(v) for k, v in energy.items()}

    @property
    def sampler_cpu_time_s(self) -> float:
        """CPU time the sampler thread has spent reading sources."""
        return self._sampler.cpu_time_s if self._sampler else 0.0

    # -- internals ---------------------------------------------------------------------------

    def _energy_between(self, start_s: float, end_s: float) -> dict[str, float]:
        energy: dict[str, float] = {}
        for trace in self._traces:
            begin = trace.at(start_s)
            end = trace.at(end_s)
            for name, a, b in zip(trace.names, begin, end):
                energy[name] = b - a
        return energy

    def _on_failure(self, index: int, exc: BaseException) -> None:
        source = self.sources[index]
        reason = f"{type(source).__name__} failed: {exc}"
        self.degraded.append(reason)
        if strict_mode():
            self._error = exc if isinstance(exc, SourceError) else SourceError(reason)
            self._error.__cause__ = exc
            return
        degrade(reason + "; its domains stop accruing energy", exc)

    def _on_note(self, note: str) -> None:
        if note in self.degraded:
            return
        self.degraded.append(note)
        if strict_mode():
            self._error = SourceError(note)
            return
        degrade(note)

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
