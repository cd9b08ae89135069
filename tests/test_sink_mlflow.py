"""MlflowSink against a real sqlite MLflow store (and, marked slow, a real `mlflow server`)."""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from wattlog.errors import ConfigError, SinkError, WattlogWarning  # noqa: E402
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
    """Non-strict failure policy; MLflow's own HTTP retries off, so refusals surface at once."""
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


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
    return [str(w.message) for w in rec if "MLflow unreachable" in str(w.message)]


class FlakyClient:
    """A real MlflowClient whose first ``fail`` log_batch calls raise; records the calling threads.

    With ``deliver_then_fail``, a failing call first delivers the batch (the response was lost).
    """

    def __init__(self, uri: str, fail: int = 0, deliver_then_fail: bool = False) -> None:
        self.real = MlflowClient(uri)
        self.fail = fail
        self.deliver_then_fail = deliver_then_fail
        self.calls = 0
        self.threads: set[str] = set()

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.fail > 0:
            self.fail -= 1
            if self.deliver_then_fail:
                self.real.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
            raise MlflowException("connection reset by peer", error_code=TEMPORARILY_UNAVAILABLE)
        return self.real.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_points_land_exactly_once_off_the_caller_thread(store, tmp_path):
    uri, client, run_id = store
    flaky = FlakyClient(uri)
    sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool", flush_interval_s=0.2,
                      _client_factory=lambda u: flaky)
    sink.start()
    for step_points in make_points(1000):  # 5,000 points
        sink.log_points(step_points)
    assert sink.flush(timeout_s=120)
    sink.close()
    assert sink.pending_points == 0
    assert_exactly_once(client, run_id, 1000)
    assert flaky.threads == {"wattlog-mlflow-writer"}
    assert threading.current_thread().name not in flaky.threads
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


def test_outage_spools_everything_then_sync_delivers(store, tmp_path, lenient):
    uri, client, run_id = store
    dead = f"http://127.0.0.1:{free_port()}"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink = MlflowSink(run_id, dead, spool_dir=tmp_path / "spool", batch_size=50,
                          flush_interval_s=0.05, max_backoff_s=0.05)
        sink.start()
        for step_points in make_points(200):
            sink.log_points(step_points)  # neither blocks nor raises
        assert sink.flush(timeout_s=1.0) is False
        time.sleep(0.3)  # several more retries
        sink.close(timeout_s=0.2)
    assert len(unreachable_warnings(rec)) == 1
    msg = unreachable_warnings(rec)[0]
    assert str(sink.spool_path) in msg and "wattlog sync" in msg
    assert any("not delivered" in str(w.message) for w in rec)
    assert sink.pending_points == 1000
    assert len(sink.spool_path.read_text().splitlines()) == 1 + 1000
    assert history_counts(client, run_id) == dict.fromkeys(KEYS, 0)

    result = sync(sink.spool_path, tracking_uri=uri)
    assert (result.sent, result.skipped, result.files) == (1000, 0, 1)
    assert_exactly_once(client, run_id, 200)
    again = sync(sink.spool_path, tracking_uri=uri)
    assert (again.sent, again.skipped) == (0, 0)
    assert history_counts(client, run_id) == dict.fromkeys(KEYS, 200)


@pytest.mark.parametrize("deliver_then_fail", [False, True], ids=["refused", "response-lost"])
def test_server_comes_back_every_point_once(store, tmp_path, lenient, deliver_then_fail):
    uri, client, run_id = store
    flaky = FlakyClient(uri, fail=3, deliver_then_fail=deliver_then_fail)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool", batch_size=100,
                          flush_interval_s=0.05, max_backoff_s=0.05, _client_factory=lambda u: flaky)
        sink.start()
        for step_points in make_points(300):
            sink.log_points(step_points)
        assert sink.flush(timeout_s=60)
        sink.close()
    assert flaky.fail == 0 and flaky.calls > 3
    assert len(unreachable_warnings(rec)) == 1
    assert_exactly_once(client, run_id, 300)
    assert sync(sink.spool_path, tracking_uri=uri).sent == 0


