"""Test helpers: a real `mlflow server` subprocess on 127.0.0.1, a throwaway PostgreSQL, a slow proxy.

The server runs with a sqlite (or PostgreSQL) backend, one worker and job execution off, in its own
process group (so SIGKILL takes its uvicorn workers too); always stop it in a ``finally``.

PostgreSQL (:class:`PostgresCluster`, fixture :func:`postgres`): a private cluster in a temporary
directory on 127.0.0.1 with trust authentication, run as the ``postgres`` user when the tests run as
root (PostgreSQL refuses root). Its binaries come from ``PATH`` or ``/usr/lib/postgresql/*/bin``; as
root, a missing PostgreSQL is installed with ``apt-get install -y postgresql`` (set
``WATTLOG_TEST_NO_APT=1`` to forbid that). MLflow reaches it as ``postgresql+psycopg2://`` (needs
``psycopg2-binary``). When any of this is impossible the tests that need it are skipped, with the
reason.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_template_db(path: Path) -> Path:
    """Create an empty, migrated MLflow sqlite database at ``path`` (copying it is much faster)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 over a sqlite database; start/kill it as often as needed.

    Args:
        db: the sqlite backend store (created if missing); with ``backend_uri``, only its folder is used
            (for the artifacts and the log).
        port: the port to listen on (default: a free one); kept across restarts.
        artifacts: the default artifact root (default ``<db dir>/artifacts``).
        log: server output (default ``<db dir>/server.log``, appended).
        backend_uri: another backend store, e.g. ``postgresql+psycopg2://...`` from
            :meth:`PostgresCluster.new_database`.
    """

    def __init__(self, db: Path, port: int | None = None, artifacts: Path | None = None,
                 log: Path | None = None, backend_uri: str | None = None) -> None:
        self.db = Path(db)
        self.backend_uri = backend_uri or f"sqlite:///{self.db}"
        self.port = port or free_port()
        self.artifacts = artifacts or self.db.parent / "artifacts"
        self.log = log or self.db.parent / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> MlflowServer:
        """Start the server and wait until ``/health`` answers.

        Raises:
            RuntimeError: the server exited or did not become healthy in time.
        """
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--default-artifact-root", self.artifacts.as_uri(),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError("mlflow server did not become healthy")

    def kill(self) -> None:
        """SIGKILL the server's process group (a crash, no clean shutdown); no-op if not running."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: uvicorn workers go too
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# ---------------------------------------------------------------------- PostgreSQL


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says why (the tests skip with it)."""


def _pg_bindir() -> str | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(found))
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if
                  d.split("/")[-2].isdigit() else 0)
    for d in reversed(dirs):
        if os.path.exists(os.path.join(d, "pg_ctl")) and os.path.exists(os.path.join(d, "initdb")):
            return d
    return None


def _apt_install_postgresql(timeout_s: float = 900) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        if out.returncode != 0:
            raise PostgresUnavailable(f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout)[-500:]}")


def find_postgres(install: bool = True) -> str:
    """The directory of PostgreSQL's server binaries; installs the Debian package as root if allowed.

    Raises:
        PostgresUnavailable: not installed and not installable here.
    """
    bindir = _pg_bindir()
    if bindir:
        return bindir
    if not install or os.environ.get("WATTLOG_TEST_NO_APT") == "1":
        raise PostgresUnavailable("PostgreSQL is not installed (pg_ctl/initdb not found)")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PostgresUnavailable("PostgreSQL is not installed, and apt-get as root is not available to install it")
    _apt_install_postgresql()
    bindir = _pg_bindir()
    if not bindir:
        raise PostgresUnavailable("apt-get installed postgresql, but pg_ctl/initdb are still not found")
    return bindir


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth), in a fresh temporary directory.

    As root, the cluster belongs to the ``postgres`` system user (PostgreSQL refuses to run as root)
    and its commands run through ``runuser``. :meth:`new_database` gives each test a fresh database
    copied from a template that MLflow has migrated once (copying is much faster than migrating).
    """

    def __init__(self, bindir: str, port: int | None = None) -> None:
        self.bindir = bindir
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="wattlog-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._user: str | None = None
        self._n = 0
        self._template: str | None = None

    def _cmd(self, *argv: str) -> list[str]:
        exe = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        return ["runuser", "-u", self._user, "--", *exe] if self._user else exe

    def _run(self, *argv: str, timeout_s: float = 120) -> str:
        out = subprocess.run(self._cmd(*argv), capture_output=True, text=True, timeout=timeout_s, cwd=self.root)
        if out.returncode != 0:
            raise PostgresUnavailable(f"{argv[0]} failed: {(out.stderr or out.stdout).strip()[-800:]}")
        return out.stdout

    def start(self) -> PostgresCluster:
        """initdb + start; raises :class:`PostgresUnavailable` with the reason when it cannot."""
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no 'postgres' user to run PostgreSQL") \
                    from None
            if not shutil.which("runuser"):
                raise PostgresUnavailable("running as root and `runuser` is missing")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._user = "postgres"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        return self

    def uri(self, database: str) -> str:
        """``postgresql+psycopg2://postgres@127.0.0.1:<port>/<database>``."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def _psql(self, sql: str) -> None:
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                  "-v", "ON_ERROR_STOP=1", "-q", "-c", sql)

    def new_database(self) -> str:
        """A fresh, migrated MLflow database; returns its SQLAlchemy URI."""
        if self._template is None:
            self._psql("CREATE DATABASE mlflow_template")
            code = ("import sys; from mlflow.tracking import MlflowClient; "
                    "MlflowClient(sys.argv[1]).search_experiments()")
            out = subprocess.run([sys.executable, "-c", code, self.uri("mlflow_template")], capture_output=True,
                                 text=True, timeout=300)
            if out.returncode != 0:
                raise PostgresUnavailable(f"MLflow cannot use PostgreSQL: {out.stderr.strip()[-800:]}")
            self._template = "mlflow_template"
        self._n += 1
        name = f"mlflow_{self._n}"
        self._psql(f"CREATE DATABASE {name} TEMPLATE {self._template}")
        return self.uri(name)

    def stop(self) -> None:
        """Stop the cluster (immediate) and delete its directory."""
        try:
            if self.data.exists():
                subprocess.run(self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"),
                               capture_output=True, timeout=60, cwd=self.root)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A running :class:`PostgresCluster` for the session, or a skip naming why there is none."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL tests need psycopg2-binary (pip install psycopg2-binary)")
    try:
        cluster = PostgresCluster(find_postgres())
    except (PostgresUnavailable, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        cluster.start()
        cluster.new_database()  # migrate the template now: a failure skips instead of failing a test
    except (PostgresUnavailable, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


BACKENDS = ("sqlite", "postgres")


def backend_server(backend: str, request: pytest.FixtureRequest, tmp_path: Path, template_db: Path) -> MlflowServer:
    """An (unstarted) :class:`MlflowServer` on ``backend`` (``sqlite``: a copy of ``template_db``;
    ``postgres``: a fresh database of the session's :func:`postgres` cluster, or a skip)."""
    if backend == "postgres":
        cluster = request.getfixturevalue("postgres")
        return MlflowServer(tmp_path / "server.db", backend_uri=cluster.new_database())
    db = tmp_path / "server.db"
    db.write_bytes(template_db.read_bytes())
    return MlflowServer(db)


class SlowProxy:
    """A loopback TCP proxy that delays every HTTP request by ``delay_s`` (a (min, max) range, seconds).

    A request is recognised as the first bytes a client sends after the last response bytes it got,
    so keep-alive connections are delayed once per request, not per TCP segment.
    """

    def __init__(self, target_port: int, delay_s: tuple[float, float] = (0.2, 0.5), seed: int = 0) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.requests = 0
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="slow-proxy", daemon=True)

    @property
    def uri(self) -> str:
        """``http://127.0.0.1:<proxy port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SlowProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> SlowProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _delay(self) -> float:
        with self._lock:
            self.requests += 1
            return self._rng.uniform(*self.delay_s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        state = {"new_request": True}

        def up() -> None:  # client -> server, delayed once per request
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    if state["new_request"]:
                        state["new_request"] = False
                        time.sleep(self._delay())
                    upstream.sendall(data)
            except OSError:
                pass
            finally:
                _shutdown(upstream)

        def down() -> None:  # server -> client
            try:
                while True:
                    data = upstream.recv(65536)
                    if not data:
                        break
                    state["new_request"] = True
                    client.sendall(data)
            except OSError:
                pass
            finally:
                _shutdown(client)

        t = threading.Thread(target=up, daemon=True)
        t.start()
        down()
        t.join(60)
        client.close()
        upstream.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def quiet_module(step_sleep_s: float = 0.0):
    """A tiny LightningModule that calls no ``self.log``: Lightning's own MLFlowLogger then sends nothing
    per step, so a tracking-server outage reaches only wattlog (MLFlowLogger.log_metrics raises, and
    kills the fit, while its server is down; wattlog cannot prevent that)."""
    from lightning_helpers import make_module

    return make_module(step_sleep_s=step_sleep_s, log=False)[1]


def at_steps(actions: dict[int, object]):
    """A Lightning callback that calls ``actions[step]()`` once ``trainer.global_step`` reaches ``step``."""
    import lightning.pytorch as pl

    class AtSteps(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            action = actions.pop(trainer.global_step, None)
            if action is not None:
                action()  # type: ignore[operator]

    return AtSteps()


STEP_KEYS = ("energy/step_j", "energy/power_w", "energy/total_j", "energy/emissions_g")
CUMULATIVE_KEYS = ("energy/total_j", "energy/emissions_g")


def step_counts(client, run_id: str, keys=STEP_KEYS) -> dict[str, dict[int, int]]:
    """``{key: {step: how many points}}`` from MLflow's metric history."""
    from collections import Counter

    return {k: dict(Counter(m.step for m in client.get_metric_history(run_id, k))) for k in keys}


def assert_steps_exactly_once(counts: dict[str, dict[int, int]], n_steps: int) -> None:
    """Every Lightning step 0..n_steps-1 exactly once per key; a cumulative key may also have its stage
    summary at the trainer's global step ``n_steps`` (once). No (key, step) ever has two points."""
    for key, by_step in counts.items():
        expected = set(range(n_steps))
        allowed = expected | ({n_steps} if key in CUMULATIVE_KEYS else set())
        assert expected <= set(by_step) <= allowed, (key, sorted(expected ^ set(by_step)))
        assert set(by_step.values()) == {1}, (key, {s: c for s, c in by_step.items() if c != 1})
