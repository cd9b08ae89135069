"""The delivery process: follows one run's spool and writes it to MLflow (``python -m wattlog.sinks.deliver``).

The training process only appends to the spool (see :mod:`wattlog.sinks.mlflow`); this process,
its child, reads new lines, sends them in order with :class:`~wattlog.sinks.sync.Deliverer` (the
code `wattlog sync` uses) and records acknowledgements in the ack file. Live delivery and outage
recovery are one code path. Its MLflow client has a short request timeout and no retry loop of its
own (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, set in this process only, so the user's ``MLFlowLogger``
is untouched); this loop retries instead, with backoff, in order, for as long as it runs.

Errors are classified:

- transient (connection refused, timeout, HTTP 429/5xx, a locked or unreachable store): retried;
- permanent (``RESOURCE_DOES_NOT_EXIST``, ``PERMISSION_DENIED``, ``INVALID_STATE``...): reported once;
  the records stay in the spool for ``wattlog sync`` (a deleted run can be restored);
- anything else is a bug: reported once and retried like a transient error.

Protocol with the parent (one line each): stdin ``wake`` (new records), ``close <seconds>`` (deliver
what is left within that time, then exit), end of file (the parent exited or died: the same, with
the default timeout). Stdout: one JSON object per report, ``{"kind": ..., "message": ...}``; the
parent turns reports into warnings (or errors in strict mode). One more line, kind ``ready``, comes
just before the first send: until then this process has sent nothing, so a parent that takes delivery
over (the flush of a stage shorter than this process's start-up, see :class:`~wattlog.sinks.mlflow.MlflowSink`)
knows that the acks are complete. Exit code 0: everything delivered; 3: records left in the spool
(``wattlog sync`` delivers them).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wattlog.sinks import spool as _spool
from wattlog.sinks.sync import MAX_METRICS_PER_BATCH, Deliverer, default_client_factory, describe, describe_record

URI_ENV = "WATTLOG_DELIVERY_URI"
"""The tracking URI reaches the child through its environment, never its command line (``ps``)."""
DEFAULT_EXIT_TIMEOUT_S = 30.0
BACKLOG_WARNING = 20_000
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                    "ABORTED", "RESOURCE_EXHAUSTED"}
_PERMANENT_CODES = {"RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_STATE",
                    "ENDPOINT_NOT_FOUND", "FEATURE_DISABLED", "BAD_REQUEST"}


def classify(exc: BaseException) -> str:
    """``"transient"``, ``"permanent"`` or ``"bug"`` for an exception raised by a delivery attempt."""
    from wattlog.errors import SinkError

    if isinstance(exc, SinkError):  # Deliverer: the run is deleted (not active); kept until it is restored
        return "permanent"
    code = getattr(exc, "error_code", None)
    if code in _PERMANENT_CODES:
        return "permanent"
    if code in _TRANSIENT_CODES:
        return "transient"
    status = getattr(getattr(exc, "response", None), "status_code", None) or getattr(exc, "status_code", None)
    if isinstance(status, int):
        return "transient" if status == 429 or status >= 500 else "permanent"
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"ConnectionError", "Timeout", "TimeoutError", "OSError", "OperationalError", "MaxRetryError",
                "ProtocolError", "ChunkedEncodingError", "DisconnectedError"}:
        return "transient"
    text = str(exc).lower()
    if any(s in text for s in ("connection", "timed out", "timeout", "max retries", "temporarily",
                               "database is locked", "unavailable", "refused", "too many")):
        return "transient"
    return "bug"


class Follower:
    """Delivers one spool file, following it as it grows.

    Args:
        path: the spool file.
        tracking_uri: where to send.
        client_factory: ``uri -> MlflowClient``-like (tests pass fakes and run it in-process).
        report: ``(kind, message)`` for each reportable event (at most once per kind and cause).
        on_ack: called after each acknowledgement is written.
        on_ready: called once, just before the first send.
        dedupe: de-duplicate the first send against the run; default: when the ack file has history
            (acks may have been lost in a crash).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        tracking_uri: str,
        client_factory: Callable[[str], Any] = default_client_factory,
        report: Callable[[str, str], None] | None = None,
        max_backoff_s: float = 5.0,
        on_ack: Callable[[], None] | None = None,
        on_ready: Callable[[], None] | None = None,
        dedupe: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.uri = tracking_uri
        self._factory = client_factory
        self._report_fn = report or (lambda kind, message: None)
        self._on_ack = on_ack
        self._on_ready = on_ready
        self._max_backoff_s = max_backoff_s
        self._header, self._offset = _spool.read_header(self.path)
        self.run_id = str(self._header["run_id"])
        self._acks = _spool.read_acks(_spool.ack_file(self.path))
        self._pending: list[tuple[int, Any]] = []
        self._deliverer: Deliverer | None = None
        self._dedupe = bool(self._acks.ranges) if dedupe is None else dedupe
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._reported: set[str] = set()
        self._ack_f: Any = None
        self.sent = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def poll(self) -> int:
        """Read the complete lines appended since the last poll; returns the number of new records."""
        n = 0
        for seq, rec, _start, end in _spool.iter_records_from(self.path, self._offset):
            self._offset = end
            if seq not in self._acks:
                self._pending.append((seq, rec))
                n += 1
        if n and len(self._pending) > BACKLOG_WARNING:
            self._report("backlog", f"{len(self._pending)} records are waiting for MLflow at {_spool.redact_uri(self.uri)}"
                         f"; they are safe in {self.path}")
        return n

    def deliver(self) -> bool:
        """Send one batch of pending records (at most 1000) if the backoff allows; True on progress."""
        if not self._pending or time.monotonic() < self._retry_at:
            return False
        chunk = self._pending[:MAX_METRICS_PER_BATCH]
        try:
            if self._deliverer is None:
                self._deliverer = Deliverer(self._factory(self.uri), self.run_id, self.path.parent.absolute())
            if self._on_ready is not None:
                ready, self._on_ready = self._on_ready, None
                ready()
            outcome = self._deliverer.send(chunk, dedupe=self._dedupe)
        except Exception as exc:  # noqa: BLE001 - classified below; delivery never stops by itself
            self._failed(exc)
            return False
        deferred = {seq for seq, _r, _w in outcome.deferred}
        done = [(seq, r) for seq, r in chunk if seq not in deferred]
        for seq, rec, why in outcome.rejected[:3]:  # reported before the ack, so a flush sees the report
            self._report(f"rejected:{seq}", f"MLflow rejected {describe_record(rec)}: {why}; dropped")
        for seq, rec, why in outcome.deferred[:3]:
            self._report(f"deferred:{seq}", f"MLflow could not store {describe_record(rec)}: {why}; kept for "
                         "`wattlog sync`")
        self._ack([seq for seq, _ in done])
        for _seq, rec in done:
            if isinstance(rec, _spool.ArtifactRecord):
                _spool.remove_artifact_copy(rec.file, self.path.parent.absolute(), self.run_id)
        self._pending = self._pending[len(chunk):]  # deferred artifacts stay unacked for `wattlog sync`
        self.sent += len(done)
        if self._backoff_s:
            self._report("recovered", f"MLflow at {_spool.redact_uri(self.uri)} answers again; delivering the backlog")
            self._reported.discard("outage")
        self._dedupe = False
        self._backoff_s = 0.0
        self._retry_at = 0.0
        return True

    def _failed(self, exc: BaseException) -> None:
        kind = classify(exc)
        self.failures += 1
        self._dedupe = True  # the outcome is unknown: the next attempt skips what MLflow already holds
        if self._deliverer is not None:
            self._deliverer.invalidate()
        if kind == "permanent":
            self._deliverer = None
            self._backoff_s = self._max_backoff_s * 6
            self._report("permanent", f"MLflow refuses run {self.run_id} ({describe(exc)}); its records stay in "
                         f"{self.path} for `wattlog sync --spool {self.path}`")
        else:
            self._backoff_s = min(self._max_backoff_s, max(0.25, 2 * self._backoff_s))
            if kind == "bug":
                self._report("bug", f"unexpected delivery error ({describe(exc)}); retrying")
            else:
                self._report("outage", f"MLflow at {_spool.redact_uri(self.uri)} is unreachable ({describe(exc)}); "
                             f"records are kept in {self.path} and sent when it returns")
        self._retry_at = time.monotonic() + self._backoff_s

    def _ack(self, seqs: list[int]) -> None:
        if not seqs:
            return
        if self._ack_f is None:
            self._ack_f, _ = _spool.open_append(_spool.ack_file(self.path))
        self._ack_f.write(_spool.ack_lines(seqs))
        self._ack_f.flush()
        for a, b in _spool.seq_ranges(seqs):
            self._acks.add(a, b)
        if self._on_ack is not None:
            self._on_ack()

    def _report(self, kind: str, message: str) -> None:
        if kind in self._reported:
            return
        self._reported.add(kind)
        self._report_fn(kind.split(":")[0], _spool.redact_text(message))

    def close(self) -> None:
        if self._ack_f is not None:
            self._ack_f.close()
            self._ack_f = None


