"""The pump: drains off the training thread, ranks leave together, errors reach the training thread.

The DDP case runs two EnergySessions (rank 0 and rank 1) on two threads of one process, their
collectives an in-process all-gather, so every gather's thread can be checked.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from wattlog import keys
from wattlog.ledger import StepLabel
from wattlog.options import MonitorOptions
from wattlog.pump import Pump
from wattlog.session import EnergySession
from wattlog.sinks.base import MemorySink

from conftest import GPU_POWER_W


class ThreadGather:
    """An all-gather among ``world_size`` threads (a barrier per round); records each caller's thread."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=20)
        self._slots: list = [None] * world_size
        self.threads: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def gather(self, rank: int, obj):
        with self._lock:
            self.threads.append((rank, threading.current_thread().name))
        self._slots[rank] = obj
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before everyone has read the round
        return out


class RankCollectives:
    def __init__(self, rank: int, hub: ThreadGather) -> None:
        self.rank, self.world_size, self.partial, self._hub = rank, hub.world_size, None, hub

    def gather(self, obj):
        return self._hub.gather(self.rank, obj)

    def stop(self, reason: str, exc: BaseException | None = None) -> None:
        self.partial = self.partial or reason


def test_a_pump_thread_error_is_raised_on_the_training_thread() -> None:
    def broken_take():
        raise RuntimeError("sink broke")

    pump = Pump(broken_take, lambda records: None, interval_s=0.01).start()
    deadline = time.monotonic() + 5
    with pytest.raises(RuntimeError, match="sink broke"):
        while time.monotonic() < deadline:
            pump.check()
            time.sleep(0.01)
    assert pump.stop(5)  # the thread has ended; its error was raised once
    pump.check()


def test_pumps_leave_together_after_the_round_in_which_one_rank_asked() -> None:
    hub = ThreadGather(2)
    accounted: list[list] = [[], []]
    rounds = [0, 0]

    def take(rank):
        def _take():
            rounds[rank] += 1
            return [f"r{rank}-{rounds[rank]}"]
        return _take

    pumps = [Pump(take(r), accounted[r].extend, lambda payload, r=r: hub.gather(r, payload), interval_s=0.01).start()
             for r in range(2)]
    time.sleep(0.2)
    assert pumps[1].stop(10)  # rank 1's stage ends; rank 0 never asks
    assert pumps[0].stop(0.5)  # ... and rank 0's pump has already left with it
    assert rounds[0] == rounds[1] > 1
    assert accounted[0] == accounted[1]  # every round gave both ranks everyone's records
    assert f"r1-{rounds[1]}" in accounted[0]  # including rank 1's last


def _rank_session(rank: int, hub: ThreadGather) -> tuple[EnergySession, MemorySink]:
    opts = MonitorOptions.from_kwargs(gpus=[0], cpu="none", ram="none", log_every_n_steps=1)
    session = EnergySession(opts, gpus=[0], host=rank == 0, log_every_n_steps=1,
                            collectives=RankCollectives(rank, hub))
    sink = MemorySink()
    session.open(sink if rank == 0 else None)
    return session, sink


def test_ddp_gathers_run_on_the_pump_and_rank_zero_logs_every_rank_once(gpu) -> None:
    hub = ThreadGather(2)
    sinks: dict[int, MemorySink] = {}
    errors: list[BaseException] = []
    n_steps = 30
    spans_s = [0.0, 0.0]

    def train(rank: int) -> None:
        try:
            session, sink = _rank_session(rank, hub)
            sinks[rank] = sink
            t0 = time.perf_counter()
            for step in range(n_steps):
                session.mark(StepLabel("train", None, 4))
                time.sleep(0.01 * (1 + rank))  # rank 1 is slower: rank 0 must not wait for it per step
                session.step_completed(step)
                session.log_step()
            spans_s[rank] = time.perf_counter() - t0
            session.mark(StepLabel("other"))
            session.end_stage(step=n_steps)
            session.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised below on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(r,), name=f"train-{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    by_thread: dict[str, int] = {}
    for _rank, name in hub.threads:
        by_thread[name] = by_thread.get(name, 0) + 1
    training_gathers = {name: n for name, n in by_thread.items() if name.startswith("train-")}
    # the training threads gather only at open (the ledger's domains) and at the stage end
    assert training_gathers == {"train-0": 2, "train-1": 2}, by_thread
    assert by_thread.get("wattlog-pump", 0) >= 2 * 2  # both pumps ran rounds while the steps ran

    sink = sinks[0]
    assert [s for s, _ in sink.history(keys.STEP_J)] == list(range(n_steps))  # every step once
    steps_j = sum(v for _, v in sink.history(keys.STEP_J))
    # every step holds both ranks' GPUs: GPU_POWER_W over each rank's own time in its steps
    assert steps_j == pytest.approx(GPU_POWER_W * (spans_s[0] + spans_s[1]), rel=0.15)
    assert sink.last()[keys.kind_j("gpu")] == pytest.approx(sink.last()[keys.TOTAL_J])


