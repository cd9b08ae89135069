"""MlflowSink: the training process appends to a local spool; a child process delivers it to MLflow.

The spool (``<spool_dir>/<run_id>.jsonl``, mode 0600 in a 0700 directory, see
:mod:`wattlog.sinks.spool`) is the one channel. :meth:`MlflowSink.log_points`, ``log_params``,
``set_tags`` and ``log_artifact`` validate cheaply and append lines on the caller's thread
(microseconds; artifacts are copied into the spool first, so the caller may delete them at once).
No MLflow client, no network and no thread in the training process: the delivery process
(:mod:`wattlog.sinks.deliver`, started by :meth:`~MlflowSink.start`) follows the spool, sends in
order with ``log_batch``, survives outages, and exits when the sink is closed or its parent dies.

One exception, for short stages: importing mlflow and opening the store takes the delivery process
~2.5 s, so a stage shorter than that would wait for it at its final flush. When :meth:`~MlflowSink.flush`
finds the process not yet ready (it has sent nothing), the store local (sqlite, a file store: a
server's or a database's client retries for minutes when it is down) and mlflow already imported here,
the sink takes delivery over: it stops the process and delivers from the spool itself, on the flushing thread and,
until :meth:`~MlflowSink.close`, on the closing one (the same follower code, acks and de-duplication).
A next stage that takes such a sink over (:mod:`wattlog.finisher`) starts a delivery process again.
Whatever it could not deliver in time stays in the spool for ``wattlog sync`` (exactly once: acks
plus de-duplication against the run).

Failure policy (DESIGN.md): the delivery process's reports become one warning each on the caller's
thread at :meth:`~MlflowSink.flush` / :meth:`~MlflowSink.close`; under ``WATTLOG_STRICT=1`` they
raise :class:`~wattlog.errors.SinkError` there instead. Non-finite values and keys MLflow would
reject are skipped with one warning (strict mode: raised at the call).
"""

from __future__ import annotations

import errno
import json
import math
import os
import posixpath
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from wattlog.errors import ConfigError, SinkError, WattlogWarning, strict_mode
from wattlog.helper_processes import HelperProcess
from wattlog.sinks import spool as _spool
from wattlog.sinks.deliver import URI_ENV, InProcessDelivery
from wattlog.sinks.spool import ArtifactRecord, Point, Record, RunRecord, default_spool_dir, redact_text, redact_uri
from wattlog.sinks.sync import SyncResult, describe, register_cli, resolve_uri, sync

