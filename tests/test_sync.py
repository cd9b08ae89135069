"""`wattlog sync`: replaying spool files into MLflow, idempotently, and its CLI exit codes."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from wattlog.errors import SinkError, WattlogWarning  # noqa: E402
from wattlog.sinks import spool as sp  # noqa: E402
from wattlog.sinks.mlflow import MlflowSink, Point, register_cli, sync  # noqa: E402


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path: Path, template_db: Path) -> tuple[str, MlflowClient, str]:
    """A sqlite tracking store with an experiment: (uri, client, experiment_id)."""
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("sync", artifact_location=(tmp_path / "art").as_uri())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spool(spool_dir: Path, run_id: str, uri: str | None, n: int, key: str = "energy/step_j") -> Path:
    """A spool file with ``n`` points of ``key`` (value = step), written the way the sink writes it."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    path = sp.spool_file(spool_dir, run_id)
    lines = [sp.header_line(run_id, uri)]
    lines += [sp.point_line(i + 1, Point(key, float(i), i, 1_000 + i)) for i in range(n)]
    path.write_bytes(b"".join(lines))
    return path


def steps(client: MlflowClient, run_id: str, key: str = "energy/step_j") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wattlog")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_sync_directory_is_idempotent_and_honours_acks(store, tmp_path):
    uri, client, exp = store
    run_a, run_b = (client.create_run(exp).info.run_id for _ in range(2))
    spool_dir = tmp_path / "spool"
    write_spool(spool_dir, run_a, uri, 30)
    path_b = write_spool(spool_dir, run_b, uri, 20)
    sp.ack_file(path_b).write_bytes(b"1 5\n8 10\n")  # already delivered: steps 0-4 and 7-9
    with path_b.open("ab") as f:
        f.write(b'{"seq": 21, "k": "energy/step_j", "v": 20.0, "s": 20, "t": 10')  # cut by a crash
    (spool_dir / "notes.jsonl").write_text('{"something": "else"}\n')

    with pytest.warns(WattlogWarning, match="notes.jsonl"):
        result = sync(spool_dir)  # tracking URI from the spool headers
    assert (result.sent, result.skipped, result.files) == (30 + 12, 0, 2)
    assert steps(client, run_a) == list(range(30))
    assert steps(client, run_b) == [5, 6] + list(range(10, 20))

    with pytest.warns(WattlogWarning, match="notes.jsonl"):
        again = sync(spool_dir, tracking_uri=uri)
    assert (again.sent, again.skipped, again.files) == (0, 0, 2)


def test_lost_ack_causes_no_duplicates(store, tmp_path):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
    sink.start()
    for s in range(40):
        sink.log_points(
            [Point("energy/step_j", float(s), s, 1_000 + s), Point("energy/power_w", 2.0 * s, s, 1_000 + s)]
        )
    assert sink.flush(60)
    sink.close()
    sp.ack_file(sink.spool_path).unlink()  # MLflow got the points, the acks were lost

    result = sync(sink.spool_path, tracking_uri=uri)
    assert (result.sent, result.skipped, result.files) == (0, 80, 1)
    assert steps(client, run_id) == list(range(40))
    assert steps(client, run_id, "energy/power_w") == list(range(40))
    assert sp.read_acks(sp.ack_file(sink.spool_path)).ranges == [(1, 80)]
    assert sync(sink.spool_path, tracking_uri=uri).skipped == 0


def test_partly_delivered_batch_is_completed_without_duplicates(store, tmp_path):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    path = write_spool(tmp_path / "spool", run_id, uri, 10)
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric("energy/step_j", float(i), 1_000 + i, i) for i in range(4)])
    result = sync(path, tracking_uri=uri)
    assert (result.sent, result.skipped) == (6, 4)
    assert steps(client, run_id) == list(range(10))