def test_memory_bound_spills_to_spool_and_reads_back(store, tmp_path, lenient):
    uri, client, run_id = store
    gate = threading.Event()

    class GatedClient(FlakyClient):
        def log_batch(self, run_id, **kw):
            if not gate.is_set():
                raise MlflowException("503 Service Unavailable", error_code=TEMPORARILY_UNAVAILABLE)
            return super().log_batch(run_id, **kw)

    gated = GatedClient(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WattlogWarning)
        sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool", batch_size=40, flush_interval_s=0.02,
                          max_backoff_s=0.02, max_buffer_points=50, _client_factory=lambda u: gated)
        sink.start()
        art = tmp_path / "early.bin"
        art.write_bytes(b"spilled")
        for s, step_points in enumerate(make_points(100)):
            sink.log_points(step_points)
            if s == 5:  # run data early on: it is spilled and read back from the spool like points
                sink.log_params({"energy.pue": 1.1})
                sink.set_tags({"energy.estimated": "cpu"})
                sink.log_artifact(art, "energy")
                art.unlink()
        assert sink.flush(timeout_s=0.5) is False
        assert sink.pending_points == 503
        assert len(sink._unsent) <= 50  # the rest lives only in the spool
        gate.set()
        assert sink.flush(timeout_s=60)
        sink.close()
    assert_exactly_once(client, run_id, 100)
    assert read_acks(ack_file(sink.spool_path)).ranges == [(1, 503)]
    run = client.get_run(run_id)
    assert run.data.params == {"energy.pue": "1.1"} and run.data.tags["energy.estimated"] == "cpu"
    assert [(f.path, f.file_size) for f in client.list_artifacts(run_id, "energy")] == [("energy/early.bin", 7)]
    assert list(artifacts_dir(sink.spool_path.parent, run_id).iterdir()) == []  # delivered copies deleted


def test_restart_resends_what_a_previous_session_left(store, tmp_path, lenient):
    uri, client, run_id = store
    dead = f"http://127.0.0.1:{free_port()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WattlogWarning)
        first = MlflowSink(run_id, dead, spool_dir=tmp_path / "spool", max_backoff_s=0.05)
        first.start()
        for step_points in make_points(50):
            first.log_points(step_points)
        first.log_params({"energy.gpu_method": "none"})
        first.close(timeout_s=0.3)
    assert first.pending_points == 251

    second = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool", flush_interval_s=0.05)
    second.start()
    assert second.pending_points == 251
    for step_points in make_points(50, step0=50):
        second.log_points(step_points)
    assert second.flush(60)
    second.close()
    assert_exactly_once(client, run_id, 100)
    assert client.get_run(run_id).data.params == {"energy.gpu_method": "none"}
    assert sync(second.spool_path, tracking_uri=uri).sent == 0


def test_strict_mode_raises_from_flush_and_close(store, tmp_path, monkeypatch):
    _uri, _client, run_id = store
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    sink = MlflowSink(run_id, f"http://127.0.0.1:{free_port()}", spool_dir=tmp_path / "spool",
                      max_backoff_s=0.05)
    sink.start()
    sink.log_points(make_points(10)[0])  # the training thread is never interrupted
    with pytest.raises(SinkError, match="MLflow unreachable"):
        sink.flush(timeout_s=30)
    with pytest.raises(SinkError):
        sink.close(timeout_s=0.2)
    sink.close()  # idempotent, no second raise


def test_unwritable_spool_warns_and_still_delivers(store, tmp_path, monkeypatch):
    uri, client, run_id = store
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")  # a file where a directory should be: unwritable even as root
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    sink = MlflowSink(run_id, uri, spool_dir=blocker / "spool", flush_interval_s=0.05)
    with pytest.warns(WattlogWarning, match="cannot write the spool"):
        sink.start()
    for step_points in make_points(20):
        sink.log_points(step_points)
    assert sink.flush(60)
    sink.close()
    assert_exactly_once(client, run_id, 20)

    monkeypatch.setenv("WATTLOG_STRICT", "1")
    with pytest.raises(SinkError, match="cannot write the spool"):
        MlflowSink(run_id, uri, spool_dir=blocker / "spool").start()


