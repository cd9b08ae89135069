"""The local spool of an MLflow sink: file format, permissions, acks and credential redaction.

No third-party imports. One spool file per run, ``<spool_dir>/<run_id>.jsonl`` (mode 0600, in a
directory created with mode 0700), JSON lines:

- line 1, the header: ``{"wattlog_spool": 1, "run_id": ..., "tracking_uri": <redacted>, "created": ...}``;
- then one line per record, numbered by one sequence:

  - a metric point: ``{"seq": n, "k": key, "v": value, "s": step, "t": timestamp_ms}`` (no ``type``);
  - a run param or tag: ``{"seq": n, "type": "param"|"tag", "k": key, "v": "value"}``;
  - an artifact: ``{"seq": n, "type": "artifact", "f": copy, "p": artifact_path|null, "n": size_bytes}``,
    where ``copy`` is the spooled copy of the file, relative to the spool directory
    (``<run_id>.artifacts/<unique>/<file name>``, files 0600, directories 0700).

  Readers skip lines they do not understand, so older wattlog versions replay only the points.

Next to it, ``<run_id>.jsonl.ack`` holds append-only lines ``first_seq last_seq``: inclusive ranges of
records that MLflow acknowledged (or permanently rejected), so a restart or ``wattlog sync`` knows
what is left to deliver.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

SPOOL_VERSION = 1
SPOOL_SUFFIX = ".jsonl"
ACK_SUFFIX = ".ack"
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_SECRET_QUERY_KEYS = ("token", "password", "passwd", "secret", "key", "sig", "signature", "credential")
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")
_SECRET_ENV_VARS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "DATABRICKS_TOKEN")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,255}$")  # MLflow's run id rule, ASCII only
_TEMP_COPY_PREFIX = "wattlog-artifact-"


def valid_run_id(run_id: object) -> bool:
    """True for an MLflow run id (``[A-Za-z0-9][A-Za-z0-9_-]{0,255}``): safe as a file name."""
    return isinstance(run_id, str) and _RUN_ID_RE.match(run_id) is not None


@dataclass(frozen=True)
class Point:
    """One metric value, as MLflow stores it."""

    key: str
    value: float
    step: int
    timestamp_ms: int


@dataclass(frozen=True)
class RunRecord:
    """A run param (``kind="param"``) or tag (``kind="tag"``), value already converted to str."""

    kind: str
    key: str
    value: str


@dataclass(frozen=True)
class ArtifactRecord:
    """A file to upload as a run artifact, from its spooled copy.

    Attributes:
        file: the copy, relative to the spool directory (absolute when it lives outside it).
        artifact_path: run-relative directory to upload into (None: the artifact root).
        size: size of the copy in bytes (used to recognise an upload that already happened).
    """

    file: str
    artifact_path: str | None
    size: int

    @property
    def dest(self) -> str:
        """The artifact's path in the run, e.g. ``energy/trace.csv``."""
        return posixpath.join(self.artifact_path or "", posixpath.basename(self.file.replace(os.sep, "/")))


Record = Point | RunRecord | ArtifactRecord


def record_kind(rec: Record) -> str:
    """``"point"``, ``"param"``, ``"tag"`` or ``"artifact"``."""
    if type(rec) is Point:
        return "point"
    if type(rec) is RunRecord:
        return rec.kind
    return "artifact"


def default_spool_dir() -> Path:
    """``$WATTLOG_SPOOL_DIR`` if set, else ``./.wattlog/spool`` (relative to the working directory)."""
    env = os.environ.get("WATTLOG_SPOOL_DIR", "").strip()
    return Path(env) if env else Path(".wattlog") / "spool"


def spool_file(spool_dir: str | os.PathLike[str], run_id: str) -> Path:
    """Path of the spool file of ``run_id`` in ``spool_dir``."""
    return Path(spool_dir) / f"{run_id}{SPOOL_SUFFIX}"


def ack_file(spool_path: str | os.PathLike[str]) -> Path:
    """Path of the ack file that belongs to ``spool_path``."""
    return Path(f"{os.fspath(spool_path)}{ACK_SUFFIX}")


def redact_uri(uri: str | None) -> str:
    """Return ``uri`` without credentials: userinfo (``user:password@``) and secret-looking query values.

    Args:
        uri: a tracking URI, or None.

    Returns:
        The redacted URI (``""`` for None). Non-URL strings (plain paths) come back unchanged.
    """
    if not uri:
        return ""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return redact_text(uri)
    out = uri
    if "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        out = out.replace(parts.netloc, host, 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(_is_secret_key(k) for k, _ in pairs):
            query = urlencode([(k, "***" if _is_secret_key(k) else v) for k, v in pairs], safe="*")
            out = out.replace(parts.query, query, 1)
    return out


