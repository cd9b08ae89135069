"""The real-server helpers (tests/mlflow_server.py) on PostgreSQL: what the fault tests stand on (issue 12, item 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow_server import BACKENDS, backend_server, make_template_db, postgres  # noqa: E402,F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_template_db(tmp_path_factory.mktemp("template") / "mlflow.db")


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_keeps_its_data_across_a_kill_and_each_test_gets_a_fresh_store(backend, tmp_path, template_db,
                                                                              request, capsys):
    srv = backend_server(backend, request, tmp_path, template_db)
    if backend == "postgres":
        assert srv.backend_uri.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    try:
        srv.start()
        client = MlflowClient(srv.uri)
        assert [e.name for e in client.search_experiments()] == ["Default"]  # a fresh store
        run_id = client.create_run(client.create_experiment("pg")).info.run_id
        client.log_metric(run_id, "energy/step_j", 1.5, step=3)
        srv.kill()
        srv.start()  # the same database, after a crash
        assert [(m.step, m.value) for m in MlflowClient(srv.uri).get_metric_history(run_id, "energy/step_j")] == [
            (3, 1.5)]
        from wattlog.cli import main
        from wattlog.sinks import spool as sp

        spool_dir = tmp_path / "spool"
        spool_dir.mkdir(mode=0o700)
        sp.spool_file(spool_dir, run_id).write_bytes(
            sp.header_line(run_id, srv.uri) + sp.point_line(1, sp.Point("energy/step_j", 2.0, 4, 7)))
        assert main(["sync", str(spool_dir)]) == 0
        assert capsys.readouterr().out.strip() == "sent 1 points (0 already present) from 1 spool files"
        assert len(MlflowClient(srv.uri).get_metric_history(run_id, "energy/step_j")) == 2
    finally:
        srv.kill()