def test_default_spool_dir_and_errors(store, tmp_path, monkeypatch):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    monkeypatch.setenv("WATTLOG_SPOOL_DIR", str(tmp_path / "env-spool"))
    assert sp.default_spool_dir() == tmp_path / "env-spool"
    with pytest.raises(FileNotFoundError, match="env-spool"):
        sync()
    write_spool(tmp_path / "env-spool", run_id, None, 3)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # no URI in the header: MLflow's default
    assert sync().sent == 3
    monkeypatch.delenv("WATTLOG_SPOOL_DIR")
    monkeypatch.chdir(tmp_path)
    assert sp.default_spool_dir() == Path(".wattlog") / "spool"

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not a spool\n")
    with pytest.raises(SinkError, match="not a wattlog spool"):
        sync(bad)


def write_run_data_spool(spool_dir: Path, run_id: str, uri: str, payload: bytes) -> Path:
    """A spool as an outage leaves it: 3 points, two params, a tag, an artifact (copied into the spool)."""
    path = write_spool(spool_dir, run_id, uri, 3)
    src = spool_dir.parent / "summary.json"
    src.write_bytes(payload)
    file, size = sp.copy_artifact(src, sp.artifacts_dir(spool_dir, run_id), spool_dir)
    src.unlink()
    records = [sp.RunRecord("param", "energy.pue", "1.2"), sp.RunRecord("param", "energy.cpu_method", "rapl"),
               sp.RunRecord("tag", "energy.estimated", "ram"), sp.ArtifactRecord(file, "energy/extra", size)]
    with path.open("ab") as f:
        f.write(b"".join(sp.record_line(4 + i, r) for i, r in enumerate(records)))
    return path


def test_sync_replays_run_data_idempotently_and_reports_conflicts(store, tmp_path):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    client.log_param(run_id, "energy.cpu_method", "estimate")  # a different value is already there
    payload = b'{"kwh": 0.5}\x00\xff'
    path = write_run_data_spool(tmp_path / "spool", run_id, uri, payload)

    with pytest.warns(WattlogWarning, match=r"rejected param energy.cpu_method='rapl'.*conflict") as rec:
        result = sync(path)
    assert len([w for w in rec if "conflict" in str(w.message)]) == 1
    assert result.sent_by_kind == {"point": 3, "param": 1, "tag": 1, "artifact": 1}
    assert (result.sent, result.skipped, result.rejected, result.deferred) == (6, 0, 1, 0)
    run = client.get_run(run_id)
    assert run.data.params == {"energy.pue": "1.2", "energy.cpu_method": "estimate"}
    assert run.data.tags["energy.estimated"] == "ram"
    got = client.download_artifacts(run_id, "energy/extra/summary.json", str(tmp_path / "dl"))
    assert Path(got).read_bytes() == payload
    assert sp.read_acks(sp.ack_file(path)).ranges == [(1, 7)]  # the conflict is settled, not retried
    assert list(sp.artifacts_dir(tmp_path / "spool", run_id).iterdir()) == []  # copy deleted after upload
    assert sync(path).sent == 0

    sp.ack_file(path).unlink()  # acks lost: everything is recognised as already there
    with pytest.warns(WattlogWarning, match="conflict"):
        again = sync(path)
    assert again.sent_by_kind == {"point": 0, "param": 0, "tag": 1, "artifact": 0}  # a tag is just set again
    assert (again.skipped, again.rejected) == (3 + 1 + 1, 1)
    assert [f.path for f in client.list_artifacts(run_id, "energy/extra")] == ["energy/extra/summary.json"]
    assert len(client.get_metric_history(run_id, "energy/step_j")) == 3


def test_sync_rejects_artifact_whose_copy_is_gone(store, tmp_path):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    path = write_run_data_spool(tmp_path / "spool", run_id, uri, b"x")
    for f in sp.artifacts_dir(tmp_path / "spool", run_id).rglob("summary.json"):
        f.unlink()
    with pytest.warns(WattlogWarning, match="artifact energy/extra/summary.json.*copy .* is missing"):
        result = sync(path)
    assert (result.rejected, result.sent_by_kind["artifact"]) == (1, 0)
    assert client.list_artifacts(run_id, "energy/extra") == []