def redact_text(text: str) -> str:
    """Remove URI userinfo and the values of MLflow credential env vars from free text (error messages)."""
    text = _USERINFO_RE.sub(r"\g<scheme>", text)
    for name in _SECRET_ENV_VARS:
        secret = os.environ.get(name, "")
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _is_secret_key(key: str) -> bool:
    low = key.lower()
    return any(s in low for s in _SECRET_QUERY_KEYS)


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents); the leaf is created with mode 0700 when it does not exist yet."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=_DIR_MODE, exist_ok=True)


def open_append(path: Path) -> tuple[object, int]:
    """Open ``path`` for binary append, creating it with mode 0600. Returns (file, current size in bytes)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
    try:
        size = os.fstat(fd).st_size
        return os.fdopen(fd, "ab"), size
    except BaseException:
        os.close(fd)
        raise


def header_line(run_id: str, tracking_uri: str | None) -> bytes:
    """The first line of a spool file; the URI is stored redacted."""
    header = {
        "wattlog_spool": SPOOL_VERSION,
        "run_id": run_id,
        "tracking_uri": redact_uri(tracking_uri) or None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return (json.dumps(header) + "\n").encode()


def point_line(seq: int, point: Point) -> bytes:
    """Serialise one point as a spool line."""
    return (
        json.dumps({"seq": seq, "k": point.key, "v": point.value, "s": point.step, "t": point.timestamp_ms})
        + "\n"
    ).encode()


def record_line(seq: int, rec: Record) -> bytes:
    """Serialise any record (point, param, tag or artifact) as a spool line."""
    if type(rec) is Point:
        return point_line(seq, rec)
    if type(rec) is RunRecord:
        obj: dict[str, object] = {"seq": seq, "type": rec.kind, "k": rec.key, "v": rec.value}
    elif type(rec) is ArtifactRecord:
        obj = {"seq": seq, "type": "artifact", "f": rec.file, "p": rec.artifact_path, "n": rec.size}
    else:
        raise TypeError(f"not a spool record: {rec!r}")
    return (json.dumps(obj) + "\n").encode()


def parse_header(line: bytes) -> dict[str, object] | None:
    """The header dict if ``line`` is a wattlog spool header, else None."""
    try:
        header = json.loads(line)
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("wattlog_spool") != SPOOL_VERSION:
        return None
    if not isinstance(header.get("run_id"), str):
        return None
    return header


def parse_point(line: bytes) -> tuple[int, Point] | None:
    """``(seq, Point)`` from a spool line, or None for any other or a malformed (e.g. truncated) line."""
    parsed = parse_record(line)
    if parsed is None or type(parsed[1]) is not Point:
        return None
    return parsed[0], parsed[1]


def parse_record(line: bytes) -> tuple[int, Record] | None:
    """``(seq, record)`` from a spool line, or None for a malformed line or an unknown record type."""
    try:
        obj = json.loads(line)
        kind = obj.get("type")
        if kind is None:
            return int(obj["seq"]), Point(str(obj["k"]), float(obj["v"]), int(obj["s"]), int(obj["t"]))
        if kind in ("param", "tag"):
            return int(obj["seq"]), RunRecord(kind, str(obj["k"]), str(obj["v"]))
        if kind == "artifact":
            p = check_artifact_path(None if obj["p"] is None else str(obj["p"]))
            return int(obj["seq"]), ArtifactRecord(str(obj["f"]), p, int(obj["n"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def read_header(path: Path) -> tuple[dict[str, object], int]:
    """The header of a spool file and the byte offset of its first point line.

    Raises:
        ValueError: the file does not start with a wattlog spool header, or its run id is not a valid one.
    """
    with open(path, "rb") as f:
        first = f.readline()
    header = parse_header(first) if first.endswith(b"\n") else None
    if header is None:
        raise ValueError(f"{path} is not a wattlog spool file (bad header)")
    if not valid_run_id(header["run_id"]):
        raise ValueError(f"{path} names an invalid MLflow run id {str(header['run_id'])[:80]!r}")
    return header, len(first)


def ends_with_newline(path: Path) -> bool:
    """True if the file is empty or its last byte is a newline."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def iter_records_from(path: Path, offset: int) -> Iterator[tuple[int, Record, int, int]]:
    """Yield ``(seq, record, start, end)`` byte offsets for the record lines of ``path`` from ``offset``.

    Malformed lines are skipped; an unterminated last line (still being written, or cut by a crash)
    ends the iteration.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                return
            parsed = parse_record(line)
            if parsed is not None:
                yield parsed[0], parsed[1], start, offset


def iter_points_from(path: Path, offset: int) -> Iterator[tuple[int, Point, int, int]]:
    """Like :func:`iter_records_from`, metric points only."""
    for seq, rec, start, end in iter_records_from(path, offset):
        if type(rec) is Point:
            yield seq, rec, start, end


# ---------------------------------------------------------------------- artifacts


def artifacts_dir(spool_dir: str | os.PathLike[str], run_id: str) -> Path:
    """Where spooled copies of ``run_id``'s artifacts live: ``<spool_dir>/<run_id>.artifacts``."""
    return Path(spool_dir) / f"{run_id}.artifacts"


