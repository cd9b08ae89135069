"""Delivery of spooled records to one MLflow run, shared by the sink's writer thread and `wattlog sync`.

Records (metric points, params, tags, artifacts) go out in spool order; consecutive records of one kind
share a request. With ``dedupe``, what MLflow already holds is skipped, so a retry after a send whose
outcome is unknown, or a replay after a lost ack, never duplicates anything:

- points: same key, step, timestamp and value in the metric history;
- params: the run already has the same value; a *different* value is a permanent conflict (rejected);
- tags: set again (idempotent);
- artifacts: a file with the same run path and size is listed by ``list_artifacts``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import posixpath
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wattlog.errors import SinkError, WattlogWarning
from wattlog.sinks import spool as _spool
from wattlog.sinks.spool import ArtifactRecord, Point, Record, RunRecord, redact_text, redact_uri

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_TAGS_PER_BATCH = 100  # MLflow's log_batch limit for params and for tags
KINDS = ("point", "param", "tag", "artifact")

ClientFactory = Callable[[str], Any]
Entry = tuple[int, Record]  # (seq, record)
Problem = tuple[int, Record, str]  # (seq, record, why)


@dataclass(frozen=True)
class SyncResult:
    """What :func:`sync` did.

    Attributes:
        sent: records sent (points, params, tags and artifacts); ``sent_by_kind`` splits it.
        skipped: records MLflow already had.
        files: spool files read.
        rejected: records MLflow refused for good (e.g. a param conflicting with the run's value); acked.
        deferred: artifacts whose upload failed while the server answered; kept for the next sync.
        sent_by_kind: ``{"point": n, "param": n, "tag": n, "artifact": n}``.
        unreadable: spool lines that could not be read (malformed, of an unknown type, or cut by a
            crash), skipped.
        failed: spool files that could not be delivered (kept as they are; see ``problems``).
        problems: each spool file that failed or was skipped (not a wattlog spool), with the reason.
    """

    sent: int
    skipped: int
    files: int
    rejected: int = 0
    deferred: int = 0
    sent_by_kind: dict[str, int] = field(default_factory=dict)
    unreadable: int = 0
    failed: int = 0
    problems: list[SpoolProblem] = field(default_factory=list)


@dataclass
class Outcome:
    """Result of :meth:`Deliverer.send`."""

    sent: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    rejected: list[Problem] = field(default_factory=list)
    deferred: list[Problem] = field(default_factory=list)


def default_client_factory(tracking_uri: str) -> Any:
    """``MlflowClient(tracking_uri)`` (imports mlflow lazily)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def resolve_uri(tracking_uri: str | None) -> str:
    """``tracking_uri`` or MLflow's default tracking URI."""
    if tracking_uri:
        return tracking_uri
    import mlflow

    return mlflow.get_tracking_uri()


def is_permanent(exc: BaseException) -> bool:
    """A 4xx-style rejection of the request's content (not of the connection or the server)."""
    return getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE"


def describe(exc: BaseException) -> str:
    """One redacted line: exception type and the start of its message."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:300] + "..."
    return redact_text(f"{type(exc).__name__}: {first}")


def describe_record(rec: Record) -> str:
    """Short human description of a record, for warnings."""
    if type(rec) is Point:
        return f"{rec.key}={rec.value} at step {rec.step}"
    if type(rec) is RunRecord:
        return f"{rec.kind} {rec.key}={rec.value[:100]!r}"
    assert isinstance(rec, ArtifactRecord)
    return f"artifact {rec.dest}"


class Deliverer:
    """Sends records to one run; de-duplicates on request; isolates permanent rejections by bisection.

    Args:
        client: an ``MlflowClient``-like object.
        run_id: the run.
        spool_dir: directory that relative artifact-copy paths are resolved against.
    """

    def __init__(self, client: Any, run_id: str, spool_dir: Path | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.spool_dir = spool_dir
        self._history: dict[str, set[tuple[int, int, float]]] = {}
        self._params: dict[str, str] | None = None
        self._artifacts: dict[str, dict[str, int | None]] = {}

    def invalidate(self) -> None:
        """Forget cached run state (after a send whose outcome is unknown)."""
        self._history.clear()
        self._params = None
        self._artifacts.clear()

    def send(self, entries: Sequence[Entry], dedupe: bool) -> Outcome:
        """Send ``entries`` in order.

        Raises:
            Exception: any transient failure (nothing about the outcome can be assumed).
        """
        out = Outcome()
        state = {"run_checked": False}
        for kind, group in itertools.groupby(entries, key=lambda e: _spool.record_kind(e[1])):
            todo = list(group)
            if kind == "artifact":
                for seq, rec in todo:
                    assert isinstance(rec, ArtifactRecord)
                    self._send_artifact(seq, rec, dedupe, out)
                continue
            if kind == "point" and dedupe:
                todo = self._unseen_points(todo, out)
            elif kind == "param":
                todo = self._new_params(todo, out)
            limit = MAX_METRICS_PER_BATCH if kind == "point" else MAX_PARAMS_TAGS_PER_BATCH
            for chunk in _chunks(todo, limit, unique_keys=kind != "point"):
                n_rejected = len(out.rejected)
                self._send_chunk(kind, chunk, out.rejected, state)
                out.sent[kind] += len(chunk) - (len(out.rejected) - n_rejected)
        return out

    # -- points and params: what MLflow already has

    def _unseen_points(self, entries: list[Entry], out: Outcome) -> list[Entry]:
        todo = []
        for seq, p in entries:
            assert type(p) is Point
            known = self._history.get(p.key)
            if known is None:
                history = self.client.get_metric_history(self.run_id, p.key)
                known = {(int(m.step), int(m.timestamp), float(m.value)) for m in history}
                self._history[p.key] = known
            ident = (p.step, p.timestamp_ms, p.value)
            if ident in known:
                out.skipped += 1  # MLflow has it, or an earlier record of this send is the same point
            else:
                known.add(ident)  # what the run will hold if this send succeeds (invalidate() on failure)
                todo.append((seq, p))
        return todo

    def _new_params(self, entries: list[Entry], out: Outcome) -> list[Entry]:
        """Params the run lacks; same value: skipped; different value: rejected (MLflow forbids changes)."""
        if self._params is None:
            self._params = dict(self.client.get_run(self.run_id).data.params)
        todo, planned = [], dict(self._params)
        for seq, rec in entries:
            assert type(rec) is RunRecord
            have = planned.get(rec.key)
            if have is None:
                planned[rec.key] = rec.value
                todo.append((seq, rec))
            elif have == rec.value:
                out.skipped += 1
            else:
                out.rejected.append((seq, rec, f"conflict: the run already has {rec.key}={have[:100]!r} "
                                               "and MLflow params cannot change"))
        self._params = planned  # what the run will hold if this send succeeds (dropped on failure)
        return todo

    # -- sending

    def _send_chunk(self, kind: str, chunk: list[Entry], rejected: list[Problem], state: dict[str, bool]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        recs: list[Any] = [r for _, r in chunk]
        try:
            if kind == "point":
                metrics = [Metric(p.key, p.value, p.timestamp_ms, p.step) for p in recs]
                self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
            elif kind == "param":
                self.client.log_batch(self.run_id, params=[Param(r.key, r.value) for r in recs], synchronous=True)
            else:
                self.client.log_batch(self.run_id, tags=[RunTag(r.key, r.value) for r in recs], synchronous=True)
        except Exception as exc:
            if not is_permanent(exc):
                raise
            if not state["run_checked"]:
                self._check_run_active()
                state["run_checked"] = True
            if len(chunk) == 1:
                rejected.append((chunk[0][0], chunk[0][1], describe(exc)))
                if kind == "param" and self._params is not None:
                    self._params.pop(chunk[0][1].key, None)  # type: ignore[union-attr]
                return
            mid = len(chunk) // 2
            self._send_chunk(kind, chunk[:mid], rejected, state)
            self._send_chunk(kind, chunk[mid:], rejected, state)

    def _send_artifact(self, seq: int, rec: ArtifactRecord, dedupe: bool, out: Outcome) -> None:
        if dedupe and self._listed_size(rec) == rec.size:
            out.skipped += 1
            return
        try:
            local = _spool.resolve_artifact_copy(rec.file, self.spool_dir, self.run_id)
        except ValueError as exc:
            out.rejected.append((seq, rec, str(exc)))
            return
        if not local.is_file():
            out.rejected.append((seq, rec, f"its spooled copy {local} is missing"))
            return
        try:
            self.client.log_artifact(self.run_id, os.fspath(local), rec.artifact_path)
        except Exception as exc:
            if is_permanent(exc):
                out.rejected.append((seq, rec, describe(exc)))
                return
            if not self._server_answers():
                raise  # an outage: retried with everything else
            out.deferred.append((seq, rec, describe(exc)))  # the artifact store fails, not the server
            return
        self._artifacts.setdefault(rec.artifact_path or "", {})[rec.dest] = rec.size
        out.sent["artifact"] += 1

    def _listed_size(self, rec: ArtifactRecord) -> int | None:
        folder = rec.artifact_path or ""
        listing = self._artifacts.get(folder)
        if listing is None:
            infos = self.client.list_artifacts(self.run_id, folder or None)
            listing = {posixpath.normpath(i.path): i.file_size for i in infos if not i.is_dir}
            self._artifacts[folder] = listing
        return listing.get(rec.dest)

    def _server_answers(self) -> bool:
        try:
            self.client.get_run(self.run_id)
        except Exception:
            return False
        return True

    def _check_run_active(self) -> None:
        stage = self.client.get_run(self.run_id).info.lifecycle_stage
        if stage != "active":
            raise SinkError(f"MLflow run {self.run_id} is {stage}; records are kept until it is restored")


def _chunks(entries: list[Entry], limit: int, unique_keys: bool) -> list[list[Entry]]:
    """Split into chunks of at most ``limit``; with ``unique_keys``, a key repeats in no chunk."""
    out: list[list[Entry]] = []
    cur: list[Entry] = []
    keys: set[str] = set()
    for e in entries:
        key = getattr(e[1], "key", "")
        if len(cur) >= limit or (unique_keys and key in keys):
            out.append(cur)
            cur, keys = [], set()
        cur.append(e)
        keys.add(key)
    if cur:
        out.append(cur)
    return out


# ---------------------------------------------------------------------- sync


@dataclass
class FileOutcome:
    """What :func:`sync_file` did with one spool file.

    Attributes:
        path: the spool file.
        run_id: the run named in its header.
        offset: byte offset just past the last complete line read; pass it back as ``offset`` to
            continue with what is appended later (a line still being written is left for then).
        sent: records sent, by kind (``point``, ``param``, ``tag``, ``artifact``).
        skipped: records MLflow already had (or repeated in the spool), acknowledged without a send.
        unreadable: complete lines that are not records wattlog understands (skipped, counted).
        truncated: True when the file ends in an unterminated line (a crash cut it, or it is being
            written); it is not counted in ``unreadable``.
        rejected: ``(seq, record, why)`` refused by MLflow for good, or refused by wattlog (an artifact
            copy outside the spool or reached through a symlink); acknowledged, never retried.
        deferred: ``(seq, record, why)`` artifacts whose upload failed while the server answered; not
            acknowledged, so the next sync retries them.
    """

    path: Path
    run_id: str
    offset: int
    sent: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    unreadable: int = 0
    truncated: bool = False
    rejected: list[Problem] = field(default_factory=list)
    deferred: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class SpoolProblem:
    """A spool file :func:`sync` could not deliver (kept as it is for a later sync), or skipped.

    Attributes:
        path: the file.
        reason: one redacted line.
        kind: ``"failed"`` (a wattlog spool that could not be delivered: its run is gone, MLflow is
            unreachable, a symlink was refused ...) or ``"skipped"`` (not a wattlog spool file).
    """

    path: Path
    reason: str
    kind: str = "failed"


def check_store_exists(uri: str) -> None:
    """Refuse a local tracking store that does not exist, so a sync never creates one.

    ``sqlite:///path`` must name an existing file and a file store (``file:`` URI or plain path) an
    existing directory. Remote stores (``http(s)://``, ``databricks``, databases) are not checked here.

    Raises:
        SinkError: the store does not exist.
    """
    from urllib.parse import unquote, urlsplit

    if uri.startswith("sqlite:"):
        rest = uri[len("sqlite:"):].split("?", 1)[0]
        path = rest[3:] if rest.startswith("///") else rest.lstrip("/")
        if not path or path == ":memory:" or not os.path.isfile(path):
            raise SinkError(f"cannot sync: no MLflow database at {path or uri!r} (tracking URI "
                            f"{redact_uri(uri)}); `wattlog sync` never creates a tracking store: check --tracking-uri")
        return
    parts = urlsplit(uri)
    if parts.scheme in ("", "file") and (parts.scheme or not uri.startswith(("databricks", "uc:"))):
        path = unquote(parts.path) if parts.scheme else uri
        if not os.path.isdir(path):
            raise SinkError(f"cannot sync: no MLflow file store at {path!r} (tracking URI {redact_uri(uri)}); "
                            "`wattlog sync` never creates a tracking store: check --tracking-uri")


def sync_file(
    path: str | os.PathLike[str],
    deliverer: Deliverer,
    *,
    offset: int | None = None,
    acks: _spool.AckSet | None = None,
    ack_f: Any = None,
) -> FileOutcome:
    """Deliver the unacknowledged records of ONE spool file from a byte offset; the unit of delivery.

    This is what ``wattlog sync`` runs for each file, and what a process that follows a growing spool
    calls again with the returned ``offset`` after each append. Records are sent in spool order in
    chunks of at most :data:`MAX_METRICS_PER_BATCH`, with de-duplication (what MLflow holds is skipped),
    each chunk is acknowledged in the ack file once sent, and the copies of delivered artifacts are
    deleted. A record whose seq is acknowledged already (in ``acks``) or that repeats a seq earlier in
    the file is not sent again.

    Args:
        path: the spool file (``<run_id>.jsonl``); opened without following symlinks.
        deliverer: a :class:`Deliverer` for the file's run (``Deliverer(client, run_id, spool_dir)``);
            reuse it across calls to keep its caches; call ``deliverer.invalidate()`` after a failure.
        offset: where to start reading; None: just after the header. Must be the start of a line.
        acks: the file's acknowledged seqs; None: read from ``<path>.ack``. It is updated in place.
        ack_f: an open binary append handle on ``<path>.ack``; None: opened (and closed) here.

    Returns:
        A :class:`FileOutcome`; its ``offset`` is where to continue.

    Raises:
        SinkError: (redacted) the header is not a wattlog spool header, or is for another run than
            ``deliverer.run_id``; the file or a refused symlink cannot be read; MLflow failed mid-way:
            the chunks before the failure stay acknowledged, the rest is retried by the next call
            from the same ``offset``.
    """
    f = Path(path)
    try:
        header, body_offset = _spool.read_header(f)
    except (ValueError, OSError) as exc:
        raise SinkError(redact_text(str(exc))) from None
    run_id = str(header["run_id"])
    if run_id != deliverer.run_id:
        raise SinkError(f"{f} is a spool of run {run_id}, not of {deliverer.run_id}")
    start = body_offset if offset is None else max(int(offset), body_offset)
    try:
        if acks is None:
            acks = _spool.read_acks(_spool.ack_file(f))
        todo: list[Entry] = []
        seen: set[int] = set()
        result = FileOutcome(f, run_id, start)
        for seq, rec, _s, end in _spool.iter_lines_from(f, start, result):
            result.offset = end
            if rec is None or seq in acks:
                continue
            if seq in seen:
                result.skipped += 1  # the same record twice in the spool (a duplicated or concatenated file)
                continue
            seen.add(seq)
            todo.append((seq, rec))
    except OSError as exc:
        raise SinkError(f"cannot read {f}: {redact_text(str(exc))}") from None
    if not todo:
        return result
    own_ack_f = ack_f is None
    if own_ack_f:
        try:
            ack_f, _ = _spool.open_append(_spool.ack_file(f))
        except OSError as exc:
            raise SinkError(f"cannot write the ack file of {f}: {redact_text(str(exc))}") from None
    try:
        _deliver(f, todo, deliverer, acks, ack_f, result)
    finally:
        if own_ack_f:
            ack_f.close()
    return result


def _deliver(f: Path, todo: list[Entry], deliverer: Deliverer, acks: _spool.AckSet, ack_f: Any,
             result: FileOutcome) -> None:
    spool_dir = deliverer.spool_dir
    for i in range(0, len(todo), MAX_METRICS_PER_BATCH):
        chunk = todo[i : i + MAX_METRICS_PER_BATCH]
        try:
            out = deliverer.send(chunk, dedupe=True)
        except Exception as exc:
            deliverer.invalidate()
            if isinstance(exc, SinkError):
                raise SinkError(f"cannot sync {f}: {redact_text(str(exc))}") from None
            raise SinkError(f"cannot sync {f} to MLflow run {deliverer.run_id}: {describe(exc)}") from None
        deferred = {seq for seq, _r, _w in out.deferred}
        done = [(seq, r) for seq, r in chunk if seq not in deferred]
        ack_f.write(_spool.ack_lines(seq for seq, _ in done))
        ack_f.flush()
        for seq, r in done:
            acks.add(seq, seq)
            if isinstance(r, ArtifactRecord):
                _spool.remove_artifact_copy(r.file, spool_dir, deliverer.run_id)
        result.sent.update(out.sent)
        result.skipped += out.skipped
        result.rejected += out.rejected
        result.deferred += out.deferred


def sync(
    spool: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    *,
    _client_factory: ClientFactory | None = None,
) -> SyncResult:
    """Replay spooled records (points, params, tags, artifacts) that MLflow never acknowledged; idempotent.

    What MLflow already holds is skipped (see the module docstring), so a lost ack never causes
    duplicates; what was handled is recorded in the ack file, and delivered artifact copies are deleted.
    A param whose value conflicts with the run's is rejected with a warning (and acked, never retried).
    An artifact whose upload fails while the server answers is deferred with a warning: not acked,
    so the next sync retries it. Each file is delivered by :func:`sync_file`.

    With a directory, every valid spool is delivered: a spool that cannot be (its run was deleted, a
    symlink was refused, its store is unreachable) is kept as it is, reported in
    ``SyncResult.problems`` and by a warning, and the others go on. A local store that does not exist
    (``sqlite:///missing.db``) is an error for each spool that names it: sync never creates one.

    Args:
        spool: a spool file, or a directory of ``*.jsonl`` spool files; default :func:`default_spool_dir`.
            Symlinks in the directory are refused, never followed.
        tracking_uri: where to send; default the URI in each spool header, else MLflow's default.

    Raises:
        FileNotFoundError: ``spool`` does not exist.
        SinkError: (a single spool file) it is malformed, MLflow cannot be reached or refuses the run.
    """
    factory = _client_factory or default_client_factory
    path = Path(spool) if spool is not None else _spool.default_spool_dir()
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no spool at {path}")
    single = not path.is_dir()
    files = [path] if single else sorted(path.glob(f"*{_spool.SPOOL_SUFFIX}"))
    total = SyncTotals()
    stores: dict[str, Any] = {}  # tracking URI -> client, or the SinkError it failed with
    deliverers: dict[tuple[str, str], Deliverer] = {}
    for f in files:
        try:
            header, _ = _spool.read_header(f)
        except (ValueError, OSError) as exc:
            if single:
                raise SinkError(redact_text(str(exc))) from None
            kind = "failed" if isinstance(exc, _spool.UnsafePathError) else "skipped"
            total.problem(SpoolProblem(f, redact_text(str(exc)), kind))
            continue
        run_id = str(header["run_id"])
        header_uri = header.get("tracking_uri")
        try:
            uri = tracking_uri or (str(header_uri) if header_uri else None) or resolve_uri(None)
            client = _store(stores, uri, factory)
            key = (uri, run_id)
            if key not in deliverers:
                deliverers[key] = Deliverer(client, run_id, f.parent.absolute())
            else:
                deliverers[key].spool_dir = f.parent.absolute()
            out = sync_file(f, deliverers[key])
        except SinkError as exc:
            if single:
                raise
            total.problem(SpoolProblem(f, str(exc).replace(f"cannot sync {f}: ", "", 1)))
            continue
        total.add(out)
    return total.result()


@dataclass
class SyncTotals:
    """Sums :class:`FileOutcome` values into a :class:`SyncResult`; warns about each problem once."""

    outcome: Outcome = field(default_factory=Outcome)
    files: int = 0
    unreadable: int = 0
    problems: list[SpoolProblem] = field(default_factory=list)

    def add(self, out: FileOutcome) -> None:
        self.files += 1
        self.outcome.sent.update(out.sent)
        self.outcome.skipped += out.skipped
        self.outcome.rejected += out.rejected
        self.outcome.deferred += out.deferred
        self.unreadable += out.unreadable + int(out.truncated)
        for what, problems in (("rejected", out.rejected), ("could not upload", out.deferred)):
            for seq, r, why in problems[:3]:
                tail = "dropped" if what == "rejected" else "kept for the next `wattlog sync`"
                warnings.warn(
                    redact_text(f"wattlog: MLflow {what} {describe_record(r)} (seq {seq}) from {out.path}: "
                                f"{why}; {tail}"),
                    WattlogWarning,
                    stacklevel=4,
                )

    def problem(self, p: SpoolProblem) -> None:
        self.problems.append(p)
        verb = "skipping" if p.kind == "skipped" else "could not sync"
        warnings.warn(f"wattlog: {verb} {p.path}: {p.reason}", WattlogWarning, stacklevel=4)

    def result(self) -> SyncResult:
        out = self.outcome
        return SyncResult(
            sent=sum(out.sent.values()), skipped=out.skipped, files=self.files, rejected=len(out.rejected),
            deferred=len(out.deferred), sent_by_kind={k: out.sent[k] for k in KINDS},
            unreadable=self.unreadable, failed=sum(p.kind == "failed" for p in self.problems),
            problems=list(self.problems),
        )


def _store(stores: dict[str, Any], uri: str, factory: ClientFactory) -> Any:
    """The client for ``uri``, made and probed once per sync (a failure is remembered for the others)."""
    got = stores.get(uri)
    if got is None:
        try:
            check_store_exists(uri)
            client = factory(uri)
            probe = getattr(client, "search_experiments", None)
            if probe is not None:
                probe(max_results=1)
            got = client
        except SinkError as exc:
            got = exc
        except Exception as exc:
            got = SinkError(f"cannot sync to MLflow at {redact_uri(uri)}: {describe(exc)}")
        stores[uri] = got
    if isinstance(got, SinkError):
        raise SinkError(str(got)) from None
    return got


def register_cli(subparsers: Any) -> None:
    """Add ``wattlog sync [--spool PATH] [--tracking-uri URI]`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "sync",
        help="send spooled points, params, tags and artifacts that never reached MLflow",
        description="Replay records from wattlog spool files into MLflow; what is already there is skipped. "
        "Exit codes: 0 done; 1 some spools or artifacts could not be delivered (run again later); 2 error.",
    )
    p.add_argument("spool_arg", nargs="?", default=None, metavar="SPOOL",
                   help="spool file or directory (same as --spool)")
    p.add_argument("--spool", default=None, help="spool file or directory (default: $WATTLOG_SPOOL_DIR "
                   "or ./.wattlog/spool)")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: the one in each spool's header)"
    )
    p.set_defaults(func=_cli_sync)


def _cli_sync(args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 1 some spools or artifacts could not be delivered; 2 error."""
    spool = getattr(args, "spool", None)
    positional = getattr(args, "spool_arg", None)
    if spool and positional and spool != positional:
        print("wattlog sync: error: give the spool once (SPOOL or --spool)", file=sys.stderr)
        return 2
    spool = spool or positional
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    if saved is None:  # fail fast on an unreachable server instead of minutes of MLflow retries
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", WattlogWarning)
            result = sync(spool, args.tracking_uri)
    except (FileNotFoundError, SinkError) as exc:
        print(f"wattlog sync: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    problem_texts = {f"wattlog: {'skipping' if p.kind == 'skipped' else 'could not sync'} {p.path}: {p.reason}"
                     for p in result.problems}
    for w in caught:
        text = str(w.message)
        if text not in problem_texts:
            print(redact_text(text), file=sys.stderr)
    for p in result.problems:
        label = "skipped" if p.kind == "skipped" else "error"
        print(f"wattlog sync: {label}: {redact_text(f'{p.path}: {p.reason}')}", file=sys.stderr)
    by_kind = result.sent_by_kind
    others = "".join(f", {by_kind[k]} {k}s" for k in KINDS[1:] if by_kind.get(k))
    extra = f"; {result.rejected} rejected" if result.rejected else ""
    if result.unreadable:
        extra += f"; {result.unreadable} unreadable lines skipped"
    if result.deferred:
        extra += f"; {result.deferred} artifacts could not be uploaded (run `wattlog sync` again)"
    if result.failed:
        extra += f"; {result.failed} spool files could not be synced (kept)"
    print(
        f"sent {by_kind.get('point', 0)} points{others} ({result.skipped} already present) "
        f"from {result.files} spool files{extra}"
    )
    if result.failed and not result.files:
        return 2
    return 1 if (result.deferred or result.failed) else 0