def test_old_spool_lines_and_unknown_records_are_tolerated(tmp_path):
    old = b'{"seq": 1, "k": "energy/step_j", "v": 1.5, "s": 3, "t": 1234}\n'
    assert sp.parse_record(old) == (1, Point("energy/step_j", 1.5, 3, 1234))
    param = sp.record_line(2, sp.RunRecord("param", "energy.pue", "1.2"))
    assert sp.parse_point(param) is None and sp.parse_record(param)[1].kind == "param"
    assert sp.parse_record(b'{"seq": 3, "type": "future-thing", "x": 1}\n') is None


def test_unreachable_server_raises_without_credentials(store, tmp_path, monkeypatch):
    _uri, client, exp = store
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    path = write_spool(tmp_path / "spool", client.create_run(exp).info.run_id, None, 3)
    with pytest.raises(SinkError, match="cannot sync") as err:
        sync(path, tracking_uri=f"http://user:s3cr3t@127.0.0.1:{free_port()}")
    assert "s3cr3t" not in str(err.value)
    assert not sp.ack_file(path).exists() or sp.read_acks(sp.ack_file(path)).ranges == []


def test_cli_sync_exit_codes(store, tmp_path, capsys, monkeypatch):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    path = write_spool(tmp_path / "spool", run_id, uri, 12)

    assert cli(["sync", "--spool", str(path.parent), "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.strip() == "sent 12 points (0 already present) from 1 spool files"
    assert cli(["sync", "--spool", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "sent 0 points (0 already present) from 1 spool files"

    data = write_run_data_spool(tmp_path / "spool3", client.create_run(exp).info.run_id, uri, b"{}")
    assert cli(["sync", "--spool", str(data)]) == 0
    assert capsys.readouterr().out.strip() == (
        "sent 3 points, 2 params, 1 tags, 1 artifacts (0 already present) from 1 spool files"
    )

    assert cli(["sync", "--spool", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "Traceback" not in err

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    other = write_spool(tmp_path / "spool2", run_id, None, 2)
    dead = f"http://user:s3cr3t@127.0.0.1:{free_port()}"
    assert cli(["sync", "--spool", str(other), "--tracking-uri", dead]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wattlog sync: error: cannot sync") and err.count("\n") == 1
    assert "s3cr3t" not in err and "Traceback" not in err
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the CLI restored the environment


# ------------------------------------------------------------------ issue 12: every valid spool, honest counts


def test_sync_directory_delivers_every_valid_spool_and_reports_each_bad_one(store, tmp_path):
    uri, client, exp = store
    good, deleted = (client.create_run(exp).info.run_id for _ in range(2))
    spool_dir = tmp_path / "spool"
    write_spool(spool_dir, "0" * 32, uri, 5)  # a run that never existed (or was purged)
    write_spool(spool_dir, deleted, uri, 5)
    client.delete_run(deleted)
    write_spool(spool_dir, good, uri, 7)
    (spool_dir / "zz-notes.jsonl").write_text("not a spool\n")

    with pytest.warns(WattlogWarning) as rec:
        result = sync(spool_dir)
    assert steps(client, good) == list(range(7))  # the bad spools next to it stopped nothing
    assert (result.sent, result.files, result.failed) == (7, 1, 2)
    failed = {p.path.name: p.reason for p in result.problems if p.kind == "failed"}
    assert set(failed) == {f"{'0' * 32}.jsonl", f"{deleted}.jsonl"}
    assert "deleted" in failed[f"{deleted}.jsonl"]
    assert [p.path.name for p in result.problems if p.kind == "skipped"] == ["zz-notes.jsonl"]
    texts = [str(w.message) for w in rec]
    assert sum("could not sync" in t for t in texts) == 2 and sum("skipping" in t for t in texts) == 1
    for name in failed:  # kept as they were: nothing acknowledged
        assert sp.read_acks(sp.ack_file(spool_dir / name)).ranges == []


def test_sync_counts_unreadable_lines_and_duplicates_truthfully(store, tmp_path):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    path = write_spool(tmp_path / "spool", run_id, uri, 10)
    body = path.read_bytes().split(b"\n", 1)[1]
    with path.open("ab") as f:  # the same records again (a concatenated spool), then junk
        f.write(body + b"garbage\n" + b'{"seq": "x"}\n' + b"\n" + b'{"seq": 99, "k": "energy/step_j", "v": 1')
    copy = tmp_path / "spool" / "copy-of-run.jsonl"  # the same spool under another name
    copy.write_bytes(path.read_bytes())

    result = sync(tmp_path / "spool")
    assert result.sent_by_kind["point"] == 10  # the true number of new points
    assert result.skipped == 10 + 20  # the repeated lines, then the whole copy (which repeats them too)
    assert result.unreadable == 2 * 3  # two junk lines and the cut last line, in each file
    assert (result.files, result.failed) == (2, 0)
    assert steps(client, run_id) == list(range(10))
    assert len(client.get_metric_history(run_id, "energy/step_j")) == 10


def test_sync_into_a_missing_sqlite_store_never_creates_it(store, tmp_path, capsys):
    uri, client, exp = store
    path = write_spool(tmp_path / "spool", client.create_run(exp).info.run_id, uri, 3)
    wrong = tmp_path / "typo" / "mlfow.db"
    (tmp_path / "typo").mkdir()
    with pytest.raises(SinkError, match="no MLflow database"):
        sync(path, tracking_uri=f"sqlite:///{wrong}")
    assert not wrong.exists()
    with pytest.warns(WattlogWarning, match="no MLflow database"):
        result = sync(path.parent, tracking_uri=f"sqlite:///{wrong}")
    assert (result.failed, result.sent) == (1, 0) and not wrong.exists()
    assert cli(["sync", str(path.parent), "--tracking-uri", f"sqlite:///{wrong}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wattlog sync: error:") and "no MLflow database" in err[0]
    assert not wrong.exists()
    with pytest.raises(SinkError, match="no MLflow file store"):
        sync(path, tracking_uri=(tmp_path / "no-mlruns").as_uri())
    assert not (tmp_path / "no-mlruns").exists()


def test_cli_sync_reports_each_bad_spool_and_exits_1(store, tmp_path, capsys):
    uri, client, exp = store
    good = client.create_run(exp).info.run_id
    spool_dir = tmp_path / "spool"
    write_spool(spool_dir, good, uri, 4)
    write_spool(spool_dir, "f" * 32, uri, 2)
    with (spool_dir / f"{good}.jsonl").open("ab") as f:
        f.write(b"junk\n")
    assert cli(["sync", str(spool_dir)]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == ("sent 4 points (0 already present) from 1 spool files; 1 unreadable lines skipped; "
                           "1 spool files could not be synced (kept)")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wattlog sync: error: {spool_dir / ('f' * 32)}.jsonl: ")


def test_sync_file_continues_from_the_returned_offset(store, tmp_path):
    """The unit a follower of a growing spool calls: a line still being written waits for the next call."""
    from wattlog.sinks.sync import Deliverer, sync_file

    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    path = write_spool(tmp_path / "spool", run_id, uri, 3)
    line = sp.point_line(4, Point("energy/step_j", 3.0, 3, 1_003))
    with path.open("ab") as f:
        f.write(line[:10])  # half written
    deliverer = Deliverer(MlflowClient(uri), run_id, path.parent)
    first = sync_file(path, deliverer)
    assert (first.sent["point"], first.truncated, first.unreadable) == (3, True, 0)
    assert first.offset == path.stat().st_size - 10
    with path.open("ab") as f:
        f.write(line[10:] + sp.point_line(5, Point("energy/step_j", 4.0, 4, 1_004)))
    second = sync_file(path, deliverer, offset=first.offset)
    assert (second.sent["point"], second.skipped, second.truncated) == (2, 0, False)
    assert second.offset == path.stat().st_size
    assert steps(client, run_id) == list(range(5))
    assert sp.read_acks(sp.ack_file(path)).ranges == [(1, 5)]
    with pytest.raises(SinkError, match="not of"):
        sync_file(path, Deliverer(MlflowClient(uri), "a" * 32, path.parent))
