"""Credentials never leak; spool and artifact paths are never built from unchecked strings (issue 7, security)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow_server import MlflowServer, at_steps, make_template_db, quiet_module  # noqa: E402

from wattlog.errors import ConfigError, SinkError, WattlogWarning  # noqa: E402
from wattlog.sinks import spool as spool_mod  # noqa: E402
from wattlog.sinks.mlflow import MlflowSink, Point, sync  # noqa: E402

CANARY = "CANARYpw7361"  # password in the tracking URI
CANARY2 = "CANARYtok4410"  # MLFLOW_TRACKING_TOKEN


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_template_db(tmp_path_factory.mktemp("template") / "mlflow.db")


@pytest.fixture
def store(tmp_path: Path, template_db: Path) -> tuple[str, MlflowClient, str]:
    (tmp_path / "mlflow.db").write_bytes(template_db.read_bytes())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("sec", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, client.create_run(exp).info.run_id


def _all_text_under(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


def _assert_no_canary(where: str, text: str) -> None:
    assert CANARY not in text and CANARY2 not in text, f"credential leaked into {where}"


@pytest.mark.slow
def test_credentials_never_leak_through_the_whole_callback(tmp_path, template_db, monkeypatch, caplog, capsys):
    """A real server behind ``http://user:CANARY@...`` plus a token; killed and restarted mid-fit."""
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning_helpers import loader

    from wattlog import EnergyMonitor

    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", CANARY2)
    caplog.set_level(logging.DEBUG, logger="wattlog")
    db = tmp_path / "server.db"
    db.write_bytes(template_db.read_bytes())
    server = MlflowServer(db)
    spool_dir = tmp_path / "spool"
    try:
        server.start()
        uri = f"http://wattlog:{CANARY}@127.0.0.1:{server.port}"  # mlflow accepts basic-auth userinfo
        logger = MLFlowLogger(experiment_name="sec", tracking_uri=uri)
        monitor = EnergyMonitor(gpus="none", cpu="estimate", ram="estimate", log_every_n_steps=1,
                                spool_dir=str(spool_dir), artifacts=True, delivery_timeout_s=120)
        cmdlines: list[str] = []

        def read_cmdline() -> None:  # the delivery process's command line: what `ps` shows every user
            sink = monitor._session.sink
            with open(f"/proc/{getattr(sink, 'primary', sink).delivery_pid}/cmdline", "rb") as f:
                cmdlines.append(f.read().decode())

        def kill_and_tag() -> None:  # a record that waits for MLflow while it is down: the outage is seen
            server.kill()
            monitor._session.sink.set_tags({"energy.test_outage": f"while {uri} was down"})

        trainer = pl.Trainer(max_steps=30, logger=logger, enable_checkpointing=False, default_root_dir=tmp_path,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[monitor, at_steps({4: read_cmdline, 8: kill_and_tag, 16: server.start})])
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            trainer.fit(quiet_module(step_sleep_s=0.05), loader(120))  # the end of fit waits for delivery
            monitor._session.wait_finished()  # ... and power.png follows off the training thread
        texts = [str(w.message) for w in rec if issubclass(w.category, WattlogWarning)]
        assert not [t for t in texts if "wattlog sync" in t], texts  # everything was delivered
        assert cmdlines and "wattlog.sinks.deliver" in cmdlines[0]
        _assert_no_canary("the delivery process's command line", cmdlines[0])
        assert any("is unreachable" in t for t in texts)  # the outage was reported ...
        _assert_no_canary("warnings", "\n".join(texts))  # ... without the credentials
        _assert_no_canary("log records", caplog.text)
        out = capsys.readouterr()
        # MLflow itself prints its run/experiment links with the URI's userinfo when a run ends
        # ("View run ... at: http://user:password@host/#/..."): MLflow's leak, not wattlog's; see README.
        mlflow_links = ("View run", "View experiment")
        _assert_no_canary("stdout/stderr", "\n".join(
            line for line in (out.out + out.err).splitlines() if not any(m in line for m in mlflow_links)))
        _assert_no_canary("the spool", _all_text_under(spool_dir))

        client = MlflowClient(server.uri)
        run = client.get_run(logger.run_id)
        _assert_no_canary("params/tags/metric keys",
                          json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)]))
        assert run.data.params["energy.cpu_method"] == "estimate"
        got = Path(mlflow.artifacts.download_artifacts(run_id=logger.run_id, dst_path=str(tmp_path / "dl"),
                                                       tracking_uri=server.uri))
        names = sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file())
        assert {"energy/trace.csv", "energy/power.png"} <= set(names)
        _assert_no_canary("artifacts", _all_text_under(got))
    finally:
        server.kill()


