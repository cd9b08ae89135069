"""MlflowSink (spool + delivery child process) and its Follower, against a real sqlite MLflow store.

The training process only appends to the spool; ``python -m wattlog.sinks.deliver`` (a child process)
follows it and writes to MLflow. Tests that need a misbehaving MLflow client run the child's
:class:`~wattlog.sinks.deliver.Follower` in-process with a fake ``client_factory``; the rest run the
real child. Marked slow: a real ``mlflow server`` killed mid-stream, and a parent death during an outage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import (  # noqa: E402
    INVALID_PARAMETER_VALUE,
    PERMISSION_DENIED,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.tracking import MlflowClient  # noqa: E402

from wattlog.errors import ConfigError, SinkError, WattlogWarning  # noqa: E402
from wattlog.sinks.deliver import Follower, classify  # noqa: E402
from wattlog.sinks.mlflow import MlflowSink, Point, redact_uri, sync  # noqa: E402
from wattlog.sinks.spool import ack_file, artifacts_dir, read_acks  # noqa: E402

from mlflow_server import MlflowServer, free_port, make_template_db  # noqa: E402

KEYS = [f"energy/k{j}" for j in range(5)]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow sqlite database (creating one takes seconds; copying it does not)."""
    return make_template_db(tmp_path_factory.mktemp("template") / "mlflow.db")


