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
    """

    sent: int
    skipped: int
    files: int
    rejected: int = 0
    deferred: int = 0
    sent_by_kind: dict[str, int] = field(default_factory=dict)


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
            if (p.step, p.timestamp_ms, p.value) in known:
                out.skipped += 1
            else:
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
    so the next sync retries it.

    Args:
        spool: a spool file, or a directory of ``*.jsonl`` spool files; default :func:`default_spool_dir`.
        tracking_uri: where to send; default the URI in each spool header, else MLflow's default.

    Raises:
        FileNotFoundError: ``spool`` does not exist.
        SinkError: a spool file is malformed, or MLflow cannot be reached or refuses the run.
    """
    factory = _client_factory or default_client_factory
    path = Path(spool) if spool is not None else _spool.default_spool_dir()
    if not path.exists():
        raise FileNotFoundError(f"no spool at {path}")
    files = sorted(path.glob(f"*{_spool.SPOOL_SUFFIX}")) if path.is_dir() else [path]
    total = Outcome()
    n_files = 0
    for f in files:
        try:
            header, body_offset = _spool.read_header(f)
        except ValueError as exc:
            if not path.is_dir():
                raise SinkError(str(exc)) from None
            warnings.warn(f"wattlog: skipping {f}: {exc}", WattlogWarning, stacklevel=2)
            continue
        n_files += 1
        _sync_file(f, header, body_offset, tracking_uri, factory, total)
    n_sent = sum(total.sent.values())
    return SyncResult(sent=n_sent, skipped=total.skipped, files=n_files, rejected=len(total.rejected),
                      deferred=len(total.deferred), sent_by_kind={k: total.sent[k] for k in KINDS})


def _sync_file(
    f: Path, header: dict[str, object], body_offset: int, tracking_uri: str | None,
    factory: ClientFactory, total: Outcome,
) -> None:
    run_id = str(header["run_id"])
    acks = _spool.read_acks(_spool.ack_file(f))
    todo = [(seq, r) for seq, r, _s, _e in _spool.iter_records_from(f, body_offset) if seq not in acks]
    if not todo:
        return
    header_uri = header.get("tracking_uri")
    uri = tracking_uri or (str(header_uri) if header_uri else None) or resolve_uri(None)
    spool_dir = f.parent.absolute()
    try:
        deliverer = Deliverer(factory(uri), run_id, spool_dir)
        ack_f, _ = _spool.open_append(_spool.ack_file(f))
    except Exception as exc:
        raise SinkError(f"cannot sync {f} to MLflow at {redact_uri(uri)}: {describe(exc)}") from None
    with ack_f:
        for i in range(0, len(todo), MAX_METRICS_PER_BATCH):
            chunk = todo[i : i + MAX_METRICS_PER_BATCH]
            try:
                out = deliverer.send(chunk, dedupe=True)
            except Exception as exc:
                raise SinkError(
                    f"cannot sync {f} to MLflow run {run_id} at {redact_uri(uri)}: {describe(exc)}"
                ) from None
            deferred = {seq for seq, _r, _w in out.deferred}
            done = [(seq, r) for seq, r in chunk if seq not in deferred]
            ack_f.write(_spool.ack_lines(seq for seq, _ in done))  # type: ignore[attr-defined]
            ack_f.flush()  # type: ignore[attr-defined]
            for _seq, r in done:
                if isinstance(r, ArtifactRecord):
                    _spool.remove_artifact_copy(r.file, spool_dir, run_id)
            total.sent.update(out.sent)
            total.skipped += out.skipped
            total.rejected += out.rejected
            total.deferred += out.deferred
            for what, problems in (("rejected", out.rejected), ("could not upload", out.deferred)):
                for seq, r, why in problems[:3]:
                    tail = "dropped" if what == "rejected" else "kept for the next `wattlog sync`"
                    warnings.warn(
                        redact_text(f"wattlog: MLflow {what} {describe_record(r)} (seq {seq}) from {f}: "
                                    f"{why}; {tail}"),
                        WattlogWarning,
                        stacklevel=4,
                    )


def register_cli(subparsers: Any) -> None:
    """Add ``wattlog sync [--spool PATH] [--tracking-uri URI]`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "sync",
        help="send spooled points, params, tags and artifacts that never reached MLflow",
        description="Replay records from wattlog spool files into MLflow; what is already there is skipped.",
    )
    p.add_argument("--spool", default=None, help="spool file or directory (default: $WATTLOG_SPOOL_DIR "
                   "or ./.wattlog/spool)")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: the one in each spool's header)"
    )
    p.set_defaults(func=_cli_sync)


def _cli_sync(args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 1 some artifacts deferred (run again later); 2 error."""
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    if saved is None:  # fail fast on an unreachable server instead of minutes of MLflow retries
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    try:
        result = sync(args.spool, args.tracking_uri)
    except (FileNotFoundError, SinkError) as exc:
        print(f"wattlog sync: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    by_kind = result.sent_by_kind
    others = "".join(f", {by_kind[k]} {k}s" for k in KINDS[1:] if by_kind.get(k))
    extra = f"; {result.rejected} rejected by MLflow" if result.rejected else ""
    if result.deferred:
        extra += f"; {result.deferred} artifacts could not be uploaded (run `wattlog sync` again)"
    print(
        f"sent {by_kind.get('point', 0)} points{others} ({result.skipped} already present) "
        f"from {result.files} spool files{extra}"
    )
    return 1 if result.deferred else 0