class InProcessDelivery:
    """A :class:`Follower` run on the caller's thread, for a sink that took delivery over from its
    process (:class:`~wattlog.sinks.mlflow.MlflowSink`): reports are held during each send and handed
    to ``report(kind, message)`` after it, which may raise (strict mode) without breaking the follower."""

    def __init__(self, path: str | os.PathLike[str], tracking_uri: str, report: Callable[[str, str], None],
                 dedupe: bool | None = None) -> None:
        self._held: list[tuple[str, str]] = []
        self._report = report
        self._follower = Follower(path, tracking_uri, report=lambda kind, message: self._held.append((kind, message)),
                                  dedupe=dedupe)

    def deliver_until(self, deadline: float | None) -> bool:
        """Send until nothing is pending (True) or ``deadline`` (``time.monotonic()``) passes (False)."""
        while True:
            self._follower.poll()
            done = self._follower.pending == 0
            progressed = False if done else self._follower.deliver()
            held, self._held = self._held, []
            for kind, message in held:
                self._report(kind, message)
            if done:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if not progressed:
                time.sleep(0.05)  # a backoff after a failed send

    def close(self) -> None:
        self._follower.close()


def follow(follower: Follower, commands: Any, poll_interval_s: float = 0.2) -> int:
    """Deliver until told to close (or the parent is gone) and caught up, or the close timeout passes.

    Args:
        follower: the spool to deliver.
        commands: a binary file object of parent commands (the child's stdin).

    Returns:
        0 when everything was delivered, 3 when records are left in the spool.
    """
    deadline: float | None = None
    fd = commands.fileno()
    buf = b""
    while True:
        follower.poll()
        progressed = follower.deliver()
        if deadline is not None:
            if follower.pending == 0:
                follower.poll()
                if follower.pending == 0:
                    return 0
            if time.monotonic() >= deadline:
                return 3
        if progressed and follower.pending:
            wait_s = 0.0  # busy: only look for a command, then send the next batch
        elif deadline is None:
            wait_s = poll_interval_s
        else:
            wait_s = min(poll_interval_s, max(0.0, deadline - time.monotonic()))
        ready, _, _ = select.select([fd] if deadline is None else [], [], [], wait_s)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:  # the parent closed our stdin or died
                deadline = time.monotonic() + DEFAULT_EXIT_TIMEOUT_S
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b"close"):
                    parts = line.split()
                    timeout_s = float(parts[1]) if len(parts) > 1 else DEFAULT_EXIT_TIMEOUT_S
                    deadline = time.monotonic() + max(0.0, timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wattlog.sinks.deliver", description=__doc__.splitlines()[0])
    parser.add_argument("--spool", required=True)
    parser.add_argument("--poll-interval-s", type=float, default=0.2)
    args = parser.parse_args(argv)
    uri = os.environ.pop(URI_ENV, "")
    out = sys.stdout

    def tell(line: str) -> None:
        try:
            out.write(line)
            out.flush()
        except OSError:  # the parent is gone: nobody reads reports any more; delivery goes on
            pass

    def report(kind: str, message: str) -> None:
        tell(json.dumps({"kind": kind, "message": message}) + "\n")

    def acked() -> None:  # an empty line: a waiting flush() wakes at once and reads the ack file
        tell("\n")

    def ready() -> None:  # nothing sent yet: a parent that takes over from here duplicates nothing
        report("ready", "")

    try:
        follower = Follower(args.spool, uri, report=report, on_ack=acked, on_ready=ready)
    except (OSError, ValueError) as exc:
        report("spool", f"cannot read the spool {args.spool}: {exc}")
        return 2
    try:
        code = follow(follower, sys.stdin.buffer, args.poll_interval_s)
    except KeyboardInterrupt:
        code = 3
    finally:
        follower.close()
    if code == 3:
        report("left", f"{follower.pending} records were not delivered to MLflow; they are in {args.spool}: "
               f"run `wattlog sync --spool {args.spool}`")
    return code


if __name__ == "__main__":
    try:
        os.nice(10)  # the training process comes first; delivery has all the time it needs
    except OSError:
        pass
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    exit_code = main()
    try:
        sys.stdout.flush()
    except OSError:  # the parent is gone (a broken pipe)
        pass
    os._exit(exit_code)  # acks are flushed and closed: skip MLflow's and SQLAlchemy's interpreter teardown