def test_unreachable_credentialed_uri_and_token_never_leak(store, tmp_path, monkeypatch, caplog, capsys):
    _uri, client, run_id = store
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", CANARY2)
    caplog.set_level(logging.DEBUG)
    uri = f"https://user:{CANARY}@127.0.0.1:9"  # nobody listens: every send fails with the URI in the error
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sink = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool")
        sink.start()
        sink.log_points([Point("energy/step_j", 1.0, 1, 1)])
        # a degraded-reason tag or param that carries a credentialed URL is stored redacted
        sink.set_tags({"energy.degraded": f"MLFlowLogger failed: https://u:{CANARY}@host/api ({CANARY2})"})
        sink.log_params({"energy.note": f"token={CANARY2}"})
        assert sink.flush(timeout_s=1.0) is False
        sink.close(timeout_s=0.1)
    texts = [str(w.message) for w in rec]
    assert any("is unreachable" in t for t in texts) and any("wattlog sync --spool" in t for t in texts)
    for where, text in [("warnings", "\n".join(texts)), ("logs", caplog.text), ("spool", _all_text_under(tmp_path / "spool")),
                        ("output", "".join(capsys.readouterr()))]:
        _assert_no_canary(where, text)
    sync(sink.spool_path, tracking_uri=_uri)  # what was spooled is what MLflow gets
    run = client.get_run(run_id)
    assert run.data.tags["energy.degraded"] == "MLFlowLogger failed: https://host/api (***)"
    assert run.data.params["energy.note"] == "token=***"

    monkeypatch.setenv("WATTLOG_STRICT", "1")  # strict mode: the raised error is redacted too
    strict = MlflowSink(run_id, uri, spool_dir=tmp_path / "spool2")
    strict.start()
    strict.log_points([Point("energy/step_j", 1.0, 1, 1)])
    with pytest.raises(SinkError) as err:
        strict.flush(timeout_s=60)
    _assert_no_canary("the strict-mode error", str(err.value))
    with pytest.raises(SinkError) as err:
        strict.close(timeout_s=0.1)
    _assert_no_canary("the strict-mode error at close", str(err.value))


@pytest.mark.parametrize("bad", ["../../etc", "..", ".", "a/b", "a\\b", "x\0y", "-rf", "_x", "", " ", "ü1", 123,
                                 "a" * 257])
def test_run_id_that_could_escape_the_spool_dir_is_refused(bad, tmp_path):
    with pytest.raises(ConfigError, match="run_id"):
        MlflowSink(bad, "sqlite:///x.db", spool_dir=tmp_path / "spool")  # type: ignore[arg-type]
    assert not (tmp_path / "spool").exists()
    assert spool_mod.valid_run_id("0123456789abcdef0123456789abcdef")


def test_sync_refuses_a_spool_whose_header_names_a_path_like_run_id(tmp_path):
    f = tmp_path / "evil.jsonl"
    f.write_text(json.dumps({"wattlog_spool": 1, "run_id": "../../etc", "tracking_uri": None}) + "\n")
    with pytest.raises(SinkError, match="invalid MLflow run id"):
        sync(f, tracking_uri="sqlite:///unused.db")


def test_sync_never_uploads_or_deletes_files_a_spool_line_points_outside_the_spool(store, tmp_path, monkeypatch):
    uri, client, run_id = store
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    f = spool_mod.spool_file(spool_dir, run_id)
    lines = [
        json.dumps({"wattlog_spool": 1, "run_id": run_id, "tracking_uri": None}),
        json.dumps({"seq": 1, "type": "artifact", "f": str(victim), "p": "energy", "n": 8}),
        json.dumps({"seq": 2, "type": "artifact", "f": f"{run_id}.artifacts/../../victim.txt", "p": None, "n": 8}),
        json.dumps({"seq": 3, "type": "artifact", "f": f"{run_id}.artifacts/a1/x.csv", "p": "../../up", "n": 1}),
        json.dumps({"seq": 4, "k": "energy/step_j", "v": 2.0, "s": 1, "t": 5}),
    ]
    f.write_text("\n".join(lines) + "\n")
    with pytest.warns(WattlogWarning, match="rejected artifact"):
        result = sync(f, tracking_uri=uri)
    assert result.rejected == 2 and result.sent_by_kind["point"] == 1  # seq 3 is malformed: skipped
    assert victim.read_text() == "precious"  # neither uploaded nor deleted
    assert client.list_artifacts(run_id) == []