__all__ = ["MlflowSink", "Point", "SyncResult", "check_key", "default_spool_dir", "redact_uri", "register_cli", "sync"]

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
    """Writes points, params, tags and artifacts of one MLflow run through a spool and a delivery process.

    Args:
        run_id: the MLflow run to log into.
        tracking_uri: MLflow tracking URI; None means MLflow's default, resolved at :meth:`start`.
        spool_dir: where the spool lives; default :func:`default_spool_dir`.
        deliver: start the delivery process (False: only spool, for ``wattlog sync`` later).
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        *,
        deliver: bool = True,
    ) -> None:
        if not _spool.valid_run_id(run_id):
            raise ConfigError("run_id", run_id, "an MLflow run id: 1-256 of [A-Za-z0-9_-], not starting with "
                              "'_' or '-'")
        self.run_id = run_id
        self._tracking_uri = tracking_uri
        self._uri = tracking_uri or ""
        self._spool_dir = Path(spool_dir or default_spool_dir()).absolute()
        self._deliver = deliver
        self._fd: int | None = None
        self._next_seq = 1
        self._proc: subprocess.Popen[bytes] | None = None
        self._valid_keys: set[str] = set()
        self._warned: set[str] = set()
        self._reports: list[tuple[str, str]] = []
        self._report_buf = b""
        self._closed = False
        self._child_ready = False  # the delivery process said "ready" (it may have sent something)
        self._here: InProcessDelivery | None = None  # delivery taken over (see the module docstring)
        self._append_lock = threading.Lock()  # a finishing stage's chart thread appends too (wattlog.finisher)

    @property
    def destination(self) -> tuple[str, str, str, str]:
        """Where it writes: two sinks with the same destination share one spool (wattlog.finisher)."""
        return ("mlflow", self.run_id, str(self._spool_dir), self._tracking_uri or "")

    @property
    def spool_path(self) -> Path:
        """``<spool_dir>/<run_id>.jsonl``."""
        return _spool.spool_file(self._spool_dir, self.run_id)

    @property
    def delivery_pid(self) -> int | None:
        """The delivery process's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Resolve the tracking URI, open the spool and start the delivery process. Idempotent.

        Raises:
            SinkError: (strict mode only) the spool cannot be written where asked (a private
                temporary spool is used otherwise).
        """
        if self._fd is not None:
            if self._here is not None and self._deliver:  # a next stage took this sink over: it may be long
                self._here.close()
                self._here, self._child_ready = None, False
                self._spawn()  # the ack file has history: its first send de-duplicates
            return
        if self._closed:
            raise SinkError("MlflowSink.start() after close()")
        self._uri = resolve_uri(self._tracking_uri)
        try:
            self._open_spool()
        except (OSError, ValueError) as exc:
            self._policy("spool", f"cannot write the spool in {self._spool_dir} ({describe(exc)}); "
                         "using a private temporary spool instead")
            self._spool_dir = Path(tempfile.mkdtemp(prefix="wattlog-spool-"))
            self._open_spool()
        if self._deliver:
            self._spawn()

    def _open_spool(self) -> None:
        path = self.spool_path
        _spool.ensure_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                os.write(fd, _spool.header_line(self.run_id, self._uri))
            else:
                header, body_offset = _spool.read_header(path)
                if header.get("run_id") != self.run_id:
                    raise ValueError(f"{path} belongs to run {header.get('run_id')!r}")
                last = max((seq for seq, _r, _s, _e in _spool.iter_records_from(path, body_offset)), default=0)
                self._next_seq = last + 1
                if not _spool.ends_with_newline(path):
                    os.write(fd, b"\n")  # terminate a line cut by a crash
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _spawn(self) -> None:
        env = dict(os.environ)
        env[URI_ENV] = self._uri
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # the follower retries, in order, with its own backoff
        env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = env.get("WATTLOG_DELIVERY_REQUEST_TIMEOUT_S", "5")
        self._proc = HelperProcess(
            [sys.executable, "-m", "wattlog.sinks.deliver", "--spool", str(self.spool_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)

    def flush(self, timeout_s: float | None = 30.0) -> bool:
        """Wait until MLflow has acknowledged every record logged so far (at most ``timeout_s``).

        Returns:
            True when everything is delivered.

        Raises:
            SinkError: (strict mode only) the delivery process reported a failure.
        """
        if self._fd is None:
            return True
        target = self._next_seq - 1
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._read_reports()
        if self._here is None and self._proc is not None and not self._child_ready and self._can_take_over():
            self._take_over()
        if self._here is not None:
            return self._here.deliver_until(deadline) and self._delivered_through(target)
        self._tell(b"wake\n")
        while True:
            self._read_reports()
            if self._delivered_through(target):
                self._read_reports()  # a report written just before its ack
                return True
            if self._proc is None or self._proc.poll() is not None:
                self._read_reports()
                return self._delivered_through(target)
            if deadline is not None and time.monotonic() >= deadline:
                return False
            # the child writes a line after each ack (an empty one, or a report): wake on it
            select.select([self._proc.stdout], [], [], 0.05)

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Let the delivery process finish (at most ``timeout_s``), then close the spool. Idempotent.

        Undelivered records stay in the spool: one warning with the ``wattlog sync`` command.

        Raises:
            SinkError: (strict mode only) a delivery failure, or records left undelivered.
        """
        if self._closed:
            return
        self._closed = True
        timeout_s = 30.0 if timeout_s is None else max(0.0, timeout_s)
        left = False
        if self._here is not None:
            try:
                left = not (self._here.deliver_until(time.monotonic() + timeout_s)
                            and self._delivered_through(self._next_seq - 1))
            finally:
                self._here.close()
                self._here = None
                self._close_fd()
        elif self._proc is not None:
            self._tell(f"close {timeout_s}\n".encode())
            try:
                self._proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                self._proc.wait(timeout_s + 15.0)  # + the child's own start-up (importing mlflow)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            try:
                self._read_reports(final=True)  # strict mode: may raise; release everything first
            finally:
                left = self._proc.returncode != 0
                self._proc.stdout.close()  # type: ignore[union-attr]
                self._proc = None
                self._close_fd()
        elif self._fd is not None and self._deliver:
            left = True
        self._close_fd()
        if left and not any(kind == "left" for kind, _ in self._reports):
            self._policy("left", f"records were not delivered to MLflow; they are in {self.spool_path}: "
                         f"run `wattlog sync --spool {self.spool_path}`")

    # ------------------------------------------------------------------ records (caller's thread)

    def log_points(self, points: Iterable[Point]) -> None:
        """Append points to the spool.

        Raises:
            ConfigError: (strict mode only) a key MLflow would reject; otherwise it is skipped with a warning.
            SinkError: (strict mode only) a non-finite value, or the sink is closed.
        """
        ok: list[Record] = []
        for p in points:
            if p.key not in self._valid_keys and not self._key_ok(p.key):
                continue
            v = float(p.value)
            if not math.isfinite(v):
                self._policy("nonfinite", f"skipped non-finite value {v} of {p.key!r} at step {p.step}; "
                             "further non-finite values are skipped silently")
                continue
            ok.append(Point(p.key, v, int(p.step), int(p.timestamp_ms)))
        self._append(ok, f"{len(ok)} points")

    def log_summary_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Run-level summary metrics at ``step``, like points."""
        ts_ms = int(time.time() * 1000)
        self.log_points(Point(k, float(v), int(step), ts_ms) for k, v in metrics.items())

    def log_params(self, params: Mapping[str, object]) -> None:
        """Append params (values as str, redacted); a conflicting value is rejected by MLflow (one warning)."""
        self._append([RunRecord("param", str(k), redact_text(str(v)))
                      for k, v in params.items() if self._key_ok(str(k), "param")], "params")

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Append tags (values as str, redacted)."""
        self._append([RunRecord("tag", str(k), redact_text(str(v)))
                      for k, v in tags.items() if self._key_ok(str(k), "tag")], "tags")

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy one file into the spool now; the delivery process uploads it in order with the points.

        Raises:
            ConfigError: (strict mode only) ``artifact_path`` is absolute or contains ``..``, or
                ``local_path`` is not a file; otherwise the artifact is skipped with a warning.
        """
        try:
            dest = _spool.check_artifact_path(artifact_path)
        except ValueError:
            self._bad_arg("artifact_path", artifact_path, "None or a relative POSIX path without '..', e.g. 'energy'")
            return
        src = Path(local_path)
        if not src.is_file():
            self._bad_arg("local_path", os.fspath(local_path), "an existing regular file")
            return
        try:
            root = _spool.artifacts_dir(self._spool_dir, self.run_id)
            file, size = _spool.copy_artifact(src, root, self._spool_dir)
        except OSError as exc:
            self._policy("artifact-copy", f"cannot copy artifact {src} for upload ({describe(exc)}); it was not logged")
            return
        self._append([ArtifactRecord(file, dest, size)], f"artifact {src.name}")

    def logged_values(self, key: str, after_step: int) -> dict[int, float]:
        """Values of ``key`` this run's spool holds at steps ``>= after_step`` (what earlier attempts logged)."""
        path = self.spool_path
        if not path.exists():
            return {}
        try:
            _header, offset = _spool.read_header(path)
            return {p.step: p.value for _seq, p, _s, _e in _spool.iter_points_from(path, offset)
                    if p.key == key and p.step >= after_step}
        except (OSError, ValueError) as exc:
            self._policy("resume-read", f"cannot read the spool {path} ({exc}); re-run steps may get two points")
            return {}

    # ------------------------------------------------------------------ helpers

    def _append(self, records: list[Record], what: str) -> None:
        if not records:
            return
        with self._append_lock:
            self._append_locked(records, what)

    def _append_locked(self, records: list[Record], what: str) -> None:
        if self._closed or self._fd is None:
            self._policy("closed", f"{what} logged while the sink is not open were dropped")
            return
        lines = [_spool.record_line(self._next_seq + i, rec) for i, rec in enumerate(records)]
        data = b"".join(lines)
        err: OSError | None = None
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            written, err = 0, exc
        if err is None and written < len(data):
            err = OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        done = used = 0  # records whose line was written whole keep their seq
        for line in lines:
            if used + len(line) > written:
                break
            used += len(line)
            done += 1
        self._next_seq += done
        if err is not None:
            if used < written:  # end the cut line, so that the next record stays readable
                try:
                    os.write(self._fd, b"\n")
                except OSError:
                    pass
            self._policy("spool-write", f"cannot write the spool {self.spool_path} ({describe(err)}); "
                         f"{len(records) - done} records were not recorded (further failures are not reported)")

    def _close_fd(self) -> None:
        with self._append_lock:  # never under a concurrent append (a finishing stage's chart)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _tell(self, line: bytes) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except (OSError, ValueError):  # the child exited: close() reports what is left
            pass

    def _delivered_through(self, seq: int) -> bool:
        """Every record with a sequence number up to ``seq`` (earlier sessions' too) is acknowledged."""
        acks = _spool.read_acks(_spool.ack_file(self.spool_path))
        return seq < 1 or any(a <= 1 and b >= seq for a, b in acks.ranges)

    def _read_reports(self, final: bool = False) -> None:
        if self._proc is None or self._proc.stdout is None:
            return
        try:
            chunk = self._proc.stdout.read() or b""
        except (OSError, ValueError):
            chunk = b""
        self._report_buf += chunk
        *lines, self._report_buf = self._report_buf.split(b"\n")
        for line in lines:
            try:
                obj = json.loads(line)
                kind, message = str(obj["kind"]), str(obj["message"])
            except (ValueError, KeyError, TypeError):
                continue
            if kind == "ready":
                self._child_ready = True
                continue
            self._report(kind, message)

    def _report(self, kind: str, message: str) -> None:
        self._reports.append((kind, message))
        if kind != "recovered":
            self._policy(kind, message)

    # ------------------------------------------------------------------ delivery taken over (short stages)

    def _can_take_over(self) -> bool:
        """A store this process reaches without network retries: sqlite, a file store or a plain path
        (a server's or a database's client retries for minutes when it is down)."""
        scheme = self._uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", self._uri) else ""
        plain_path = scheme == "" and not self._uri.lower().startswith("databricks")  # "databricks": a profile
        return "mlflow" in sys.modules and (plain_path or scheme in {"sqlite", "file"})

    def _take_over(self) -> None:
        """Stop the delivery process (still starting up) and follow the spool here from now on."""
        proc = self._proc
        assert proc is not None
        proc.kill()
        proc.wait()
        try:
            self._read_reports()  # its last lines: "ready" if it got as far as sending
        finally:
            self._proc = None
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()  # type: ignore[union-attr]
                except OSError:
                    pass
        self._here = InProcessDelivery(self.spool_path, self._uri, self._report,
                                       dedupe=True if self._child_ready else None)

    def _key_ok(self, key: str, what: str = "points with invalid MLflow metric key") -> bool:
        try:
            check_key(key)
        except ConfigError:
            if strict_mode():
                raise
            self._policy(f"key:{key}", f"skipped {what} {key!r}")
            return False
        self._valid_keys.add(key)
        return True

    def _bad_arg(self, field: str, value: object, allowed: str) -> None:
        err = ConfigError(field, value, allowed)
        if strict_mode():
            raise err
        self._policy(f"arg:{field}", f"skipped: {err}")

    def _policy(self, kind: str, message: str) -> None:
        """Failure policy on the caller's thread: SinkError in strict mode, else one warning per kind."""
        message = redact_text(message)
        if strict_mode():
            raise SinkError(message) from None
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"wattlog: {message}", WattlogWarning, stacklevel=3)

