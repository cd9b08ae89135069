"""Buffered, batched, failure-tolerant writer of metric points and run data into one MLflow run.

The training thread calls :meth:`MlflowSink.log_points`, which only validates cheaply and appends to
an in-memory queue. :meth:`~MlflowSink.log_params`, :meth:`~MlflowSink.set_tags` and
:meth:`~MlflowSink.log_artifact` enqueue the same way and return at once; ``log_artifact`` first
copies the file into the spool on the caller's thread (a local copy, so the caller may delete its
file as soon as the call returns). A background writer thread appends every record to a local spool
file (see :mod:`wattlog.sinks.spool`), sends them in order (points with ``MlflowClient.log_batch``, at
most 1000 metrics per call, when ``batch_size`` points are waiting or every ``flush_interval_s``;
params and tags with ``log_batch``; artifacts with ``log_artifact``), and records what MLflow
acknowledged in an ack file next to the spool. Delivered artifact copies are deleted.

Failure policy (DESIGN.md): when MLflow is unreachable the writer retries with exponential backoff
(0.5 s doubling up to ``max_backoff_s``) without blocking training or dropping anything, and warns
once per outage; ``wattlog sync`` replays whatever is left. Under ``WATTLOG_STRICT=1`` the error is
raised from the next :meth:`MlflowSink.flush` / :meth:`MlflowSink.close` on the caller's thread.
A batch that failed (its outcome is unknown) is de-duplicated against the run (metric history, params,
artifact listing) before it is sent again, so every record lands exactly once. A param that conflicts
with the run's value is rejected (one warning), never retried. An artifact whose upload fails while
the tracking server answers (a broken artifact store) does not hold back later records: it is deferred,
retried at each flush and close, and left to ``wattlog sync`` if it never succeeds.

Non-finite values (NaN, +-inf) are not logged: MLflow's stores disagree on them and they cannot be
de-duplicated. They are skipped with one warning (strict mode: :class:`SinkError` from ``log_points``).

MLflow's own HTTP client also retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, minutes of
backoff) inside each writer call; the spool is written before any send, so that only delays the
first "unreachable" warning. ``wattlog sync`` lowers it to 1 retry unless the variable is set.
"""

from __future__ import annotations

import atexit
import math
import os
import posixpath
import re
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from wattlog.errors import ConfigError, SinkError, WattlogWarning, strict_mode
from wattlog.sinks import spool as _spool
from wattlog.sinks.spool import (
    ArtifactRecord,
    Point,
    Record,
    RunRecord,
    default_spool_dir,
    redact_text,
    redact_uri,
)
from wattlog.sinks.sync import (
    MAX_METRICS_PER_BATCH,
    ClientFactory,
    Deliverer,
    SyncResult,
    default_client_factory,
    describe,
    describe_record,
    register_cli,
    resolve_uri,
    sync,
)

__all__ = [
    "MlflowSink",
    "Point",
    "SyncResult",
    "default_spool_dir",
    "redact_uri",
    "register_cli",
    "sync",
]

_FIRST_BACKOFF_S = 0.5
_KEY_RE = re.compile(r"^[/\w.\- :]+$")
_MAX_KEY_LEN = 250


def check_key(key: object) -> None:
    """Cheap check of a metric, param or tag key against MLflow's naming rules.

    Raises:
        ConfigError: the key is not a string MLflow accepts as a metric, param or tag name.
    """
    allowed = "non-empty str of <= 250 alphanumerics, '_', '-', '.', ' ', ':' or '/', not a '..' path"
    if (
        not isinstance(key, str)
        or len(key) > _MAX_KEY_LEN
        or not _KEY_RE.match(key)
        or posixpath.normpath(key) != key
        or key.startswith(("/", ".."))
    ):
        raise ConfigError("key", key, allowed)