def test_spool_files_are_private_and_paths_never_come_from_keys(store, tmp_path, monkeypatch):
    _uri, _client, run_id = store
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spool_dir = tmp_path / "spool"
    src = tmp_path / "trace.csv"
    src.write_text("a,b\n1,2\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WattlogWarning)
        sink = MlflowSink(run_id, "http://127.0.0.1:9", spool_dir=spool_dir)
        sink.start()
        sink.log_points([Point("../../evil", 1.0, 1, 1), Point("/abs", 1.0, 1, 1), Point("energy/step_j", 1.0, 1, 1)])
        sink.log_artifact(src, "energy")
        sink.close(timeout_s=0.2)  # unreachable: the copy stays in the spool
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    entries = sorted(spool_dir.rglob("*"))
    tops = {p.relative_to(spool_dir).parts[0] for p in entries}
    assert {f"{run_id}.jsonl", f"{run_id}.artifacts"} <= tops <= {
        f"{run_id}.jsonl", f"{run_id}.jsonl.ack", f"{run_id}.artifacts"}  # no ack file until something is acked
    for p in entries:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    assert not (tmp_path / "evil").exists() and not Path("/abs").exists()
    keys = [json.loads(line).get("k") for line in sink.spool_path.read_text().splitlines()[1:]]
    assert keys == ["energy/step_j", None]  # the bad keys were skipped (strict mode: ConfigError)
    monkeypatch.setenv("WATTLOG_STRICT", "1")
    with pytest.raises(ConfigError, match="key"):
        MlflowSink(run_id, "http://127.0.0.1:9", spool_dir=spool_dir).log_points([Point("../x", 1.0, 1, 1)])
    assert os.path.exists(sink.spool_path)


# ------------------------------------------------------------------ issue 12: symlinks, private directories


def _spool_with_artifact(spool_dir: Path, run_id: str, uri: str) -> tuple[Path, str]:
    """A spool of one point and one artifact whose copy sits in ``<run>.artifacts/<unique>/id_rsa``."""
    spool_dir.mkdir(mode=0o700, exist_ok=True)
    f = spool_mod.spool_file(spool_dir, run_id)
    rel = f"{run_id}.artifacts/a1/id_rsa"
    f.write_bytes(b"".join([
        spool_mod.header_line(run_id, uri),
        spool_mod.point_line(1, Point("energy/step_j", 1.0, 1, 5)),
        spool_mod.record_line(2, spool_mod.ArtifactRecord(rel, "energy", 7)),
    ]))
    return f, rel


def test_sync_refuses_a_symlinked_artifacts_folder_uploads_and_deletes_nothing(store, tmp_path, monkeypatch):
    uri, client, run_id = store
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    home = tmp_path / "home"  # what an attacker points the folder at
    (home / "a1").mkdir(parents=True)
    (home / "a1" / "id_rsa").write_text("SECRET!")
    spool_dir = tmp_path / "spool"
    f, _rel = _spool_with_artifact(spool_dir, run_id, uri)
    (spool_dir / f"{run_id}.artifacts").symlink_to(home, target_is_directory=True)

    with pytest.warns(WattlogWarning, match=r"rejected artifact energy/id_rsa.*symlink"):
        result = sync(f, tracking_uri=uri)
    assert (result.rejected, result.sent_by_kind["artifact"], result.sent_by_kind["point"]) == (1, 0, 1)
    assert client.list_artifacts(run_id) == [] and client.list_artifacts(run_id, "energy") == []
    assert (home / "a1" / "id_rsa").read_text() == "SECRET!"  # neither uploaded nor deleted
    assert os.path.islink(spool_dir / f"{run_id}.artifacts")


@pytest.mark.parametrize("link", ["unique-dir", "file"])
def test_sync_refuses_a_symlink_deeper_in_the_artifact_folder(store, tmp_path, monkeypatch, link):
    uri, client, run_id = store
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "id_rsa").write_text("SECRET!")
    spool_dir = tmp_path / "spool"
    f, _rel = _spool_with_artifact(spool_dir, run_id, uri)
    art = spool_dir / f"{run_id}.artifacts"
    art.mkdir(mode=0o700)
    if link == "unique-dir":
        (art / "a1").symlink_to(victim, target_is_directory=True)
    else:
        (art / "a1").mkdir(mode=0o700)
        (art / "a1" / "id_rsa").symlink_to(victim / "id_rsa")
    with pytest.warns(WattlogWarning, match="rejected artifact.*refusing"):
        result = sync(f, tracking_uri=uri)
    assert result.rejected == 1 and client.list_artifacts(run_id, "energy") == []
    assert (victim / "id_rsa").read_text() == "SECRET!"