def test_credentials_never_reach_spool_warnings_or_errors(store, tmp_path, lenient, monkeypatch):
    _uri, _client, run_id = store
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-canary-9876")
    canary = f"https://user:s3cr3t@127.0.0.1:{free_port()}"
    assert redact_uri(canary) == canary.replace("user:s3cr3t@", "")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink = MlflowSink(run_id, canary, spool_dir=tmp_path / "spool", max_backoff_s=0.05)
        sink.start()
        sink.log_points(make_points(3)[0])
        sink.flush(timeout_s=1.0)
        sink.set_tags({"energy.degraded": "no"})
        sink.close(timeout_s=0.1)
    texts = [str(w.message) for w in rec]
    assert unreachable_warnings(rec) and any("not delivered" in t for t in texts)
    spool_text = sink.spool_path.read_text()
    assert json.loads(spool_text.splitlines()[0])["tracking_uri"] == redact_uri(canary)
    assert json.loads(spool_text.splitlines()[-1])["type"] == "tag"  # the tag waits in the spool too
    for text in [*texts, spool_text]:
        assert "s3cr3t" not in text and "tok-canary-9876" not in text

    monkeypatch.setenv("WATTLOG_STRICT", "1")
    strict = MlflowSink(run_id, canary, spool_dir=tmp_path / "spool2", max_backoff_s=0.05)
    strict.start()
    strict.log_points(make_points(1)[0])
    with pytest.raises(SinkError) as err:
        strict.flush(timeout_s=30)
    assert "s3cr3t" not in str(err.value) and err.value.__cause__ is None
    with pytest.raises(SinkError):
        strict.close(timeout_s=0.1)


def test_permanently_rejected_point_is_dropped_alone(store, tmp_path, lenient):
    uri, client, run_id = store

    class PickyClient(FlakyClient):
        def log_batch(self, run_id, metrics=(), **kw):
            if any(m.value == 1003.0 for m in metrics):  # energy/k1 at step 3
                raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)
            return super().log_batch(run_id, metrics=metrics, **kw)

    picky = PickyClient(uri)
    sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool", _client_factory=lambda u: picky)
    sink.start()
    for step_points in make_points(10):
        sink.log_points(step_points)
    with pytest.warns(WattlogWarning, match="MLflow rejected energy/k1=1003.0 at step 3"):
        assert sink.flush(60)
    sink.close()
    counts = history_counts(client, run_id)
    assert counts == {**dict.fromkeys(KEYS, 10), "energy/k1": 9}
    assert read_acks(ack_file(sink.spool_path)).ranges == [(1, 50)]


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
    sink.log_summary_metrics({"energy/gpu_kwh": 0.25, "energy/duration_s": 12.0}, step=7)
    assert sink.flush(60)
    sink.close()
    run = client.get_run(run_id)
    assert run.data.params == {"energy.gpu_count": "2", "energy.pue": "1.2"}
    assert run.data.tags["energy.degraded"] == "cpu: rapl unreadable"
    assert run.data.metrics["energy/gpu_kwh"] == 0.25
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "energy/duration_s")] == [(7, 12.0)]
    assert [f.path for f in client.list_artifacts(run_id, "energy")] == ["energy/trace.csv"]


class GatedRecordingClient:
    """Wraps a real client: records (method, thread) of every call; each call first waits for ``gate``."""

    def __init__(self, uri: str) -> None:
        self.real = MlflowClient(uri)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name):
        method = getattr(self.real, name)

        def call(*args, **kwargs):
            self.calls.append((name, threading.current_thread().name))
            self.entered.set()
            self.gate.wait(30)
            return method(*args, **kwargs)

        return call


def test_outage_run_data_never_blocks_caller_and_sync_delivers_once(store, tmp_path, lenient):
    uri, client, run_id = store
    rec_client = GatedRecordingClient(f"http://127.0.0.1:{free_port()}")  # connections refused
    payload = bytes(range(256)) * 40  # not UTF-8: compared byte for byte
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink = MlflowSink(run_id, "http://dead.invalid", spool_dir=tmp_path / "spool", flush_interval_s=0.05,
                          max_backoff_s=0.05, _client_factory=lambda u: rec_client)
        sink.start()
        sink.log_points(make_points(2)[0])
        assert sink.flush(timeout_s=0) is False  # ask for a send ...
        assert rec_client.entered.wait(30)  # ... the writer is now stuck inside a client call
        sink.log_params({"energy.gpu_count": 2, "energy.pue": 1.2})  # these return while it is stuck
        sink.set_tags({"energy.degraded": "cpu: rapl unreadable"})
        with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:  # deleted right after, like the callback's
            (Path(tmp) / "trace.csv").write_bytes(payload)
            sink.log_artifact(Path(tmp) / "trace.csv", "energy")
        rec_client.gate.set()
        assert sink.flush(timeout_s=0.5) is False
        sink.close(timeout_s=0.2)
    assert rec_client.calls and {t for _m, t in rec_client.calls} == {"wattlog-mlflow-writer"}
    assert unreachable_warnings(rec) and not any("could not log" in str(w.message) for w in rec)
    assert sink.pending_points == 5 + 2 + 1 + 1

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