class MlflowSink:
    """Buffered writer of :class:`Point` s, params, tags and artifacts into one MLflow run, with a local spool.

    Args:
        run_id: the MLflow run to log into.
        tracking_uri: MLflow tracking URI; None means MLflow's default, resolved at :meth:`start`.
        spool_dir: where the spool lives; default :func:`default_spool_dir`.
        batch_size: send when this many points are waiting (sent in calls of at most 1000).
        flush_interval_s: send whatever is waiting at least this often.
        max_backoff_s: longest wait between retries (0.5 s doubling up to this).
        max_buffer_points: most records (queued plus unsent) held in memory: beyond it the oldest live only
            in the spool (written by a spooler thread even while the writer waits on MLflow) and are
            re-read from it; without a usable spool the oldest are dropped (one warning).
        _client_factory: private, for tests: ``tracking_uri -> MlflowClient``-like object.
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 1000,
        flush_interval_s: float = 2.0,
        max_backoff_s: float = 30.0,
        max_buffer_points: int = 100_000,
        *,
        _client_factory: ClientFactory | None = None,
    ) -> None:
        if not _spool.valid_run_id(run_id):
            raise ConfigError("run_id", run_id, "an MLflow run id: 1-256 of [A-Za-z0-9_-], not starting with "
                              "'_' or '-'")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", batch_size, "an int >= 1")
        if not flush_interval_s > 0:
            raise ConfigError("flush_interval_s", flush_interval_s, "a number > 0")
        if not max_backoff_s > 0:
            raise ConfigError("max_backoff_s", max_backoff_s, "a number > 0")
        if not isinstance(max_buffer_points, int) or max_buffer_points < 1:
            raise ConfigError("max_buffer_points", max_buffer_points, "an int >= 1")
        self._run_id = run_id
        self._tracking_uri = tracking_uri
        self._uri = tracking_uri or ""
        self._spool_dir = Path(spool_dir or default_spool_dir()).absolute()
        self._spool_path = _spool.spool_file(self._spool_dir, run_id)
        self._batch_size = batch_size
        self._flush_interval_s = float(flush_interval_s)
        self._max_backoff_s = float(max_backoff_s)
        self._max_buffer = max_buffer_points
        self._client_factory = _client_factory or default_client_factory

        # Caller side (guarded by _cond's lock).
        self._queue: deque[Record] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._wake = threading.Event()
        self._enqueued = 0
        self._pending = 0
        self._low_unacked = 0  # every seq below this is acknowledged
        self._seq0 = 0
        self._flush_gen = 0
        self._stopping = False
        self._stop_deadline = 0.0
        self._error: SinkError | None = None
        self._started = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._valid_keys: set[str] = set()
        self._warned: set[str] = set()

        # Writer side: the writer thread, and the spooler thread that keeps the spool current while
        # the writer waits on the network; both hold _state_lock while they touch these.
        self._state_lock = threading.RLock()
        self._spool_wake = threading.Event()
        self._spooler: threading.Thread | None = None
        self._spooler_stop = False
        self._peak_buffered = 0
        self._dropped = 0
        self._next_seq = 1
        self._unsent: deque[tuple[int, Record, int | None]] = deque()  # (seq, record, spool offset)
        self._spool_f: Any = None
        self._ack_f: Any = None
        self._spool_size = 0
        self._spill_offset: int | None = None  # spool offset to re-read unsent points from
        self._spill_end = 0  # last seq that lives only in the spool
        self._spill_low = 0  # lower bound of the first unsent spilled seq
        self._spill_skip = _spool.AckSet()
        self._dedupe_through = 0
        self._deliverer: Deliverer | None = None
        self._deferred: list[tuple[int, ArtifactRecord]] = []  # artifacts the artifact store refused
        self._failures = 0
        self._retry_at = 0.0
        self._next_send_at = 0.0
        self._served_gen = 0

    # ------------------------------------------------------------------ caller-side API

    @property
    def spool_path(self) -> Path:
        """``<spool_dir>/<run_id>.jsonl``."""
        return self._spool_path

    @property
    def buffered_records(self) -> int:
        """Records held in memory now (queued plus unsent); ``<= max_buffer_points`` after each log call."""
        return len(self._queue) + len(self._unsent)

    @property
    def peak_buffered_records(self) -> int:
        """The most unsent records ever held in memory at once by the writer (the spill keeps it <= the cap)."""
        return self._peak_buffered

    @property
    def pending_points(self) -> int:
        """Records (points, params, tags, artifacts) logged, or left by an earlier session, not yet acknowledged."""
        return self._pending

    def start(self) -> None:
        """Resolve the tracking URI, open the spool, start the writer thread, register an atexit close.

        Raises:
            SinkError: (strict mode only) the spool cannot be written.
        """
        if self._started:
            return
        if self._closed:
            raise SinkError("MlflowSink.start() after close()")
        self._uri = resolve_uri(self._tracking_uri)
        self._open_spool()
        self._seq0 = self._next_seq
        with self._cond:
            self._low_unacked = self._compute_low()
        self._next_send_at = time.monotonic() + self._flush_interval_s
        self._thread = threading.Thread(target=self._run, name="wattlog-mlflow-writer", daemon=True)
        self._spooler = threading.Thread(target=self._spool_loop, name="wattlog-mlflow-spooler", daemon=True)
        self._started = True
        self._spooler.start()
        self._thread.start()
        atexit.register(self._atexit_close)

    def log_points(self, points: Iterable[Point]) -> None:
        """Enqueue points for the writer thread (training thread; no I/O).

        Raises:
            ConfigError: (strict mode only) a key MLflow would reject; otherwise it is skipped with a warning.
            SinkError: (strict mode only) a non-finite value, or the sink is closed.
        """
        ok: list[Point] = []
        for p in points:
            if p.key not in self._valid_keys and not self._key_ok(p.key):
                continue
            v = p.value
            if type(v) is not float or type(p.step) is not int or type(p.timestamp_ms) is not int:
                v = float(v)
                p = Point(p.key, v, int(p.step), int(p.timestamp_ms))
            if not math.isfinite(v):
                self._policy("nonfinite", f"skipped non-finite value {v} of {p.key!r} at step {p.step}; "
                             "further non-finite values are skipped silently")
                continue
            ok.append(p)
        self._enqueue(ok, f"{len(ok)} points")
        if len(self._queue) + len(self._unsent) > self._max_buffer:
            self._caller_drain()

    def _caller_drain(self) -> None:
        """Hard memory cap: the spooler fell behind, so the caller moves the queue into the spool itself."""
        if not self._started or self._closed:
            return
        with self._state_lock:
            if len(self._queue) + len(self._unsent) > self._max_buffer:
                self._drain()

    def _enqueue(self, records: list[Record], what: str) -> None:
        if self._closed:
            self._policy("closed", f"{what} logged after close() were dropped")
            return
        if not records:
            return
        with self._cond:
            self._queue.extend(records)
            self._enqueued += len(records)
            self._pending += len(records)
        self._wake.set()
        self._spool_wake.set()

    def _key_ok(self, key: str, what: str = "points with invalid MLflow metric key") -> bool:
        """Check a key once: valid keys are remembered; a bad one raises in strict mode, else warns once."""
        try:
            check_key(key)
        except ConfigError:
            if strict_mode():
                raise
            self._policy(f"key:{key}", f"skipped {what} {key!r}")
            return False
        self._valid_keys.add(key)
        return True

    def log_summary_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Enqueue run-level summary metrics (e.g. ``energy/gpu_kwh``) at ``step``, like points."""
        ts_ms = int(time.time() * 1000)
        self.log_points(Point(k, float(v), int(step), ts_ms) for k, v in metrics.items())

    def flush(self, timeout_s: float | None = 30.0) -> bool:
        """Wait until every point, param, tag and artifact logged so far is acknowledged by MLflow.

        Returns:
            True if everything was delivered within ``timeout_s`` (None: wait indefinitely).

        Raises:
            SinkError: (strict mode only) a delivery failed since the last flush.
        """
        if not self._started:
            return self._pending == 0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            target = self._seq0 + self._enqueued
            self._flush_gen += 1
        self._wake.set()
        with self._cond:
            while True:
                if self._error is not None and strict_mode():
                    err, self._error = self._error, None
                    raise err
                if self._low_unacked >= target:
                    return True
                if self._thread is None or not self._thread.is_alive():
                    return False
                remaining = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)

    def close(self, timeout_s: float = 30.0) -> None:
        """Deliver what is pending (up to ``timeout_s``), stop the writer, close files. Idempotent.

        Undelivered records stay in the spool for a later run or ``wattlog sync`` (one warning).

        Raises:
            SinkError: (strict mode only) a delivery failed, or records are left undelivered.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit_close)
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._stop_deadline = time.monotonic() + max(0.0, timeout_s)
                self._flush_gen += 1
            self._wake.set()
            self._thread.join(max(0.0, timeout_s) + 2.0)
        with self._cond:
            err, self._error = self._error, None
        if err is not None and strict_mode():
            raise err
        if self._pending:
            where = (
                f"spooled at {self._spool_path}; run `wattlog sync --spool {self._spool_path}`"
                if self._spool_f is not None
                else "and the spool is unavailable, so they are lost"
            )
            if not self._started:
                where = "because the sink was never started"
            self._policy("close", f"{self._pending} records (points, params, tags, artifacts) were not "
                         f"delivered to MLflow {where}")

    def log_params(self, params: Mapping[str, object]) -> None:
        """Enqueue run params (values as str); returns at once, delivered like points.

        A param the run already holds with a different value is rejected by MLflow: one warning
        (strict mode: :class:`SinkError` from the next flush/close), never retried.

        Raises:
            ConfigError: (strict mode only) a key MLflow would reject; otherwise it is skipped with a warning.
            SinkError: (strict mode only) the sink is closed.
        """
        recs: list[Record] = [
            RunRecord("param", str(k), redact_text(str(v)))
            for k, v in params.items() if self._key_ok(str(k), "param")
        ]
        self._enqueue(recs, f"{len(recs)} params")

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Enqueue run tags (values as str); returns at once, delivered like points.

        Raises:
            ConfigError: (strict mode only) a key MLflow would reject; otherwise it is skipped with a warning.
            SinkError: (strict mode only) the sink is closed.
        """
        recs: list[Record] = [
            RunRecord("tag", str(k), redact_text(str(v))) for k, v in tags.items() if self._key_ok(str(k), "tag")
        ]
        self._enqueue(recs, f"{len(recs)} tags")

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy one file into the spool now, and upload it as a run artifact off this thread.

        The copy (``<spool_dir>/<run_id>.artifacts/<unique>/<file name>``, mode 0600) is made before
        this returns, so the caller may delete ``local_path`` right away; the upload happens on the
        writer thread, in order with the points. The copy is deleted once MLflow has the artifact.

        Args:
            local_path: an existing regular file.
            artifact_path: run-relative directory, e.g. ``"energy"``; None: the artifact root.

        Raises:
            ConfigError: (strict mode only) ``artifact_path`` is absolute or contains ``..``, or
                ``local_path`` is not a file; otherwise the artifact is skipped with a warning.
            SinkError: (strict mode only) the copy failed, or the sink is closed.
        """
        try:
            dest = _spool.check_artifact_path(artifact_path)
        except ValueError:
            self._bad_arg("artifact_path", artifact_path, "None or a relative POSIX path without '..', "
                          "e.g. 'energy'")
            return
        src = Path(local_path)
        if not src.is_file():
            self._bad_arg("local_path", os.fspath(local_path), "an existing regular file")
            return
        if self._closed:
            self._policy("closed", f"artifact {src.name} logged after close() was dropped")
            return
        try:
            rec = self._copy_artifact(src, dest)
        except OSError as exc:
            self._policy("artifact-copy", f"cannot copy artifact {src} for upload ({describe(exc)}); "
                         "it was not logged")
            return
        self._enqueue([rec], f"artifact {src.name}")

    # ------------------------------------------------------------------ helpers (caller side)

    def _copy_artifact(self, src: Path, dest: str | None) -> ArtifactRecord:
        """Copy into the spool's artifact directory; if that is not writable, into a private temp dir."""
        try:
            root = _spool.artifacts_dir(self._spool_dir, self._run_id)
            file, size = _spool.copy_artifact(src, root, self._spool_dir)
        except OSError:
            root = Path(tempfile.mkdtemp(prefix="wattlog-artifact-"))
            file, size = _spool.copy_artifact(src, root, None)
        return ArtifactRecord(file, dest, size)

    def _bad_arg(self, field: str, value: object, allowed: str) -> None:
        """A bad argument: ConfigError in strict mode, else one warning per field (the call is skipped)."""
        err = ConfigError(field, value, allowed)
        if strict_mode():
            raise err
        self._policy(f"arg:{field}", f"skipped: {err}")

    def _policy(self, kind: str, message: str) -> None:
        """Failure policy on the caller's thread: raise SinkError in strict mode, else warn once per kind."""
        message = redact_text(message)
        if strict_mode():
            raise SinkError(message) from None
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"wattlog: {message}", WattlogWarning, stacklevel=3)

    def _report(self, kind: str, message: str, once: bool = True) -> None:
        """Failure policy on the writer thread: remember the error for flush/close; warn unless strict."""
        message = redact_text(message)
        with self._cond:
            if self._error is None:
                self._error = SinkError(message)
            self._cond.notify_all()
        if strict_mode() or (once and kind in self._warned):
            return
        self._warned.add(kind)
        warnings.warn(f"wattlog: {message}", WattlogWarning, stacklevel=2)

    def _atexit_close(self) -> None:
        try:
            self.close(timeout_s=min(10.0, 2 * self._flush_interval_s + 1.0))
        except SinkError as exc:  # at exit, raising helps no one: apply the non-strict policy
            warnings.warn(f"wattlog: {exc}", WattlogWarning, stacklevel=1)

    # ------------------------------------------------------------------ spool (writer side)

    def _open_spool(self) -> None:
        path = self._spool_path
        f = ack_f = None
        try:
            _spool.ensure_dir(path.parent)
            f, size = _spool.open_append(path)
            if size == 0:
                header = _spool.header_line(self._run_id, self._uri)
                f.write(header)
                size = len(header)
            else:
                self._resume_from(path)
                if not _spool.ends_with_newline(path):
                    f.write(b"\n")  # terminate a line cut by a crash
                    size += 1
            f.flush()
            ack_f, _ = _spool.open_append(_spool.ack_file(path))
        except (OSError, ValueError) as exc:
            if f is not None:
                f.close()
            self._spill_offset, self._pending = None, len(self._queue)
            self._policy(
                "spool",
                f"cannot write the spool at {path} ({describe(exc)}); points go to MLflow directly and "
                "stay in memory until acknowledged",
            )
            return
        self._spool_f, self._ack_f, self._spool_size = f, ack_f, size

    def _resume_from(self, path: Path) -> None:
        """Continue an existing spool of this run: resend what it holds that was never acknowledged."""
        header, body_offset = _spool.read_header(path)
        if header.get("run_id") != self._run_id:
            raise ValueError(f"{path} belongs to run {header.get('run_id')!r}, not {self._run_id!r}")
        acks = _spool.read_acks(_spool.ack_file(path))
        max_seq, first, n_unacked = 0, None, 0
        for seq, _p, start, _end in _spool.iter_records_from(path, body_offset):
            max_seq = max(max_seq, seq)
            if seq not in acks:
                n_unacked += 1
                if first is None:
                    first = (seq, start)
        self._next_seq = max_seq + 1
        if first is not None:
            self._spill_low, self._spill_offset = first
            self._spill_end = max_seq
            self._spill_skip = acks
            self._dedupe_through = max_seq
            self._pending += n_unacked

    def _drain(self) -> None:
        """:meth:`_drain_locked` under ``_state_lock`` (the writer, the spooler and the caller may drain)."""
        with self._state_lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        """Move queued records into the unsent buffer, appending them to the spool first.

        Beyond ``max_buffer_points`` unsent records, the oldest ones are spilled: they live only in the
        spool and are read back when their turn comes. Without a usable spool they cannot be spilled;
        the oldest are then dropped (one warning) so that memory stays bounded.
        """
        q = self._queue
        if not q:
            return
        batch: list[Record] = []
        while q:
            try:
                batch.append(q.popleft())
            except IndexError:  # pragma: no cover - single consumer
                break
        entries: list[tuple[int, Record, int | None]] = []
        lines: list[bytes] = []
        offset = self._spool_size
        point_line, record_line = _spool.point_line, _spool.record_line
        for p in batch:
            seq = self._next_seq
            self._next_seq += 1
            line = point_line(seq, p) if type(p) is Point else record_line(seq, p)
            entries.append((seq, p, offset if self._spool_f is not None else None))
            offset += len(line)
            lines.append(line)
        if self._spool_f is not None:
            try:
                self._spool_f.write(b"".join(lines))
                self._spool_f.flush()
                self._spool_size = offset
            except OSError as exc:
                self._disable_spool(exc)
                entries = [(s, p, None) for s, p, _ in entries]
        self._unsent.extend(entries)
        dropped = 0
        while len(self._unsent) > self._max_buffer:
            seq, _p, off = self._unsent.popleft()
            if off is None:
                dropped += 1
                continue
            if self._spill_offset is None:
                self._spill_offset, self._spill_low = off, seq
            self._spill_end = seq
        self._peak_buffered = max(self._peak_buffered, len(self._unsent))
        if dropped:
            self._dropped += dropped
            with self._cond:
                self._pending -= dropped
            self._report("dropped", f"the spool at {self._spool_path} is unusable and MLflow is behind: dropped "
                         f"the oldest unsent records to keep memory under max_buffer_points="
                         f"{self._max_buffer} ({self._dropped} so far)")
        self._publish()

    def _disable_spool(self, exc: BaseException) -> None:
        self._report(
            "spool",
            f"cannot write the spool at {self._spool_path} ({describe(exc)}); records go to MLflow "
            "directly and stay in memory until acknowledged",
        )
        self._close_spool_files()
        self._spool_f = self._ack_f = None

    def _close_spool_files(self) -> None:
        for f in (self._spool_f, self._ack_f):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass

    def _write_acks(self, seqs: Iterable[int]) -> None:
        with self._state_lock:
            if self._ack_f is None:
                return
            try:
                self._ack_f.write(_spool.ack_lines(seqs))
                self._ack_f.flush()
            except OSError as exc:
                self._disable_spool(exc)

    # ------------------------------------------------------------------ sending (writer side)

    def _compute_low(self) -> int:
        if self._spill_offset is not None:
            low = self._spill_low
        elif self._unsent:
            low = self._unsent[0][0]
        else:
            low = self._next_seq
        return min(low, self._deferred[0][0]) if self._deferred else low

    def _publish(self) -> None:
        with self._state_lock, self._cond:
            self._low_unacked = self._compute_low()
            self._cond.notify_all()

    def _has_work(self) -> bool:
        return bool(self._unsent) or self._spill_offset is not None

    def _next_batch(self, force: bool) -> tuple[list[tuple[int, Record]], str, int, int] | None:
        """The next batch to send (hold _state_lock): (entries, source, spool offset after it, last seq covered)."""
        limit = min(self._batch_size, MAX_METRICS_PER_BATCH)
        if self._spill_offset is not None:
            out: list[tuple[int, Record]] = []
            next_off, last = self._spill_offset, self._spill_end
            try:
                for seq, p, _start, end in _spool.iter_records_from(self._spool_path, self._spill_offset):
                    if seq > self._spill_end:
                        break
                    next_off = end
                    if seq >= self._spill_low and seq not in self._spill_skip:
                        out.append((seq, p))
                    if seq == self._spill_end:
                        break
                    if len(out) >= limit:
                        last = seq
                        break
            except OSError as exc:
                self._spill_offset = None
                with self._cond:
                    lost = self._pending - len(self._unsent) - len(self._queue)
                    self._pending -= lost
                self._report("spool-read", f"cannot read back {lost} unsent records from the spool at "
                             f"{self._spool_path} ({describe(exc)}); they are lost", once=False)
                self._publish()
                return self._next_batch(force)
            return out, "spool", next_off, last
        if not self._unsent or (not force and len(self._unsent) < self._batch_size):
            return None
        n = min(limit, len(self._unsent))
        entries = [(self._unsent[i][0], self._unsent[i][1]) for i in range(n)]
        return entries, "memory", 0, entries[-1][0]

    def _send_ready(self, force: bool) -> bool:
        """Send batches while there is something to send. Returns False after a failed attempt."""
        while True:
            with self._state_lock:
                self._drain()
                nxt = self._next_batch(force)
            if nxt is None:
                return True
            entries, source, next_off, last = nxt
            n_deferred = 0
            if entries:  # the network call: the spooler keeps draining meanwhile, and may spill
                try:
                    n_deferred = self._deliver(entries, dedupe=entries[0][0] <= self._dedupe_through)
                except Exception as exc:
                    self._on_failure(exc, entries)
                    return False
            with self._state_lock:
                self._consume(source, next_off, last)
                self._failures = 0
                with self._cond:
                    self._pending -= len(entries) - n_deferred
                self._publish()

    def _consume(self, source: str, next_off: int, last: int) -> None:
        """Forget records up to seq ``last`` once sent (hold _state_lock).

        While a batch from memory was in flight, the spooler may have spilled some of it: the spill
        then starts at or before ``last`` and skips what was sent.
        """
        if source == "spool" and self._spill_offset is not None:
            self._spill_offset = next_off
        while self._unsent and self._unsent[0][0] <= last:
            self._unsent.popleft()
        if self._spill_offset is not None:
            self._spill_low = max(self._spill_low, last + 1)
            if self._spill_low > self._spill_end:
                self._spill_offset = None

    def _deliver(self, entries: list[tuple[int, Record]], dedupe: bool) -> int:
        """Send, ack what is settled, delete delivered artifact copies. Returns the number deferred.

        Raises:
            Exception: a transient failure (the caller backs off and retries with ``dedupe``).
        """
        if self._deliverer is None:
            self._deliverer = Deliverer(self._client_factory(self._uri), self._run_id, self._spool_dir)
        out = self._deliverer.send(entries, dedupe)
        deferred = {seq for seq, _r, _w in out.deferred}
        self._write_acks(seq for seq, _ in entries if seq not in deferred)
        for seq, rec in entries:
            if type(rec) is ArtifactRecord and seq not in deferred:
                _spool.remove_artifact_copy(rec.file, self._spool_dir, self._run_id)
        for seq, rec, why in out.rejected:
            self._report(f"rejected-{_spool.record_kind(rec)}",
                         f"MLflow rejected {describe_record(rec)} (seq {seq}): {why}; it was dropped")
        for seq, rec, why in out.deferred:
            assert isinstance(rec, ArtifactRecord)
            with self._state_lock:
                self._deferred = sorted([*self._deferred, (seq, rec)], key=lambda e: e[0])
            self._report("artifact", f"could not upload {describe_record(rec)} while MLflow answers ({why}); "
                         "it is retried at flush and close, its copy stays in the spool for `wattlog sync`")
        return len(deferred)

    def _retry_deferred(self) -> None:
        """One more try for artifacts the artifact store refused; they do not hold back other records."""
        with self._state_lock:
            todo, self._deferred = self._deferred, []
        try:
            n_left = self._deliver(list(todo), dedupe=True)
        except Exception:
            with self._state_lock:
                self._deferred = sorted([*todo, *self._deferred], key=lambda e: e[0])  # an outage: retried
            if self._deliverer is not None:
                self._deliverer.invalidate()
            return
        with self._cond:
            self._pending -= len(todo) - n_left
        self._publish()

    def _on_failure(self, exc: BaseException, entries: list[tuple[int, Record]]) -> None:
        self._failures += 1
        delay = min(self._max_backoff_s, _FIRST_BACKOFF_S * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        self._dedupe_through = max(self._dedupe_through, entries[-1][0])
        if self._deliverer is not None:
            self._deliverer.invalidate()
        if self._spool_f is not None:
            where = f"spooled at {self._spool_path}; they will be retried, or run `wattlog sync`"
        else:
            where = "kept in memory (no spool); they will be retried"
        self._report(
            "unreachable",
            f"MLflow unreachable, {self._pending} records (points, params, tags, artifacts) {where} "
            f"(tracking URI {redact_uri(self._uri)}: {describe(exc)})",
        )

    def _spool_loop(self) -> None:
        """Keep the spool current while the writer thread waits on MLflow: memory stays bounded."""
        try:
            while True:
                self._spool_wake.wait()
                self._spool_wake.clear()
                if self._spooler_stop:
                    return
                with self._state_lock:
                    self._drain()
        except BaseException as exc:  # a bug: never die silently; the writer still drains
            self._report("spooler", f"the spool writer thread stopped: {describe(exc)}", once=False)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug in the writer: never die silently
            self._report("writer", f"the MLflow writer thread stopped: {describe(exc)}", once=False)
        finally:
            self._spooler_stop = True
            self._spool_wake.set()
            if self._spooler is not None:
                self._spooler.join(5.0)
            with self._state_lock:
                try:
                    self._drain()  # whatever is still queued goes to the spool for `wattlog sync`
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass
                self._close_spool_files()
            with self._cond:
                self._cond.notify_all()

    def _loop(self) -> None:
        timeout: float | None = self._flush_interval_s
        while True:
            self._wake.wait(timeout)
            self._wake.clear()
            self._drain()
            now = time.monotonic()
            with self._cond:
                stopping, deadline, gen = self._stopping, self._stop_deadline, self._flush_gen
            flush_req = gen != self._served_gen
            self._served_gen = gen
            interval_due = now >= self._next_send_at
            if interval_due:
                self._next_send_at = now + self._flush_interval_s
            if self._has_work() and (now >= self._retry_at or flush_req):
                force = flush_req or stopping or interval_due or self._failures > 0
                if force or len(self._unsent) >= self._batch_size:
                    self._send_ready(force)
            if flush_req and self._deferred and not self._failures:
                self._retry_deferred()
            now = time.monotonic()
            if stopping and (now >= deadline or (not self._has_work() and not self._queue)):
                return
            wake_at = self._next_send_at
            if self._failures and self._has_work():
                wake_at = self._retry_at
            if stopping:
                wake_at = min(wake_at, deadline)
            timeout = max(0.0, wake_at - now)