class SoloPair:
    """Rank 0 of 2 whose peer contributes nothing (only the open's gather of the domains is answered)."""

    rank, world_size = 0, 2

    def __init__(self) -> None:
        self.partial: str | None = None

    def gather(self, obj):
        return [obj, {}] if isinstance(obj, dict) else [obj, obj]

    def stop(self, reason: str, exc: BaseException | None = None) -> None:
        self.partial = self.partial or reason


def test_steps_waiting_for_a_lost_rank_are_logged_in_order_when_collecting_stops(gpu) -> None:
    from wattlog.ledger import StepRecord

    opts = MonitorOptions.from_kwargs(gpus=[0], cpu="none", ram="none", log_every_n_steps=1)
    collectives = SoloPair()
    session = EnergySession(opts, gpus=[0], log_every_n_steps=1, collectives=collectives)
    sink = MemorySink()
    session.open(sink)

    def record(step: int) -> StepRecord:
        return StepRecord("train", step, float(step), step + 1.0, {"r0.gpu0": 10.0}, 4, 1, 1.0)

    session._account([record(2), record(3)])  # rank 1's records for these never come
    assert sink.history(keys.STEP_J) == []
    collectives.stop("rank 1 is gone")
    session._account([record(4)])
    assert [s for s, _ in sink.history(keys.STEP_J)] == [2, 3, 4]  # none dropped as out of order
    session.close()


class FailsOnce(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def log_points(self, points) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("disk full")
        super().log_points(points)


@pytest.mark.parametrize("strict", ["0", "1"])
def test_a_pump_failure_degrades_in_production_and_raises_in_strict_mode(gpu, monkeypatch, strict) -> None:
    from wattlog.errors import WattlogError, WattlogWarning

    monkeypatch.setenv("WATTLOG_STRICT", strict)
    opts = MonitorOptions.from_kwargs(gpus=[0], cpu="none", ram="none", log_every_n_steps=1)
    session = EnergySession(opts, gpus=[0], log_every_n_steps=1)
    sink = FailsOnce()
    session.open(sink)
    raised: list[BaseException] = []
    with pytest.warns(WattlogWarning, match="pump thread failed") if strict == "0" else contextlib.nullcontext():
        for step in range(12):
            session.mark(StepLabel("train", None, 4))
            time.sleep(0.05)
            session.step_completed(step)
            try:
                session.log_step()
            except WattlogError as exc:
                raised.append(exc)
        session.mark(StepLabel("other"))
        session.end_stage(step=12)
    session.close()
    assert sink.failed
    if strict == "1":
        assert raised and "disk full" in str(raised[0].__cause__)
    else:
        assert not raised
        # the pump's lost batch aside, the stage's final drain logged the rest and the run is tagged
        assert sink.history(keys.STEP_J)[-1][0] == 11
        assert "pump thread failed" in sink.tags[keys.T_DEGRADED]



def test_the_hot_path_awaits_a_log_step_only_to_start_the_pump_or_raise_its_failure(gpu, monkeypatch) -> None:
    """train_batch_started() calls log_step() only while awaits_log_step: before the pump starts, and after
    it failed, so that strict mode still raises the pump's failure at the next train batch."""
    from wattlog.errors import WattlogError

    monkeypatch.setenv("WATTLOG_STRICT", "1")
    opts = MonitorOptions.from_kwargs(gpus=[0], cpu="none", ram="none", log_every_n_steps=1)
    session = EnergySession(opts, gpus=[0], log_every_n_steps=1)
    sink = FailsOnce()
    session.open(sink)
    assert session.awaits_log_step  # nothing started yet
    raised: list[BaseException] = []
    waits: list[bool] = []
    for step in range(12):
        try:
            session.train_batch_started(step, 4)
        except WattlogError as exc:
            raised.append(exc)
        waits.append(session.awaits_log_step)
        time.sleep(0.05)
    session.mark(StepLabel("other"))
    session.end_stage(step=12)
    session.close()
    assert waits[0] is False  # the first boundary started the pump
    assert sink.failed and raised and "disk full" in str(raised[0].__cause__)
    assert session.awaits_log_step  # a stopped session awaits the next stage's first boundary
