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

Symlinks are never followed inside the spool: spool, ack and artifact files are opened with
``O_NOFOLLOW``, artifact folders are checked with ``lstat`` (real directories, owned by this user, not
writable by others) and by their real path, and anything else is refused with :class:`UnsafePathError`.
An existing spool directory that is group- or world-writable is tightened to 0700 when this user owns
it, else refused.

Next to it, ``<run_id>.jsonl.ack`` holds append-only lines ``first_seq last_seq``: inclusive ranges of
records that MLflow acknowledged (or permanently rejected), so a restart or ``wattlog sync`` knows
what is left to deliver.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattlog.redact import redact_text, redact_uri  # noqa: F401 - re-exported: older imports use this module

SPOOL_VERSION = 1
SPOOL_SUFFIX = ".jsonl"
ACK_SUFFIX = ".ack"
_FILE_MODE = 0o600
_DIR_MODE = 0o700
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


class UnsafePathError(PermissionError):
    """A spool path wattlog refuses to use: a symlink, not a regular file or directory, owned by another
    user, or writable by other users. An ``OSError``, so every caller that handles I/O errors handles it."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _check_private_dir(st: os.stat_result, path: Path, tighten: bool) -> None:
    """Refuse a directory owned by someone else or writable by others (tighten it to 0700 when ours)."""
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"refusing {path}: not a directory")
    if not st.st_mode & 0o022:
        return
    ours = not hasattr(os, "geteuid") or st.st_uid == os.geteuid()
    if ours and tighten:
        os.chmod(path, _DIR_MODE)
        return
    mode = stat.S_IMODE(st.st_mode)
    who = "this user" if ours else f"uid {st.st_uid}"
    raise UnsafePathError(
        f"refusing the spool directory {path}: mode {mode:04o} lets other users write into it and it is owned "
        f"by {who}; use a private directory (WATTLOG_SPOOL_DIR) or `chmod 700` it"
    )


def ensure_dir(path: Path) -> None:
    """Create the spool directory ``path`` (and parents); a new leaf gets mode 0700.

    An existing one is checked: a group- or world-writable directory owned by this user is tightened to
    0700; one owned by another user is refused. ``path`` itself may be reached through a symlink the
    user made (its target is what is checked); nothing inside it is ever followed.

    Raises:
        UnsafePathError: ``path`` is not a directory, or others can write into it and it is not ours.
        OSError: it cannot be created.
    """
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=_DIR_MODE)
        except FileExistsError:
            pass
    _check_private_dir(os.stat(path), path, tighten=True)


def ensure_private_subdir(path: Path) -> None:
    """Create ``path`` (mode 0700) inside an existing spool directory; an existing one must be a real
    directory (not a symlink), owned by this user and not writable by others (tightened when ours).

    Raises:
        UnsafePathError: ``path`` is a symlink or another user's, or not a directory.
    """
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"refusing {path}: it is a symlink (wattlog never follows symlinks in the spool)")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise UnsafePathError(f"refusing {path}: owned by uid {st.st_uid}, not by this user")
    _check_private_dir(st, path, tighten=True)


def open_append(path: Path) -> tuple[object, int]:
    """Open ``path`` for binary append, creating it with mode 0600, never through a symlink.

    Returns:
        (file, current size in bytes).

    Raises:
        UnsafePathError: ``path`` is a symlink or not a regular file.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | _NONBLOCK, _FILE_MODE)
    except OSError as exc:
        _raise_if_symlink(path, exc)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"refusing {path}: not a regular file")
        return os.fdopen(fd, "ab"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def open_read(path: Path) -> Any:
    """Open a spool or ack file for binary reading, never through a symlink.

    Raises:
        UnsafePathError: ``path`` is a symlink or not a regular file.
        FileNotFoundError: it does not exist.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    except OSError as exc:
        _raise_if_symlink(path, exc)
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"refusing {path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _raise_if_symlink(path: Path, exc: OSError) -> None:
    try:
        link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return
    if link:
        raise UnsafePathError(f"refusing {path}: it is a symlink (wattlog never follows symlinks in the spool)") from exc


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
    with open_read(path) as f:
        first = f.readline()
    header = parse_header(first) if first.endswith(b"\n") else None
    if header is None:
        raise ValueError(f"{path} is not a wattlog spool file (bad header)")
    if not valid_run_id(header["run_id"]):
        raise ValueError(f"{path} names an invalid MLflow run id {str(header['run_id'])[:80]!r}")
    return header, len(first)


def ends_with_newline(path: Path) -> bool:
    """True if the file is empty or its last byte is a newline."""
    with open_read(path) as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def iter_records_from(path: Path, offset: int) -> Iterator[tuple[int, Record, int, int]]:
    """Yield ``(seq, record, start, end)`` byte offsets for the record lines of ``path`` from ``offset``.

    Malformed lines are skipped; an unterminated last line (still being written, or cut by a crash)
    ends the iteration.

    Raises:
        UnsafePathError: ``path`` is a symlink or not a regular file.
    """
    for seq, rec, start, end in iter_lines_from(path, offset):
        if rec is not None:
            yield seq, rec, start, end


def iter_lines_from(path: Path, offset: int, stats: Any = None) -> Iterator[tuple[int, Record | None, int, int]]:
    """Yield ``(seq, record or None, start, end)`` for every complete line of ``path`` from ``offset``.

    A line that is not a record wattlog understands yields ``(-1, None, start, end)``; with ``stats``
    (any object with int attribute ``unreadable`` and bool ``truncated``) those lines are counted, and
    ``stats.truncated`` is set when the file ends in an unterminated line, which ends the iteration.

    Raises:
        UnsafePathError: ``path`` is a symlink or not a regular file.
    """
    with open_read(path) as f:
        f.seek(offset)
        for line in f:
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                if stats is not None:
                    stats.truncated = True
                return
            parsed = parse_record(line)
            if parsed is None:
                if stats is not None and line.strip():
                    stats.unreadable += 1
                yield -1, None, start, offset
            else:
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

    ``root`` (``<spool_dir>/<run_id>.artifacts``, or a private temporary directory) must be a real
    directory of this user, not a symlink (see :func:`ensure_private_subdir`).

    Returns:
        (the copy's path, relative to ``spool_dir`` when given and inside it, else absolute; size in bytes).

    Raises:
        OSError: the copy failed (nothing is left behind); :class:`UnsafePathError` for a symlinked root.
    """
    import shutil

    if spool_dir is not None and root.parent == spool_dir:
        ensure_dir(spool_dir)
    ensure_private_subdir(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix="a"))
    dst = tmp / src.name
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, _FILE_MODE)
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