@pytest.fixture
def store(tmp_path: Path, template_db: Path) -> tuple[str, MlflowClient, str]:
    """A sqlite tracking store with one active run: (uri, client, run_id)."""
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("wattlog-test", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, client.create_run(exp).info.run_id


@pytest.fixture
def lenient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-strict failure policy (warn, never raise)."""
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)


def make_points(n_steps: int, keys: list[str] = KEYS, step0: int = 0) -> list[list[Point]]:
    """One list per step, one point per key; value encodes (key index, step)."""
    return [
        [Point(k, float(1000 * j + s), s, 1_700_000_000_000 + s) for j, k in enumerate(keys)]
        for s in range(step0, step0 + n_steps)
    ]


def history_counts(client: MlflowClient, run_id: str, keys: list[str] = KEYS) -> dict[str, int]:
    return {k: len(client.get_metric_history(run_id, k)) for k in keys}


def assert_exactly_once(client: MlflowClient, run_id: str, n_steps: int, keys: list[str] = KEYS) -> None:
    for j, k in enumerate(keys):
        hist = client.get_metric_history(run_id, k)
        assert sorted(m.step for m in hist) == list(range(n_steps)), k
        assert all(m.value == 1000 * j + m.step for m in hist)


def unreachable_warnings(rec: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in rec if "is unreachable" in str(w.message)]


def left_warnings(rec: list[warnings.WarningMessage], spool_path: Path) -> list[str]:
    return [str(w.message) for w in rec if f"wattlog sync --spool {spool_path}" in str(w.message)]


def dead_uri() -> str:
    """An http URI nobody listens on: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def unacked(spool_path: Path) -> int:
    """How many records of a spool MLflow has not acknowledged (what `wattlog sync` would send)."""
    return Follower(spool_path, "sqlite:///unused.db").poll()


def spool_only(run_id: str, spool_dir: Path, fill) -> Path:
    """A spool written by a sink without a delivery process (``deliver=False``); ``fill(sink)`` logs."""
    sink = MlflowSink(run_id, "sqlite:///unused.db", spool_dir=spool_dir, deliver=False)
    sink.start()
    fill(sink)
    sink.close()
    return sink.spool_path


def drive(follower: Follower, rounds: int = 20_000) -> None:
    """Run a Follower in-process (the delivery child's loop, without its parent) until nothing is pending."""
    for _ in range(rounds):
        follower.poll()
        if follower.pending == 0:
            return
        if not follower.deliver():
            time.sleep(0.002)  # backing off
    raise AssertionError(f"{follower.pending} records still pending after {rounds} rounds")


def open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def exited(pid: int) -> bool:
    """True once ``pid`` is gone (or a zombie nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def wait_exited(pid: int, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not exited(pid):
        assert time.monotonic() < deadline, f"delivery process {pid} is still running"
        time.sleep(0.05)


def wait_ready(sink: MlflowSink, limit_s: float = 120.0) -> None:
    """Until the delivery process has said ``ready`` (it sends from then on)."""
    deadline = time.monotonic() + limit_s
    while not sink._child_ready:
        assert time.monotonic() < deadline, "the delivery process never became ready"
        sink._read_reports()
        time.sleep(0.02)


def spawn_stand_in(code: str):
    """A ``MlflowSink._spawn`` that starts ``code`` instead of the delivery process (same pipes)."""
    def spawn(self: MlflowSink) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        os.set_blocking(self._proc.stdout.fileno(), False)
    return spawn


class FlakyClient:
    """A real MlflowClient whose first ``fail`` log_batch calls raise; counts the calls.

    With ``deliver_then_fail``, a failing call first delivers the batch (the response was lost).
    """

    def __init__(self, uri: str, fail: int = 0, deliver_then_fail: bool = False) -> None:
        self.real = MlflowClient(uri)
        self.fail = fail
        self.deliver_then_fail = deliver_then_fail
        self.calls = 0

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self.calls += 1
        if self.fail > 0:
            self.fail -= 1
            if self.deliver_then_fail:
                self.real.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
            raise MlflowException("connection reset by peer", error_code=TEMPORARILY_UNAVAILABLE)
        return self.real.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def __getattr__(self, name):
        return getattr(self.real, name)


class RecordingClient:
    """No MLflow at all: remembers every metric it is sent (for volumes a sqlite store is slow at)."""

    def __init__(self) -> None:
        self.metrics: list = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self.metrics.extend(metrics)

    def get_metric_history(self, run_id, key):
        return [m for m in self.metrics if m.key == key]


# --------------------------------------------------------------------- the sink with its delivery process


def test_points_land_exactly_once_through_the_delivery_process(store, tmp_path):
    uri, client, run_id = store
    threads_before = set(threading.enumerate())
    sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
    sink.start()
    pid = sink.delivery_pid
    assert pid is not None and pid != os.getpid()  # delivery happens in a child process ...
    for step_points in make_points(1000):  # 5,000 points
        sink.log_points(step_points)
    assert set(threading.enumerate()) <= threads_before  # ... and the training process starts no thread
    wait_ready(sink)  # else flush() takes delivery over (see the tests of short stages below)
    if hasattr(os, "getpriority"):  # it lowered its own priority, once: behind the training, not starved
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    assert sink.flush(timeout_s=120)
    assert sink.delivery_pid == pid
    sink.close()
    assert sink.delivery_pid is None and exited(pid)  # nothing left behind
    assert str(sink.spool_path) not in open_files()
    assert_exactly_once(client, run_id, 1000)
    assert read_acks(ack_file(sink.spool_path)).ranges == [(1, 5000)]
    sink.close()  # idempotent


def test_spool_format_and_permissions(store, tmp_path):
    uri, _client, run_id = store
    spool_dir = tmp_path / "new" / "spool"
    sink = MlflowSink(run_id, uri, spool_dir=spool_dir)
    assert sink.spool_path == spool_dir.absolute() / f"{run_id}.jsonl"
    assert not spool_dir.exists()  # no I/O before start()
    sink.start()
    sink.log_points([Point("energy/step_j", 1.5, 3, 1234)])
    assert sink.flush(60)
    sink.close()
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(sink.spool_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ack_file(sink.spool_path).stat().st_mode) == 0o600
    header, line = [json.loads(x) for x in sink.spool_path.read_text().splitlines()]
    assert header["wattlog_spool"] == 1 and header["run_id"] == run_id and header["tracking_uri"] == uri
    assert line == {"seq": 1, "k": "energy/step_j", "v": 1.5, "s": 3, "t": 1234}


def test_logged_values_are_read_from_the_spool(tmp_path):
    def fill(sink):
        sink.log_points([Point("energy/total_j", float(10 * s), s, 1) for s in range(6)])
        sink.log_points([Point("energy/step_j", 1.0, 9, 1)])

    path = spool_only("run1", tmp_path / "spool", fill)
    sink = MlflowSink("run1", "sqlite:///unused.db", spool_dir=path.parent, deliver=False)
    assert sink.logged_values("energy/total_j", 3) == {3: 30.0, 4: 40.0, 5: 50.0}
    assert sink.logged_values("energy/missing", 0) == {}


def test_outage_spools_everything_then_sync_delivers(store, tmp_path, lenient):
    uri, client, run_id = store
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink = MlflowSink(run_id, dead_uri(), spool_dir=tmp_path / "spool")
        sink.start()
        for step_points in make_points(200):
            sink.log_points(step_points)  # neither blocks nor raises
        assert sink.flush(timeout_s=1.0) is False
        sink.close(timeout_s=0.2)
    assert len(unreachable_warnings(rec)) == 1
    assert str(sink.spool_path) in unreachable_warnings(rec)[0]
    assert len(left_warnings(rec, sink.spool_path)) == 1
    assert unacked(sink.spool_path) == 1000
    assert len(sink.spool_path.read_text().splitlines()) == 1 + 1000
    assert history_counts(client, run_id) == dict.fromkeys(KEYS, 0)

    result = sync(sink.spool_path, tracking_uri=uri)
    assert (result.sent, result.skipped, result.files) == (1000, 0, 1)
    assert_exactly_once(client, run_id, 200)
    again = sync(sink.spool_path, tracking_uri=uri)
    assert (again.sent, again.skipped) == (0, 0)
    assert history_counts(client, run_id) == dict.fromkeys(KEYS, 200)


def test_close_leaving_records_warns_once_with_the_sync_hint(store, tmp_path, lenient):
    uri, client, run_id = store
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink = MlflowSink(run_id, dead_uri(), spool_dir=tmp_path / "spool")
        sink.start()
        for step_points in make_points(20):
            sink.log_points(step_points)
        sink.close(timeout_s=0.5)
    texts = [str(w.message) for w in rec if issubclass(w.category, WattlogWarning)]
    assert len(left_warnings(rec, sink.spool_path)) == 1, texts
    assert unacked(sink.spool_path) == 100  # all of it is still in the spool
    assert sink.delivery_pid is None and str(sink.spool_path) not in open_files()
    assert sync(sink.spool_path, tracking_uri=uri).sent == 100
    assert_exactly_once(client, run_id, 20)


def test_strict_close_leaving_records_raises(store, tmp_path, monkeypatch):
    _uri, _client, run_id = store
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    sink = MlflowSink(run_id, dead_uri(), spool_dir=tmp_path / "spool")
    sink.start()
    sink.log_points(make_points(1)[0])  # the training thread is never interrupted
    with pytest.raises(SinkError) as err:
        sink.close(timeout_s=0.2)
    assert str(sink.spool_path) in str(err.value)
    sink.close()  # idempotent, no second raise
    assert unacked(sink.spool_path) == 5


def test_strict_close_that_raises_still_releases_the_spool_file(store, tmp_path, monkeypatch):
    _uri, _client, run_id = store
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    sink = MlflowSink(run_id, dead_uri(), spool_dir=tmp_path / "spool")
    sink.start()
    sink.log_points(make_points(1)[0])
    with pytest.raises(SinkError):
        sink.close(timeout_s=0.2)
    sink.close()
    assert str(sink.spool_path) not in open_files()


def test_close_timeout_is_honoured_while_the_child_is_busy(store, tmp_path, lenient):
    uri, _client, run_id = store
    sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
    sink.start()
    for s in range(20_000):  # 20 batches; each takes the sqlite store a noticeable time
        sink.log_points([Point("energy/k0", float(s), s, 1)])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink.close(timeout_s=0)  # "deliver what you can in 0 s, leave the rest for `wattlog sync`"
    assert unacked(sink.spool_path) > 0
    assert len(left_warnings(rec, sink.spool_path)) == 1


def test_restart_resends_what_a_previous_session_left(store, tmp_path, lenient):
    uri, client, run_id = store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WattlogWarning)
        first = MlflowSink(run_id, dead_uri(), spool_dir=tmp_path / "spool")
        first.start()
        for step_points in make_points(50):
            first.log_points(step_points)
        first.log_params({"energy.gpu_method": "none"})
        first.close(timeout_s=0.3)
    assert unacked(first.spool_path) == 251

    second = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
    second.start()
    for step_points in make_points(50, step0=50):
        second.log_points(step_points)
    assert second.flush(60)  # covers the first session's records too
    second.close()
    assert_exactly_once(client, run_id, 100)
    assert client.get_run(run_id).data.params == {"energy.gpu_method": "none"}
    assert read_acks(ack_file(second.spool_path)).ranges == [(1, 501)]
    assert sync(second.spool_path, tracking_uri=uri).sent == 0


def test_strict_mode_raises_from_flush_and_close(store, tmp_path, monkeypatch):
    _uri, _client, run_id = store
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    sink = MlflowSink(run_id, dead_uri(), spool_dir=tmp_path / "spool")
    sink.start()
    sink.log_points(make_points(10)[0])  # the training thread is never interrupted
    with pytest.raises(SinkError, match="is unreachable"):
        sink.flush(timeout_s=60)
    with pytest.raises(SinkError, match="wattlog sync --spool"):
        sink.close(timeout_s=0.2)
    sink.close()  # idempotent, no second raise


def test_unwritable_spool_warns_and_still_delivers(store, tmp_path, monkeypatch):
    uri, client, run_id = store
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")  # a file where a directory should be: unwritable even as root
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    sink = MlflowSink(run_id, uri, spool_dir=blocker / "spool")
    with pytest.warns(WattlogWarning, match="cannot write the spool"):
        sink.start()
    for step_points in make_points(20):
        sink.log_points(step_points)
    assert sink.flush(60)
    sink.close()
    assert_exactly_once(client, run_id, 20)
    shutil.rmtree(sink.spool_path.parent, ignore_errors=True)  # the private temporary spool

    monkeypatch.setenv("WATTLOG_STRICT", "1")
    with pytest.raises(SinkError, match="cannot write the spool"):
        MlflowSink(run_id, uri, spool_dir=blocker / "spool").start()


def test_credentials_never_reach_spool_warnings_errors_or_the_command_line(store, tmp_path, lenient, monkeypatch):
    _uri, _client, run_id = store
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-canary-9876")
    canary = f"https://user:s3cr3t@127.0.0.1:{free_port()}"
    assert redact_uri(canary) == canary.replace("user:s3cr3t@", "")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink = MlflowSink(run_id, canary, spool_dir=tmp_path / "spool")
        sink.start()
        sink.log_points(make_points(3)[0])
        sink.flush(timeout_s=1.0)  # by now the child runs its own program (exec'd)
        with open(f"/proc/{sink.delivery_pid}/cmdline", "rb") as f:
            cmdline = f.read().decode()  # what `ps` shows every user
        sink.set_tags({"energy.degraded": "no"})
        sink.close(timeout_s=0.1)
    texts = [str(w.message) for w in rec]
    assert unreachable_warnings(rec) and left_warnings(rec, sink.spool_path)
    spool_text = sink.spool_path.read_text()
    assert json.loads(spool_text.splitlines()[0])["tracking_uri"] == redact_uri(canary)
    assert json.loads(spool_text.splitlines()[-1])["type"] == "tag"  # the tag waits in the spool too
    assert "wattlog.sinks.deliver" in cmdline
    for text in [*texts, spool_text, cmdline]:
        assert "s3cr3t" not in text and "tok-canary-9876" not in text

    monkeypatch.setenv("WATTLOG_STRICT", "1")
    strict = MlflowSink(run_id, canary, spool_dir=tmp_path / "spool2")
    strict.start()
    strict.log_points(make_points(1)[0])
    with pytest.raises(SinkError) as err:
        strict.flush(timeout_s=60)
    assert "s3cr3t" not in str(err.value) and err.value.__cause__ is None
    with pytest.raises(SinkError) as err:
        strict.close(timeout_s=0.1)
    assert "s3cr3t" not in str(err.value)


def test_bad_keys_and_non_finite_values(store, tmp_path, monkeypatch):
    uri, client, run_id = store
    sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    with pytest.raises(ConfigError, match="key"):
        sink.log_points([Point("energy/bad key!", 1.0, 0, 0)])
    with pytest.raises(ConfigError):
        sink.log_points([Point("../escape", 1.0, 0, 0)])
    with pytest.raises(SinkError, match="non-finite"):
        sink.log_points([Point("energy/power_w", float("nan"), 0, 0)])
    monkeypatch.delenv("WATTLOG_STRICT")
    sink.start()
    with pytest.warns(WattlogWarning, match="non-finite") as rec:
        sink.log_points([Point("energy/power_w", float("inf"), 1, 1), Point("energy/power_w", 5.0, 1, 1)])
        sink.log_points([Point("energy/power_w", float("nan"), 2, 2)])
    assert len(rec) == 1
    with pytest.warns(WattlogWarning, match="invalid MLflow metric key") as rec:
        sink.log_points([Point("energy/bad key!", 1.0, 0, 0)])
        sink.log_points([Point("energy/bad key!", 1.0, 0, 0)])
    assert len(rec) == 1
    assert sink.flush(60)
    sink.close()
    assert [m.value for m in client.get_metric_history(run_id, "energy/power_w")] == [5.0]


def test_params_tags_artifact_and_summary(store, tmp_path):
    uri, client, run_id = store
    sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
    sink.start()
    sink.log_params({"energy.gpu_count": 2, "energy.pue": 1.2})
    sink.set_tags({"energy.degraded": "cpu: rapl unreadable"})
    trace = tmp_path / "trace.csv"
    trace.write_text("step,j\n0,1.0\n")
    sink.log_artifact(trace, "energy")
    trace.unlink()  # the sink copied it into the spool: the caller may delete it at once
    sink.log_summary_metrics({"energy/gpu_j": 900.0, "energy/duration_s": 12.0}, step=7)
    assert sink.flush(60)
    sink.close()
    run = client.get_run(run_id)
    assert run.data.params == {"energy.gpu_count": "2", "energy.pue": "1.2"}
    assert run.data.tags["energy.degraded"] == "cpu: rapl unreadable"
    assert run.data.metrics["energy/gpu_j"] == 900.0
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "energy/duration_s")] == [(7, 12.0)]
    assert [f.path for f in client.list_artifacts(run_id, "energy")] == ["energy/trace.csv"]
    assert list(artifacts_dir(sink.spool_path.parent, run_id).iterdir()) == []  # delivered copy deleted


def test_outage_run_data_never_blocks_caller_and_sync_delivers_once(store, tmp_path, lenient, monkeypatch):
    """The delivery process is stuck inside a request to a server that never answers; the caller is not."""
    uri, client, run_id = store
    monkeypatch.setenv("WATTLOG_DELIVERY_REQUEST_TIMEOUT_S", "1")
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(8)
    held: list[socket.socket] = []
    payload = bytes(range(256)) * 40  # not UTF-8: compared byte for byte
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            sink = MlflowSink(run_id, f"http://127.0.0.1:{blackhole.getsockname()[1]}",
                              spool_dir=tmp_path / "spool")
            sink.start()
            sink.log_points(make_points(2)[0])
            assert sink.flush(timeout_s=0) is False  # ask for a send ...
            blackhole.settimeout(60)
            held.append(blackhole.accept()[0])  # ... the delivery process is now waiting for an answer
            sink.log_params({"energy.gpu_count": 2, "energy.pue": 1.2})  # these return meanwhile
            sink.set_tags({"energy.degraded": "cpu: rapl unreadable"})
            with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:  # deleted right after, like the callback's
                (Path(tmp) / "trace.csv").write_bytes(payload)
                sink.log_artifact(Path(tmp) / "trace.csv", "energy")
            assert sink.flush(timeout_s=0.5) is False
            sink.close(timeout_s=0.2)
    finally:
        for s in [*held, blackhole]:
            s.close()
    assert unreachable_warnings(rec) and left_warnings(rec, sink.spool_path)
    assert unacked(sink.spool_path) == 5 + 2 + 1 + 1

    lines = [json.loads(x) for x in sink.spool_path.read_text().splitlines()[1:]]
    assert [x.get("type", "point") for x in lines] == ["point"] * 5 + ["param", "param", "tag", "artifact"]
    assert lines[5] == {"seq": 6, "type": "param", "k": "energy.gpu_count", "v": "2"}
    art = lines[-1]
    assert art["p"] == "energy" and art["n"] == len(payload) and art["f"].startswith(f"{run_id}.artifacts/")
    copy = sink.spool_path.parent / art["f"]
    assert copy.read_bytes() == payload and stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
    assert history_counts(client, run_id) == dict.fromkeys(KEYS, 0)

    result = sync(sink.spool_path, tracking_uri=uri)
    assert result.sent_by_kind == {"point": 5, "param": 2, "tag": 1, "artifact": 1}
    assert (result.skipped, result.rejected, result.deferred) == (0, 0, 0)
    run = client.get_run(run_id)
    assert run.data.params == {"energy.gpu_count": "2", "energy.pue": "1.2"}
    assert run.data.tags["energy.degraded"] == "cpu: rapl unreadable"
    assert [(f.path, f.file_size) for f in client.list_artifacts(run_id, "energy")] == [
        ("energy/trace.csv", len(payload))
    ]
    got = Path(client.download_artifacts(run_id, "energy/trace.csv", str(tmp_path)))
    assert got.read_bytes() == payload
    assert not copy.exists()  # delivered: the spooled copy is gone
    again = sync(sink.spool_path, tracking_uri=uri)
    assert (again.sent, again.skipped, again.rejected) == (0, 0, 0)
    assert history_counts(client, run_id) == dict.fromkeys(KEYS, 1)


def test_strict_conflicting_param_raises_at_flush_or_close(store, tmp_path, monkeypatch):
    uri, client, run_id = store
    client.log_param(run_id, "energy.pue", "1.0")
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    strict = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
    strict.start()
    strict.log_params({"energy.pue": 2.0})
    with pytest.raises(SinkError, match="conflict"):
        strict.flush(60)  # the report follows the ack: it may surface at close instead (see report)
        strict.close()
    strict.close()
    assert client.get_run(run_id).data.params == {"energy.pue": "1.0"}


# --------------------------------------------------------------------- the training process holds no buffer


def test_100k_points_keep_the_training_process_flat_and_each_lands_once(tmp_path, lenient):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WattlogWarning)
        sink = MlflowSink("run100k", dead_uri(), spool_dir=tmp_path / "spool")  # nothing is delivered meanwhile
        sink.start()
        for s in range(1000):  # warm-up: allocator pools, key cache, warning registry
            sink.log_points([Point("energy/step_j", float(s), s, 1)])
        rss_before = rss_bytes()
        for s in range(1000, 100_000):
            sink.log_points([Point("energy/step_j", float(s), s, 1)])
        rss_growth = rss_bytes() - rss_before
        sink.close(timeout_s=0)
    spool_size = sink.spool_path.stat().st_size
    assert spool_size > 5_000_000
    assert rss_growth < spool_size // 2  # any in-memory copy of what was spooled would be bigger
    assert unacked(sink.spool_path) == 100_000  # all of it is in the spool ...

    recorder = RecordingClient()
    follower = Follower(sink.spool_path, "http://later", client_factory=lambda u: recorder)
    drive(follower)
    follower.close()
    counts = Counter(m.step for m in recorder.metrics)
    assert set(counts) == set(range(100_000)) and set(counts.values()) == {1}  # ... and lands exactly once
    assert read_acks(ack_file(sink.spool_path)).ranges == [(1, 100_000)]


# --------------------------------------------------------------------- the Follower (the child's loop) in-process


@pytest.mark.parametrize("deliver_then_fail", [False, True], ids=["refused", "response-lost"])
def test_server_comes_back_every_point_once(store, tmp_path, deliver_then_fail):
    uri, client, run_id = store
    path = spool_only(run_id, tmp_path / "spool", lambda s: [s.log_points(p) for p in make_points(300)])
    flaky = FlakyClient(uri, fail=3, deliver_then_fail=deliver_then_fail)
    reports: list[tuple[str, str]] = []
    follower = Follower(path, uri, client_factory=lambda u: flaky, report=lambda k, m: reports.append((k, m)),
                        max_backoff_s=0.01)
    drive(follower)
    follower.close()
    assert flaky.fail == (0 if not deliver_then_fail else 1)  # a lost response: the retry finds it delivered
    kinds = [k for k, _m in reports]
    if not deliver_then_fail:
        assert kinds == ["outage", "recovered"]  # one report per outage, not per attempt
    else:  # each batch's lost response is an outage of its own
        assert kinds[:2] == ["outage", "recovered"] and set(kinds) == {"outage", "recovered"}
    assert str(path) in reports[0][1]
    assert_exactly_once(client, run_id, 300)
    assert read_acks(ack_file(path)).ranges == [(1, 1500)]
    assert sync(path, tracking_uri=uri).sent == 0


def test_run_data_waits_in_the_spool_through_an_outage(store, tmp_path):
    uri, client, run_id = store
    art = tmp_path / "early.bin"
    art.write_bytes(b"spilled")

    def fill(sink):
        for s, step_points in enumerate(make_points(100)):
            sink.log_points(step_points)
            if s == 5:  # run data early on: read back from the spool in order, like points
                sink.log_params({"energy.pue": 1.1})
                sink.set_tags({"energy.estimated": "cpu"})
                sink.log_artifact(art, "energy")
                art.unlink()

    path = spool_only(run_id, tmp_path / "spool", fill)
    gate = threading.Event()

    class GatedClient(FlakyClient):
        def log_batch(self, run_id, **kw):
            if not gate.is_set():
                raise MlflowException("503 Service Unavailable", error_code=TEMPORARILY_UNAVAILABLE)
            return super().log_batch(run_id, **kw)

    follower = Follower(path, uri, client_factory=lambda u: GatedClient(uri), max_backoff_s=0.01)
    for _ in range(20):
        follower.poll()
        follower.deliver()
        time.sleep(0.01)
    assert follower.pending == 503 and not read_acks(ack_file(path)).ranges
    gate.set()
    drive(follower)
    follower.close()
    assert_exactly_once(client, run_id, 100)
    assert read_acks(ack_file(path)).ranges == [(1, 503)]
    run = client.get_run(run_id)
    assert run.data.params == {"energy.pue": "1.1"} and run.data.tags["energy.estimated"] == "cpu"
    assert [(f.path, f.file_size) for f in client.list_artifacts(run_id, "energy")] == [("energy/early.bin", 7)]
    assert list(artifacts_dir(path.parent, run_id).iterdir()) == []  # delivered copies deleted


def test_permanently_rejected_point_is_dropped_alone(store, tmp_path):
    uri, client, run_id = store

    class PickyClient(FlakyClient):
        def log_batch(self, run_id, metrics=(), **kw):
            if any(m.value == 1003.0 for m in metrics):  # energy/k1 at step 3
                raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)
            return super().log_batch(run_id, metrics=metrics, **kw)

    path = spool_only(run_id, tmp_path / "spool", lambda s: [s.log_points(p) for p in make_points(10)])
    reports: list[tuple[str, str]] = []
    follower = Follower(path, uri, client_factory=lambda u: PickyClient(uri),
                        report=lambda k, m: reports.append((k, m)))
    drive(follower)
    follower.close()
    assert [k for k, _m in reports] == ["rejected"]
    assert "energy/k1" in reports[0][1] and "1003.0" in reports[0][1]
    counts = history_counts(client, run_id)
    assert counts == {**dict.fromkeys(KEYS, 10), "energy/k1": 9}
    assert read_acks(ack_file(path)).ranges == [(1, 50)]  # dropped for good, never retried


def test_conflicting_param_is_rejected_once_not_retried(store, tmp_path):
    uri, client, run_id = store
    client.log_param(run_id, "energy.pue", "1.0")

    def fill(sink):
        sink.log_params({"energy.pue": 1.2, "energy.gpu_count": 0})
        sink.log_params({"energy.gpu_count": 0})  # the same value again: nothing to do

    path = spool_only(run_id, tmp_path / "spool", fill)
    flaky = FlakyClient(uri)
    reports: list[tuple[str, str]] = []
    follower = Follower(path, uri, client_factory=lambda u: flaky, report=lambda k, m: reports.append((k, m)))
    drive(follower)
    for _ in range(5):
        follower.poll()
        follower.deliver()
    follower.close()
    assert flaky.calls == 1  # one log_batch (energy.gpu_count), no retry loop
    assert len(reports) == 1 and reports[0][0] == "rejected"
    assert "energy.pue" in reports[0][1] and "conflict" in reports[0][1]
    assert client.get_run(run_id).data.params == {"energy.pue": "1.0", "energy.gpu_count": "0"}
    assert read_acks(ack_file(path)).ranges == [(1, 3)]


def test_broken_artifact_store_does_not_hold_back_points(store, tmp_path, lenient):
    uri, client, run_id = store
    broken = threading.Event()
    broken.set()

    class BrokenArtifactStore(FlakyClient):
        def log_artifact(self, run_id, local_path, artifact_path=None):
            if broken.is_set():
                raise MlflowException("S3 access denied", error_code=TEMPORARILY_UNAVAILABLE)
            return self.real.log_artifact(run_id, local_path, artifact_path)

    art = tmp_path / "power.png"
    art.write_bytes(b"\x89PNG...")

    def fill(sink):
        sink.log_points(make_points(1)[0])
        sink.log_artifact(art, "energy")
        for step_points in make_points(10, step0=1):
            sink.log_points(step_points)

    path = spool_only(run_id, tmp_path / "spool", fill)
    reports: list[tuple[str, str]] = []
    follower = Follower(path, uri, client_factory=lambda u: BrokenArtifactStore(uri),
                        report=lambda k, m: reports.append((k, m)))
    drive(follower)
    follower.close()
    assert_exactly_once(client, run_id, 11)  # nothing behind the artifact waited ...
    assert unacked(path) == 1  # ... which is still owed, in the spool
    assert [k for k, _m in reports] == ["deferred"] and "wattlog sync" in reports[0][1]
    assert client.list_artifacts(run_id, "energy") == []
    broken.clear()
    result = sync(path, tracking_uri=uri)  # what the report says to do
    assert result.sent_by_kind["artifact"] == 1 and result.sent == 1
    assert [f.path for f in client.list_artifacts(run_id, "energy")] == ["energy/power.png"]
    assert read_acks(ack_file(path)).ranges == [(1, 56)]


def test_deleted_run_keeps_its_records_in_the_spool_until_restored(store, tmp_path):
    uri, client, run_id = store
    path = spool_only(run_id, tmp_path / "spool", lambda s: [s.log_points(p) for p in make_points(20)])
    client.delete_run(run_id)
    reports: list[tuple[str, str]] = []
    follower = Follower(path, uri, report=lambda k, m: reports.append((k, m)), max_backoff_s=0.01)
    for _ in range(5):
        follower.poll()
        follower.deliver()
        time.sleep(0.1)
    follower.close()
    assert len(reports) == 1 and run_id in reports[0][1]  # reported once, not per attempt
    assert follower.pending == 100 and unacked(path) == 100  # nothing acked, nothing dropped
    client.restore_run(run_id)
    assert sync(path, tracking_uri=uri).sent == 100
    assert_exactly_once(client, run_id, 20)


def test_deleted_run_is_a_permanent_error_with_the_sync_hint(store, tmp_path):
    uri, client, run_id = store
    path = spool_only(run_id, tmp_path / "spool", lambda s: s.log_points(make_points(1)[0]))
    client.delete_run(run_id)
    reports: list[tuple[str, str]] = []
    follower = Follower(path, uri, report=lambda k, m: reports.append((k, m)))
    follower.poll()
    follower.deliver()
    follower.close()
    assert [k for k, _m in reports] == ["permanent"]
    assert f"wattlog sync --spool {path}" in reports[0][1]


def test_classify_transient_permanent_and_bug():
    import requests

    class Response:
        def __init__(self, status_code: int) -> None:
            self.status_code = status_code

    def http(status: int) -> Exception:
        exc = requests.HTTPError(f"{status} error")
        exc.response = Response(status)  # type: ignore[assignment]
        return exc

    transient = [
        MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        requests.ConnectionError("Max retries exceeded with url"),
        http(503), http(429), http(500),
        MlflowException("API request to http://h/api failed with exception HTTPConnectionPool: Read timed out"),
        type("OperationalError", (Exception,), {})("database is locked"),
    ]
    permanent = [
        MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST),
        MlflowException("forbidden", error_code=PERMISSION_DENIED),
        http(403), http(404),
    ]
    bugs = [ValueError("boom"), KeyError("k"), TypeError("unsupported operand")]
    assert [classify(e) for e in transient] == ["transient"] * len(transient)
    assert [classify(e) for e in permanent] == ["permanent"] * len(permanent)
    assert [classify(e) for e in bugs] == ["bug"] * len(bugs)


def test_bug_in_delivery_is_reported_once_and_retried(store, tmp_path):
    uri, client, run_id = store
    path = spool_only(run_id, tmp_path / "spool", lambda s: s.log_points(make_points(1)[0]))

    class Buggy(FlakyClient):
        fails = 3

        def log_batch(self, run_id, **kw):
            if Buggy.fails:
                Buggy.fails -= 1
                raise ValueError("boom")
            return super().log_batch(run_id, **kw)

    reports: list[tuple[str, str]] = []
    follower = Follower(path, uri, client_factory=lambda u: Buggy(uri), report=lambda k, m: reports.append((k, m)),
                        max_backoff_s=0.01)
    drive(follower)
    follower.close()
    assert [k for k, _m in reports] == ["bug", "recovered"] and "ValueError: boom" in reports[0][1]
    assert_exactly_once(client, run_id, 1)


# --------------------------------------------------------------------- the delivery process outlives no parent


def _parent_script(run_id: str, uri: str, spool_dir: Path, n_steps: int) -> str:
    return textwrap.dedent(f"""
        import os, signal
        from wattlog.sinks.mlflow import MlflowSink, Point
        sink = MlflowSink({run_id!r}, {uri!r}, spool_dir={str(spool_dir)!r})
        sink.start()
        for s in range({n_steps}):
            sink.log_points([Point("energy/k0", float(s), s, 1_700_000_000_000 + s)])
        print(sink.delivery_pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # the training process dies without closing anything
    """)


def _run_parent(script: str) -> int:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.parametrize("n_steps", [200, 2500], ids=["one-batch", "three-batches"])
def test_delivery_process_finishes_and_exits_when_its_parent_dies(store, tmp_path, n_steps):
    """Its reports go nowhere once the parent is gone (a broken pipe): it goes on delivering, past its
    first batch (1000 points)."""
    uri, client, run_id = store
    spool_dir = tmp_path / "spool"
    child = _run_parent(_parent_script(run_id, uri, spool_dir, n_steps))
    wait_exited(child)  # its stdin closed with the parent: it delivers what is left and exits
    hist = client.get_metric_history(run_id, "energy/k0")
    assert sorted(m.step for m in hist) == list(range(n_steps))
    assert read_acks(ack_file(spool_dir / f"{run_id}.jsonl")).ranges == [(1, n_steps)]


@pytest.mark.slow
def test_delivery_process_exits_after_its_parent_dies_during_an_outage(store, tmp_path):
    uri, client, run_id = store
    spool_dir = tmp_path / "spool"
    child = _run_parent(_parent_script(run_id, dead_uri(), spool_dir, 50))
    wait_exited(child)  # gives up after its default exit timeout; the records stay in the spool
    path = spool_dir / f"{run_id}.jsonl"
    assert unacked(path) == 50
    assert sync(path, tracking_uri=uri).sent == 50
    assert sorted(m.step for m in client.get_metric_history(run_id, "energy/k0")) == list(range(50))


# --------------------------------------------------------------------- arguments


@pytest.mark.parametrize("bad", ["../x", "/abs", "/", "energy/../../x", "a/./b", ".", "a\\b"])
def test_artifact_path_is_sanitised(store, tmp_path, monkeypatch, bad):
    _uri, _client, run_id = store
    src = tmp_path / "f.txt"
    src.write_text("x")
    sink = MlflowSink(run_id, "sqlite:///unused.db", spool_dir=tmp_path / "spool")
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    with pytest.raises(ConfigError, match="artifact_path"):
        sink.log_artifact(src, bad)
    with pytest.raises(ConfigError, match="local_path"):
        sink.log_artifact(tmp_path / "missing.txt", "energy")
    monkeypatch.delenv("WATTLOG_STRICT")
    with pytest.warns(WattlogWarning, match="artifact_path"):
        sink.log_artifact(src, bad)
    assert not (tmp_path / "spool").exists()  # nothing copied anywhere


def test_artifact_path_normalisation():
    from wattlog.sinks.spool import check_artifact_path

    assert [check_artifact_path(p) for p in (None, "", "energy", "energy/", "a/b")] == [
        None, None, "energy", "energy", "a/b"
    ]


def test_rejects_bad_configuration(tmp_path):
    with pytest.raises(ConfigError, match="run_id"):
        MlflowSink("")
    not_a_spool = tmp_path / "x.jsonl"
    not_a_spool.write_text("hello\n")
    with pytest.raises(ValueError, match="not a wattlog spool"):
        Follower(not_a_spool, "sqlite:///unused.db")


# --------------------------------------------------------------------- a real tracking server


@pytest.mark.slow
def test_real_server_killed_and_restarted_mid_stream(tmp_path, template_db, lenient):
    db = tmp_path / "server.db"
    shutil.copy(template_db, db)
    local = MlflowClient(f"sqlite:///{db}")
    exp = local.create_experiment("srv", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = local.create_run(exp).info.run_id
    server = MlflowServer(db)
    try:
        server.start()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            sink = MlflowSink(run_id, server.uri, spool_dir=tmp_path / "spool")
            sink.start()
            steps = make_points(400)
            for s in range(200):
                sink.log_points(steps[s])
                time.sleep(0.002)
            deadline = time.monotonic() + 60  # the delivery process is up and sending (slow on a loaded machine)
            while not local.get_run(run_id).data.metrics and time.monotonic() < deadline:
                time.sleep(0.1)
            server.kill()  # crash mid-stream
            for s in range(200, 300):
                sink.log_points(steps[s])
            time.sleep(0.5)
            server.start()
            for s in range(300, 400):
                sink.log_points(steps[s])
            assert sink.flush(timeout_s=120)
            sink.close()
        assert len(unreachable_warnings(rec)) == 1  # one warning per outage
    finally:
        server.kill()
    assert_exactly_once(local, run_id, 400)


def test_a_script_that_ends_right_after_its_last_stage_still_delivers_the_chart(store, tmp_path):
    """power.png is drawn and delivered after suspend() returns (off the training thread); a script
    that simply ends there still gets it: the interpreter waits for the finishing thread."""
    uri, client, run_id = store
    tests_dir = str(Path(__file__).parent)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {tests_dir!r})
        import pytest
        from fakes.nvml import FakeGpu, FakeNvml
        FakeNvml([FakeGpu(power_w=400.0)]).install(pytest.MonkeyPatch())
        import wattlog.artifacts
        from wattlog.ledger import StepLabel
        from wattlog.options import MonitorOptions
        from wattlog.session import EnergySession
        from wattlog.sinks.mlflow import MlflowSink
        real = wattlog.artifacts.ChartJob.collect
        wattlog.artifacts.ChartJob.collect = lambda self, t: (time.sleep(1.0), real(self, t))[1]  # a slow chart
        session = EnergySession(MonitorOptions.from_kwargs(gpus=[0], cpu="none", ram="none"), gpus=[0])
        session.open(MlflowSink({run_id!r}, {uri!r}, spool_dir={str(tmp_path / "spool")!r}))
        for step in range(5):
            session.mark(StepLabel("train", None, 4))
            time.sleep(0.02)
            session.step_completed(step)
        session.end_stage(step=5)
        session.suspend()
        print("alive" if any(t.name == "wattlog-finish" for t in __import__("threading").enumerate()) else "done")
    """)
    env = {k: v for k, v in os.environ.items() if k != "WATTLOG_STRICT"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "alive"  # suspend() returned while the chart was still being drawn
    names = {a.path for a in client.list_artifacts(run_id, "energy")}
    assert names == {"energy/trace.csv", "energy/power.png"}
    assert client.get_run(run_id).data.metrics["energy/total_j"] > 0


# -- short stages: a flush before the delivery process is ready delivers from the training process


def test_flush_before_the_delivery_process_is_ready_delivers_here_exactly_once(store, tmp_path, monkeypatch):
    """A stage shorter than the delivery process's start-up (~2.5 s: importing mlflow, opening the store)
    does not wait for it: flush() stops it (it has sent nothing) and delivers the spool itself."""
    uri, client, run_id = store
    monkeypatch.setattr(MlflowSink, "_spawn", spawn_stand_in("import time; time.sleep(120)"))  # never ready
    sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
    sink.start()
    pid = sink.delivery_pid
    sink.log_params({"energy.pue": 1.2})
    for step_points in make_points(3):
        sink.log_points(step_points)
    trace = tmp_path / "trace.csv"
    trace.write_text("step,j\n0,1.0\n")
    sink.log_artifact(trace, "energy")
    sink.set_tags({"energy.estimated": "cpu"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict or not: no report at all
        assert sink.flush(timeout_s=60)
    assert sink.delivery_pid is None
    wait_exited(pid, 10)
    assert_exactly_once(client, run_id, 3)
    run = client.get_run(run_id)
    assert run.data.params == {"energy.pue": "1.2"} and run.data.tags["energy.estimated"] == "cpu"
    assert [f.path for f in client.list_artifacts(run_id, "energy")] == ["energy/trace.csv"]
    for step_points in make_points(2, step0=3):  # after the flush (the chart, a late summary): close delivers
        sink.log_points(step_points)
    sink.close()
    assert_exactly_once(client, run_id, 5)
    assert unacked(sink.spool_path) == 0
    assert str(sink.spool_path) not in open_files()


def test_taking_over_from_a_delivery_process_that_may_have_sent_deduplicates(store, tmp_path, monkeypatch):
    """Its "ready" line, read only once it is stopped, means it may have sent unacknowledged records:
    the first send here skips what the run already holds."""
    uri, client, run_id = store
    monkeypatch.setattr(MlflowSink, "_spawn", spawn_stand_in(
        "import sys, time; print('{\"kind\": \"ready\", \"message\": \"\"}', flush=True); time.sleep(120)"))
    sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
    sink.start()
    for step_points in make_points(4):
        sink.log_points(step_points)
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(p.key, p.value, p.timestamp_ms, p.step)  # what it sent, unacked
                                      for step_points in make_points(2) for p in step_points])
    time.sleep(0.5)  # its "ready" line is in the pipe, unread
    sink._take_over()
    assert sink._child_ready
    assert sink.flush(timeout_s=60)
    sink.close()
    assert_exactly_once(client, run_id, 4)


@pytest.mark.parametrize("uri, here", [("sqlite:///x.db", True), ("file:///m", True), ("/tmp/mlruns", True),
                                       ("mlruns", True), ("postgresql://u@h/db", False),
                                       ("mysql+pymysql://u@h/db", False), ("http://h:5000", False),
                                       ("HTTPS://h", False), ("databricks", False), ("databricks://profile", False)])
def test_delivery_is_taken_over_only_for_local_stores(uri, here):
    """A server's or a database's client retries for minutes when it is down: no take-over there."""
    assert MlflowSink("r1", uri)._can_take_over() is here


def test_a_taken_over_sink_started_again_by_a_next_stage_gets_a_delivery_process(store, tmp_path, monkeypatch):
    """validate() (short: delivered here) then fit() through the same sink (wattlog.finisher): the fit's
    points reach MLflow while it runs, from a new delivery process, each once."""
    uri, client, run_id = store
    real_spawn = MlflowSink._spawn
    monkeypatch.setattr(MlflowSink, "_spawn", spawn_stand_in("import time; time.sleep(120)"))
    sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
    sink.start()
    for step_points in make_points(2):
        sink.log_points(step_points)
    assert sink.flush(timeout_s=60) and sink.delivery_pid is None  # taken over
    monkeypatch.setattr(MlflowSink, "_spawn", real_spawn)
    sink.start()  # the next stage
    assert sink.delivery_pid is not None
    for step_points in make_points(3, step0=2):
        sink.log_points(step_points)
    wait_ready(sink)
    assert sink.flush(timeout_s=120) and sink.delivery_pid is not None  # delivered by the process
    sink.close()
    assert_exactly_once(client, run_id, 5)