def test_conflicting_param_is_rejected_once_not_retried(store, tmp_path, lenient):
    uri, client, run_id = store
    client.log_param(run_id, "energy.pue", "1.0")
    flaky = FlakyClient(uri)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool", flush_interval_s=0.05,
                          _client_factory=lambda u: flaky)
        sink.start()
        sink.log_params({"energy.pue": 1.2, "energy.gpu_count": 0})
        sink.log_params({"energy.gpu_count": 0})  # the same value again: nothing to do
        assert sink.flush(60)
        calls = flaky.calls
        assert sink.flush(1)
        sink.close()
    assert flaky.calls == calls == 1  # one log_batch (energy.gpu_count), no retry loop
    texts = [str(w.message) for w in rec]
    assert sum("rejected param energy.pue='1.2'" in t and "conflict" in t for t in texts) == 1
    assert client.get_run(run_id).data.params == {"energy.pue": "1.0", "energy.gpu_count": "0"}
    assert read_acks(ack_file(sink.spool_path)).ranges == [(1, 3)]

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    try:
        strict = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool2")
        strict.start()
        strict.log_params({"energy.pue": 2.0})
        with pytest.raises(SinkError, match="conflict"):
            strict.flush(60)
        strict.close()
    finally:
        monkeypatch.undo()


def test_broken_artifact_store_does_not_hold_back_points(store, tmp_path, lenient):
    uri, client, run_id = store
    broken = threading.Event()
    broken.set()

    class BrokenArtifactStore(FlakyClient):
        def log_artifact(self, run_id, local_path, artifact_path=None):
            if broken.is_set():
                raise MlflowException("S3 access denied", error_code=TEMPORARILY_UNAVAILABLE)
            return self.real.log_artifact(run_id, local_path, artifact_path)

    flaky = BrokenArtifactStore(uri)
    art = tmp_path / "power.png"
    art.write_bytes(b"\x89PNG...")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool", flush_interval_s=0.05,
                          _client_factory=lambda u: flaky)
        sink.start()
        sink.log_points(make_points(1)[0])
        sink.log_artifact(art, "energy")
        for step_points in make_points(10, step0=1):
            sink.log_points(step_points)
        sink.flush(timeout_s=0)  # ask for a send
        deadline = time.monotonic() + 60
        while sink.pending_points > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.pending_points == 1  # the artifact is still owed ...
        assert sink.flush(timeout_s=0.1) is False
        assert_exactly_once(client, run_id, 11)  # ... but nothing behind it waited
        broken.clear()
        assert sink.flush(timeout_s=60)  # a flush retries it
        sink.close()
    assert any("could not upload artifact energy/power.png" in str(w.message) for w in rec)
    assert [f.path for f in client.list_artifacts(run_id, "energy")] == ["energy/power.png"]
    assert read_acks(ack_file(sink.spool_path)).ranges == [(1, 56)]


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
    assert sink.pending_points == 0 and not (tmp_path / "spool").exists()  # nothing copied anywhere


def test_artifact_path_normalisation():
    from wattlog.sinks.spool import check_artifact_path

    assert [check_artifact_path(p) for p in (None, "", "energy", "energy/", "a/b")] == [
        None, None, "energy", "energy", "a/b"
    ]


def test_rejects_bad_configuration():
    with pytest.raises(ConfigError, match="batch_size"):
        MlflowSink("abc", batch_size=0)
    with pytest.raises(ConfigError, match="flush_interval_s"):
        MlflowSink("abc", flush_interval_s=0)
    with pytest.raises(ConfigError, match="run_id"):
        MlflowSink("")


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
            sink = MlflowSink(run_id, server.uri, spool_dir=tmp_path / "spool",
                              batch_size=25, flush_interval_s=0.05, max_backoff_s=0.2)
            sink.start()
            steps = make_points(400)
            for s in range(200):
                sink.log_points(steps[s])
                time.sleep(0.002)
            server.kill()  # crash mid-stream
            for s in range(200, 300):
                sink.log_points(steps[s])
            time.sleep(0.5)
            server.start()
            for s in range(300, 400):
                sink.log_points(steps[s])
            assert sink.flush(timeout_s=120)
            sink.close()
        assert len(unreachable_warnings(rec)) == 1
    finally:
        server.kill()
    assert_exactly_once(local, run_id, 400)