def _copy_location(file: str, spool_dir: Path | None, run_id: str) -> tuple[Path, tuple[str, str, str]]:
    """``(base, (folder, unique, name))`` of an artifact copy path, checked as a string only."""
    if "\0" in file or "\\" in file:
        raise ValueError(f"artifact copy {file[:200]!r} is not a wattlog spool copy")
    p = Path(file)
    parts = p.parts
    if ".." in parts or posixpath.normpath(file) != file:
        raise ValueError(f"artifact copy {file[:200]!r} is not a wattlog spool copy")
    if not p.is_absolute():
        if spool_dir is None or len(parts) != 3 or parts[0] != f"{run_id}.artifacts":
            raise ValueError(f"artifact copy {file[:200]!r} is outside {run_id}.artifacts/ in the spool")
        return Path(spool_dir), (parts[0], parts[1], parts[2])
    if len(parts) < 4 or not parts[-3].startswith(_TEMP_COPY_PREFIX) or p.parents[2] != Path(tempfile.gettempdir()):
        raise ValueError(f"artifact copy {file[:200]!r} is outside the spool and wattlog's temporary copies")
    return p.parents[2], (parts[-3], parts[-2], parts[-1])


def _open_copy_dirs(base: Path, folder: str, unique: str) -> tuple[int, int] | None:
    """Open ``base/folder/unique`` without following a symlink below ``base``; both must be private
    directories of this user. None when one is missing.

    Raises:
        UnsafePathError: a symlink, not a directory, another user's, or writable by others.
    """
    fds: list[int] = []
    try:
        try:
            fds.append(os.open(base, os.O_RDONLY | _DIRECTORY | _CLOEXEC))
        except FileNotFoundError:
            return None
        for name in (folder, unique):
            where = base.joinpath(*[folder, unique][: len(fds)])
            try:
                fd = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fds[-1])
            except FileNotFoundError:
                return None
            except OSError as exc:  # ELOOP: a symlink; ENOTDIR: a file (or a symlink, on some systems)
                raise UnsafePathError(f"refusing {where}: a symlink or not a directory "
                                      "(wattlog never follows symlinks in the spool)") from exc
            fds.append(fd)
            st = os.fstat(fd)
            if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
                raise UnsafePathError(f"refusing {where}: owned by uid {st.st_uid}, not by this user")
            if st.st_mode & 0o022:
                raise UnsafePathError(f"refusing {where}: writable by other users")
        os.close(fds.pop(0))
        return fds[0], fds[1]
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def resolve_artifact_copy(file: str, spool_dir: Path | None, run_id: str) -> Path:
    """The absolute path of a spooled artifact copy of ``run_id``, checked to be one wattlog made.

    A copy lives at ``<spool_dir>/<run_id>.artifacts/<unique>/<name>`` (stored relative), or, when the
    spool was not writable, at ``<tempdir>/wattlog-artifact-*/<unique>/<name>``. A spool line naming
    anything else (a hand-edited or foreign spool) is refused, and so is a copy reached through a
    symlink (either folder, or the file itself), one whose folders belong to another user or are
    writable by others, or whose real path differs from the expected one: ``wattlog sync`` never
    uploads or deletes files outside these directories. A copy that does not exist is returned as is
    (the caller reports it missing).

    Raises:
        ValueError: ``file`` is not such a path, or it is refused for one of the reasons above.
    """
    base, (folder, unique, name) = _copy_location(file, spool_dir, run_id)
    path = base / folder / unique / name
    try:
        fds = _open_copy_dirs(base, folder, unique)
        if fds is None:
            return path
        try:
            try:
                st = os.stat(name, dir_fd=fds[1], follow_symlinks=False)
            except FileNotFoundError:
                return path
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"refusing {path}: a symlink or not a regular file")
            if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
                raise UnsafePathError(f"refusing {path}: owned by uid {st.st_uid}, not by this user")
        finally:
            for fd in fds:
                os.close(fd)
        expected = os.path.join(os.path.realpath(base), folder, unique, name)
        if os.path.realpath(path) != expected:
            raise UnsafePathError(f"refusing {path}: its real path is not inside {base / folder}")
    except UnsafePathError as exc:
        raise ValueError(str(exc)) from None
    except OSError as exc:
        raise ValueError(f"refusing {path}: {exc}") from None
    return path


def remove_artifact_copy(file: str, spool_dir: Path | None, run_id: str) -> None:
    """Delete a delivered artifact copy and its (then empty) private directory; errors are ignored.

    Only paths :func:`resolve_artifact_copy` accepts are touched, through directory descriptors opened
    without following symlinks (a folder swapped for a symlink meanwhile deletes nothing).
    """
    try:
        resolve_artifact_copy(file, spool_dir, run_id)
        base, (folder, unique, name) = _copy_location(file, spool_dir, run_id)
        fds = _open_copy_dirs(base, folder, unique)
    except (ValueError, OSError):
        return
    if fds is None:
        return
    try:
        for fn, target, dir_fd in ((os.unlink, name, fds[1]), (os.rmdir, unique, fds[0])):
            try:
                fn(target, dir_fd=dir_fd)
            except OSError:
                pass
    finally:
        for fd in fds:
            os.close(fd)


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
        with open_read(path) as f:
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