def test_sync_refuses_symlinked_spool_and_ack_files(store, tmp_path, monkeypatch):
    uri, client, run_id = store
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    real = tmp_path / "elsewhere"
    real.mkdir()
    f, _ = _spool_with_artifact(real, run_id, uri)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    (spool_dir / f.name).symlink_to(f)
    with pytest.raises(SinkError, match="symlink"):
        sync(spool_dir / f.name, tracking_uri=uri)
    with pytest.warns(WattlogWarning, match="could not sync.*symlink"):
        result = sync(spool_dir, tracking_uri=uri)
    assert (result.failed, result.sent) == (1, 0)
    assert client.get_metric_history(run_id, "energy/step_j") == []

    ack_target = tmp_path / "ack-target"
    ack_target.write_text("")
    spool_mod.ack_file(f).symlink_to(ack_target)  # an ack file that points elsewhere: nothing written there
    with pytest.raises(SinkError, match="symlink"):
        sync(f, tracking_uri=uri)
    assert ack_target.read_text() == ""


def test_writer_refuses_a_symlinked_spool_file_and_artifact_folder(store, tmp_path, monkeypatch):
    _uri, _client, run_id = store
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (spool_dir / f"{run_id}.artifacts").symlink_to(elsewhere, target_is_directory=True)
    src = tmp_path / "trace.csv"
    src.write_text("a\n")
    with pytest.raises(spool_mod.UnsafePathError, match="symlink"):
        spool_mod.copy_artifact(src, spool_mod.artifacts_dir(spool_dir, run_id), spool_dir)
    assert list(elsewhere.iterdir()) == []
    (spool_dir / f"{run_id}.jsonl").symlink_to(tmp_path / "target.jsonl")
    with pytest.raises(spool_mod.UnsafePathError, match="symlink"):
        spool_mod.open_append(spool_mod.spool_file(spool_dir, run_id))
    assert not (tmp_path / "target.jsonl").exists()


def test_a_world_writable_spool_dir_is_tightened_when_ours(tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    d.chmod(0o777)
    spool_mod.ensure_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    art = d / "r.artifacts"
    art.mkdir()
    art.chmod(0o775)
    spool_mod.ensure_private_subdir(art)
    assert stat.S_IMODE(art.stat().st_mode) == 0o700


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown a directory")
def test_a_writable_spool_dir_of_another_user_is_refused(store, tmp_path, monkeypatch):
    _uri, _client, run_id = store
    d = tmp_path / "spool"
    d.mkdir()
    d.chmod(0o777)
    os.chown(d, 65534, 65534)  # nobody
    with pytest.raises(spool_mod.UnsafePathError, match="other users"):
        spool_mod.ensure_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o777  # not ours: left alone
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.warns(WattlogWarning, match="cannot write the spool.*other users"):
        sink = MlflowSink(run_id, "http://127.0.0.1:9", spool_dir=d)
        sink.start()
        sink.log_points([Point("energy/step_j", 1.0, 1, 1)])
        sink.close(timeout_s=0.1)
    assert list(d.iterdir()) == []
    assert not str(sink.spool_path).startswith(str(d))  # a private temporary spool took over
    shutil.rmtree(sink.spool_path.parent, ignore_errors=True)
