"""The Sink protocol: where an :class:`~wattlog.session.EnergySession` writes, and simple sinks.

A sink receives metric points, params, tags and artifacts for ONE run. Every call is made on the
caller's (training) thread and must return in microseconds to a few milliseconds: sinks that talk
to a network hand the work to someone else (``MlflowSink`` appends to a spool that a delivery
process sends). Implementations here: :class:`MemorySink` (tests), :class:`LocalSink` (a folder:
the no-MLflow fallback), :class:`LoggerSink` (Lightning's other loggers) and :class:`MultiSink`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from wattlog.sinks.spool import Point

__all__ = ["LocalSink", "LoggerSink", "MemorySink", "MultiSink", "Point", "Sink"]


@runtime_checkable
class Sink(Protocol):
    """What a session writes to (one run)."""

    def start(self) -> None:
        """Open files or processes; called once before anything is logged."""

    def log_points(self, points: Sequence[Point]) -> None:
        """Metric points (key, value, step, timestamp_ms)."""

    def log_params(self, params: Mapping[str, object]) -> None:
        """Params, logged once each."""

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Tags; a later value replaces an earlier one."""

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """A file; the caller may delete it as soon as the call returns."""

    def logged_values(self, key: str, after_step: int) -> dict[int, float]:
        """Values already logged into this run for ``key`` at steps ``>= after_step`` (resume)."""

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` until everything logged so far is stored; True when it is."""

    def close(self, timeout_s: float | None = None) -> None:
        """Flush (bounded) and release everything; idempotent."""


@dataclass
class MemorySink:
    """Keeps everything in lists: for tests and for reading a session's output in-process."""

    points: list[Point] = field(default_factory=list)
    params: dict[str, object] = field(default_factory=dict)
    tags: dict[str, object] = field(default_factory=dict)
    artifacts: list[tuple[str, str | None, bytes]] = field(default_factory=list)
    started: bool = False
    closed: bool = False

    def start(self) -> None:
        self.started = True

    def log_points(self, points: Sequence[Point]) -> None:
        self.points.extend(points)

    def log_params(self, params: Mapping[str, object]) -> None:
        self.params.update(params)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self.tags.update(tags)

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.artifacts.append((os.path.basename(local_path), artifact_path, Path(local_path).read_bytes()))

    def logged_values(self, key: str, after_step: int) -> dict[int, float]:
        return {p.step: p.value for p in self.points if p.key == key and p.step >= after_step}

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def close(self, timeout_s: float | None = None) -> None:
        self.closed = True

    def history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every point of ``key``, in logging order."""
        return [(p.step, p.value) for p in self.points if p.key == key]

    def last(self) -> dict[str, float]:
        """The latest value of every key (what MLflow shows as a run's metrics)."""
        out: dict[str, float] = {}
        for p in sorted(self.points, key=lambda p: p.step):
            out[p.key] = p.value
        return out


class LocalSink:
    """Writes a run into a folder: ``points.csv``, ``params.json``, ``tags.json`` and artifacts.

    The fallback when there is no MLflow run: nothing measured is lost, and the folder can be
    read by a person or a script. ``points.csv`` has the columns ``key,value,step,timestamp_ms``.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._points_f: Any = None
        self._writer: Any = None
        self._params: dict[str, object] = {}
        self._tags: dict[str, object] = {}
        self._json_lock = threading.Lock()  # tags from a finishing stage's chart thread (wattlog.finisher)

    @property
    def destination(self) -> tuple[str, str]:
        """Where it writes: two sinks with the same destination are one stream (wattlog.finisher)."""
        return ("local", str(self.directory.absolute()))

    def start(self) -> None:
        """Open the folder (idempotent)."""
        if self._points_f is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.directory / "points.csv"
        new = not path.exists()
        self._points_f = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.writer(self._points_f)
        if new:
            self._writer.writerow(["key", "value", "step", "timestamp_ms"])
        for name, held in (("params.json", self._params), ("tags.json", self._tags)):  # a later stage of the run:
            try:  # keep what earlier stages wrote (a tag set then, such as a sweep link, is not re-sent)
                held.update({**dict(json.loads((self.directory / name).read_text())), **held})
            except (OSError, ValueError, TypeError):  # none yet, or not a JSON object: start afresh
                pass

    def log_points(self, points: Sequence[Point]) -> None:
        if self._writer is None:
            return
        for p in points:
            self._writer.writerow([p.key, repr(float(p.value)), p.step, p.timestamp_ms])

    def log_params(self, params: Mapping[str, object]) -> None:
        self._params.update({k: str(v) for k, v in params.items()})
        self._write_json("params.json", self._params)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self._tags.update({k: str(v) for k, v in tags.items()})
        self._write_json("tags.json", self._tags)

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        dest = self.directory / (artifact_path or "")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, dest / os.path.basename(local_path))

    def logged_values(self, key: str, after_step: int) -> dict[int, float]:
        path = self.directory / "points.csv"
        if not path.exists():
            return {}
        if self._points_f is not None:
            self._points_f.flush()
        with open(path, newline="") as f:
            return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f)
                    if r["key"] == key and int(r["step"]) >= after_step}

    def flush(self, timeout_s: float | None = None) -> bool:
        if self._points_f is not None:
            self._points_f.flush()
        return True

    def close(self, timeout_s: float | None = None) -> None:
        if self._points_f is not None:
            self._points_f.close()
            self._points_f = self._writer = None

    def _write_json(self, name: str, data: dict[str, object]) -> None:
        if self._points_f is None:
            return
        with self._json_lock:
            tmp = self.directory / f".{name}.tmp"
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.directory / name)


class LoggerSink:
    """Gives Lightning's other loggers (CSV, TensorBoard, W&B, ...) the same metric points.

    Loggers are not thread-safe; sessions call sinks on the training thread only. A logger that
    raises is reported through ``on_error(reason, exc)`` and the others still get the points.
    """

    def __init__(self, loggers: Iterable[Any], on_error: Any) -> None:
        self._loggers = list(loggers)
        self._on_error = on_error

    def start(self) -> None:
        pass

    def log_points(self, points: Sequence[Point]) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for p in points:
            by_step.setdefault(p.step, {})[p.key] = p.value
        for step, metrics in sorted(by_step.items()):
            for logger in self._loggers:
                try:
                    logger.log_metrics(metrics, step=step)
                except Exception as exc:  # noqa: BLE001 - another logger must not stop training
                    self._on_error(f"{type(logger).__name__}.log_metrics failed: {exc}", exc)

    def log_params(self, params: Mapping[str, object]) -> None:
        pass  # the loggers' own hparams belong to the user; energy params go to the primary sink

    def set_tags(self, tags: Mapping[str, object]) -> None:
        pass

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        pass

    def logged_values(self, key: str, after_step: int) -> dict[int, float]:
        return {}

    def flush(self, timeout_s: float | None = None) -> bool:
        for logger in self._loggers:
            try:
                logger.save()
            except Exception as exc:  # noqa: BLE001
                self._on_error(f"{type(logger).__name__}.save failed: {exc}", exc)
        return True

    def close(self, timeout_s: float | None = None) -> None:
        self.flush()


class MultiSink:
    """Fans every call out to several sinks; ``logged_values`` and ``flush`` use the first (primary)."""

    def __init__(self, sinks: Sequence[Any]) -> None:
        if not sinks:
            raise ValueError("MultiSink needs at least one sink")
        self.sinks = list(sinks)

    @property
    def primary(self) -> Any:
        return self.sinks[0]

    def start(self) -> None:
        for s in self.sinks:
            s.start()

    def log_points(self, points: Sequence[Point]) -> None:
        for s in self.sinks:
            s.log_points(points)

    def log_params(self, params: Mapping[str, object]) -> None:
        for s in self.sinks:
            s.log_params(params)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        for s in self.sinks:
            s.set_tags(tags)

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        for s in self.sinks:
            s.log_artifact(local_path, artifact_path)

    def logged_values(self, key: str, after_step: int) -> dict[int, float]:
        return self.primary.logged_values(key, after_step)

    def flush(self, timeout_s: float | None = None) -> bool:
        ok = True
        for s in self.sinks:
            ok = s.flush(timeout_s) and ok
        return ok

    def close(self, timeout_s: float | None = None) -> None:
        errors: list[BaseException] = []
        for s in self.sinks:
            try:
                s.close(timeout_s)
            except BaseException as exc:  # noqa: BLE001 - close the others, then raise the first
                errors.append(exc)
        if errors:
            raise errors[0]


def split_primary(sink: Any) -> tuple[Any, list[Any]]:
    """``(primary, others)``: a :class:`MultiSink`'s first sink and the rest; any other sink alone."""
    if isinstance(sink, MultiSink):
        return sink.primary, sink.sinks[1:]
    return sink, []
