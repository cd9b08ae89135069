"""Test helpers: a real `mlflow server` subprocess on 127.0.0.1, and a slow loopback HTTP proxy.

The server runs with a sqlite backend, one worker and job execution off, in its own process group
(so SIGKILL takes its uvicorn workers too); always stop it in a ``finally``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


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
        db: the sqlite backend store (created if missing).
        port: the port to listen on (default: a free one); kept across restarts.
        artifacts: the default artifact root (default ``<db dir>/artifacts``).
        log: server output (default ``<db dir>/server.log``, appended).
    """

    def __init__(self, db: Path, port: int | None = None, artifacts: Path | None = None,
                 log: Path | None = None) -> None:
        self.db = Path(db)
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
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
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


STEP_KEYS = ("energy/step_j", "energy/power_w", "energy/total_kwh", "energy/emissions_g")
CUMULATIVE_KEYS = ("energy/total_kwh", "energy/emissions_g")


def step_counts(client, run_id: str, keys=STEP_KEYS) -> dict[str, dict[int, int]]:
    """``{key: {step: how many points}}`` from MLflow's metric history."""
    from collections import Counter

    return {k: dict(Counter(m.step for m in client.get_metric_history(run_id, k))) for k in keys}


def assert_steps_exactly_once(counts: dict[str, dict[int, int]], n_steps: int) -> None:
    """Every step 1..n_steps once per key; the run total at the last step may repeat (the summary logs it)."""
    for key, by_step in counts.items():
        assert set(by_step) == set(range(1, n_steps + 1)), (key, sorted(set(range(1, n_steps + 1)) ^ set(by_step)))
        extra = {s: c for s, c in by_step.items() if c != 1}
        allowed = {n_steps: 2} if key in CUMULATIVE_KEYS else {}
        assert all(allowed.get(s) == c for s, c in extra.items()), (key, extra)