def check_artifact_path(artifact_path: str | None) -> str | None:
    """Normalise a run-relative artifact directory; None or ``""`` mean the artifact root.

    Raises:
        ValueError: not a str, absolute, containing ``..``, a backslash or NUL, or not normalised.
    """
    if artifact_path is None:
        return None
    if not isinstance(artifact_path, str):
        raise ValueError("not a str")
    if artifact_path.startswith("/"):
        raise ValueError("absolute")
    p = artifact_path.rstrip("/")
    if not p:
        return None
    if (
        p == "."
        or "\\" in p
        or "\0" in p
        or ".." in p.split("/")
        or posixpath.normpath(p) != p
    ):
        raise ValueError("not a normalised relative path")
    return p


def copy_artifact(src: Path, root: Path, spool_dir: Path | None) -> tuple[str, int]:
    """Copy ``src`` into a fresh directory (0700) under ``root``; the copy is created with mode 0600.

    Returns:
        (the copy's path, relative to ``spool_dir`` when given and inside it, else absolute; size in bytes).

    Raises:
        OSError: the copy failed (nothing is left behind).
    """
    import shutil

    ensure_dir(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix="a"))
    dst = tmp / src.name
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            size = out.tell()
    except BaseException:
        _remove_copy(dst)
        raise
    if spool_dir is not None:
        try:
            return dst.relative_to(spool_dir).as_posix(), size
        except ValueError:
            pass
    return str(dst), size


def resolve_artifact_copy(file: str, spool_dir: Path | None, run_id: str) -> Path:
    """The absolute path of a spooled artifact copy of ``run_id``, checked to be one wattlog made.

    A copy lives at ``<spool_dir>/<run_id>.artifacts/<unique>/<name>`` (stored relative), or, when the
    spool was not writable, at ``<tempdir>/wattlog-artifact-*/<unique>/<name>``. A spool line naming
    anything else (a hand-edited or foreign spool) is refused, so ``wattlog sync`` never uploads or
    deletes files outside these directories.

    Raises:
        ValueError: ``file`` is not such a path.
    """
    if "\0" in file or "\\" in file:
        raise ValueError(f"artifact copy {file[:200]!r} is not a wattlog spool copy")
    p = Path(file)
    parts = p.parts
    if ".." in parts or posixpath.normpath(file) != file:
        raise ValueError(f"artifact copy {file[:200]!r} is not a wattlog spool copy")
    if not p.is_absolute():
        if spool_dir is None or len(parts) != 3 or parts[0] != f"{run_id}.artifacts":
            raise ValueError(f"artifact copy {file[:200]!r} is outside {run_id}.artifacts/ in the spool")
        return spool_dir / p
    if len(parts) < 4 or not parts[-3].startswith(_TEMP_COPY_PREFIX) or p.parents[2] != Path(tempfile.gettempdir()):
        raise ValueError(f"artifact copy {file[:200]!r} is outside the spool and wattlog's temporary copies")
    return p


def remove_artifact_copy(file: str, spool_dir: Path | None, run_id: str) -> None:
    """Delete a delivered artifact copy and its (then empty) private directory; errors are ignored.

    Only paths :func:`resolve_artifact_copy` accepts are touched.
    """
    try:
        p = resolve_artifact_copy(file, spool_dir, run_id)
    except ValueError:
        return
    _remove_copy(p)


def _remove_copy(p: Path) -> None:
    for fn, target in ((os.remove, p), (os.rmdir, p.parent)):
        try:
            fn(target)
        except OSError:
            pass


class AckSet:
    """Acknowledged sequence numbers, as sorted, merged inclusive ranges."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._ranges: list[tuple[int, int]] = []
        for first, last in ranges:
            self.add(first, last)

    def add(self, first: int, last: int) -> None:
        """Mark ``first..last`` (inclusive) acknowledged."""
        merged: list[tuple[int, int]] = []
        for a, b in self._ranges:
            if b + 1 < first or last + 1 < a:
                merged.append((a, b))
            else:
                first, last = min(a, first), max(b, last)
        merged.append((first, last))
        merged.sort()
        self._ranges = merged

    def __contains__(self, seq: int) -> bool:
        return any(a <= seq <= b for a, b in self._ranges)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The merged ranges, sorted."""
        return list(self._ranges)


def read_acks(path: Path) -> AckSet:
    """Acked ranges from an ack file (missing file: none; malformed lines are ignored)."""
    acks = AckSet()
    try:
        with open(path, "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) == 2 and line.endswith(b"\n"):
                    try:
                        acks.add(int(fields[0]), int(fields[1]))
                    except ValueError:
                        continue
    except FileNotFoundError:
        pass
    return acks


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Compress sequence numbers into sorted inclusive contiguous ranges."""
    out: list[tuple[int, int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        elif not out or s > out[-1][1]:
            out.append((s, s))
    return out


def ack_lines(seqs: Iterable[int]) -> bytes:
    """Ack-file lines for ``seqs``."""
    return b"".join(f"{a} {b}\n".encode() for a, b in seq_ranges(seqs))
