"""EnergySession without any framework: simulated GPUs, an in-memory sink (like Lightning tests Throughput)."""

from __future__ import annotations

import threading
import time

import pytest

from wattlog import keys
from wattlog.ledger import StepLabel
from wattlog.options import MonitorOptions
from wattlog.session import EnergySession
from wattlog.sinks.base import MemorySink

from conftest import GPU_POWER_W as POWER_W  # the shared `gpu` fixture's fake GPU


def _session(log_every: int = 1, **options) -> tuple[EnergySession, MemorySink]:
    opts = MonitorOptions.from_kwargs(gpus=[0], cpu="none", ram="none", **options)
    session = EnergySession(opts, gpus=[0], log_every_n_steps=log_every)
    sink = MemorySink()
    session.open(sink)
    return session, sink


def _steps(sink: MemorySink, key: str) -> list[int]:
    return [s for s, _v in sink.history(key)]


def test_accumulated_micro_batches_are_one_step_with_their_energy(gpu):
    session, sink = _session()
    starts = []
    for step in range(5):
        starts.append(time.perf_counter())
        for _micro in range(4):  # gradient accumulation: 4 micro-batches of 40 ms per optimizer step
            session.mark(StepLabel("train", None, 8))
            time.sleep(0.04)
            session.drain()  # a drain inside a step must not see a partial record
        session.step_completed(step)
        session.drain()
    starts.append(time.perf_counter())
    session.mark(StepLabel("other"))
    session.end_stage(step=5)
    session.close()

    assert _steps(sink, keys.STEP_J) == [0, 1, 2, 3, 4]  # one point per optimizer step, numbered once
    for (step, step_j), t0, t1 in zip(sink.history(keys.STEP_J), starts, starts[1:]):
        assert step_j == pytest.approx(POWER_W * (t1 - t0), rel=0.10), step
    last = sink.last()
    assert last[keys.stage_j_per_sample("train")] == pytest.approx(last[keys.stage_j("train")] / (5 * 4 * 8))


def test_train_batches_that_carry_their_logged_step_number_steps_where_the_counter_changes(gpu):
    """train_batch_started(logged_step, samples), the Lightning hot path's one record per batch: gradient
    accumulation repeats a logged step, and a step ends where the counter changes (here at the next step's
    first batch, and for the last step at the stage end's counter report)."""
    session, sink = _session()
    starts = []
    for step in range(5):
        starts.append(time.perf_counter())
        for _micro in range(4):
            session.train_batch_started(step, 8)
            time.sleep(0.04)
            session.drain()  # a drain inside a step must not see a partial record
    starts.append(time.perf_counter())
    session.append_boundary((starts[-1], (5, None)))  # the counter at the stage's end: step 4 ended
    session.end_stage(step=5)
    session.close()

    assert _steps(sink, keys.STEP_J) == [0, 1, 2, 3, 4]
    for (step, step_j), t0, t1 in zip(sink.history(keys.STEP_J), starts, starts[1:]):
        assert step_j == pytest.approx(POWER_W * (t1 - t0), rel=0.10), step
    last = sink.last()
    assert last[keys.stage_j_per_sample("train")] == pytest.approx(last[keys.stage_j("train")] / (5 * 4 * 8))


def test_the_aggregator_numbers_train_batches_by_their_counter():
    from wattlog.ledger import StepAggregator
    from wattlog.meter import Segment

    labels = [(0, 4), (0, 4), (1, 4), (2, None), StepLabel("val", 2, 3), (2, None), (2, 4), (2, 4), (2, None),
              StepLabel("other"), (3, None)]
    segments = [Segment(label, float(i), float(i + 1), {"gpu0": 1.0}) for i, label in enumerate(labels)]
    agg = StepAggregator()
    records = agg.add(segments) + agg.finish()
    got = [(r.stage, r.step, r.samples, r.total_j) for r in records]
    assert got == [
        ("train", 0, 8, 2.0),  # two micro-batches; numbered when the counter moved to 1
        ("train", 1, 4, 2.0),  # numbered by the report (validation: the loop is about to count it), gap merged
        ("val", 2, 3, 1.0),
        ("other", -1, 0, 1.0),  # a report with no open train batch
        ("train", -1, 8, 3.0),  # not ended by the next report (same counter): left unnumbered, as before
        ("other", -1, 0, 2.0),
    ]


def test_drain_from_another_thread_sees_no_partial_step(gpu):
    """A background drain racing the training thread gets complete, numbered records only."""
    session, sink = _session()
    stop = threading.Event()
    lock = threading.Lock()

    def drainer():
        while not stop.is_set():
            with lock:
                session.drain()
            time.sleep(0.003)

    t = threading.Thread(target=drainer)
    t.start()
    starts = []
    try:
        for step in range(8):
            starts.append(time.perf_counter())
            for _ in range(3):
                session.mark(StepLabel("train", None, 1), starts[-1] if _ == 0 else None)
                time.sleep(0.02)
            session.step_completed(step)
    finally:
        stop.set()
        t.join()
    starts.append(time.perf_counter())
    session.mark(StepLabel("other"), starts[-1])
    session.end_stage(step=8)
    session.close()
    hist = sink.history(keys.STEP_J)
    assert [s for s, _ in hist] == list(range(8))
    for (step, step_j), t0, t1 in zip(hist, starts, starts[1:]):
        assert step_j == pytest.approx(POWER_W * (t1 - t0), rel=0.10), step


def test_stage_summaries_once_per_stage_and_cumulative_keys_never_decrease(gpu):
    session, sink = _session(log_every=2)
    for step in range(6):
        session.mark(StepLabel("train", None, 4))
        time.sleep(0.01)
        session.step_completed(step)
    session.mark(StepLabel("val", 6, 4))
    time.sleep(0.02)
    session.end_stage(step=6)  # fit ends: summary at the global step
    session.suspend()
    session.open(MemorySink())  # a later stage of the same run gets its own sink ...
    sink2 = session.sink
    for batch in range(3):
        session.mark(StepLabel("test", batch, 2))
        time.sleep(0.01)
    session.end_stage(step=6)  # ... and the same summary step: keys move to their next free step
    session.close()

    assert _steps(sink, keys.STEP_J) == [1, 3, 5]  # (step + 1) % 2 == 0
    assert keys.GPU_POWER_W in sink.last()
    assert keys.kind_j("cpu") not in sink.last() and keys.kind_j("ram") not in sink.last()  # not measured
    assert keys.stage_j("test") not in sink.last()  # no test yet
    fit_total = sink.last()[keys.TOTAL_J]
    points = sink.points + sink2.points
    by_key: dict[str, list[tuple[int, float]]] = {}
    for p in points:
        by_key.setdefault(p.key, []).append((p.step, p.value))
    for key, hist in by_key.items():
        steps = [s for s, _ in hist]
        assert len(steps) == len(set(steps)), key  # one point per (key, step)
        assert steps == sorted(steps), key
    for key in (keys.TOTAL_J, keys.EMISSIONS_G):
        values = [v for _, v in by_key[key]]
        assert values == sorted(values), key
    test_points = {p.key: p for p in sink2.points}
    assert test_points[keys.stage_j("test")].step == 6
    assert test_points[keys.TOTAL_J].step == 7 and test_points[keys.TOTAL_J].value > fit_total
    assert keys.stage_j("train") not in test_points  # unchanged by the test stage: not logged again
    assert test_points[keys.stage_j_per_sample("test")].value == pytest.approx(
        test_points[keys.stage_j("test")].value / 6)


def test_state_dict_resume_and_checkpoint_provenance(gpu):
    session, sink = _session()
    for step in range(3):
        session.mark(StepLabel("train", None, 1))
        time.sleep(0.02)
        session.step_completed(step)
    state = session.state_dict()
    assert state["total_j"] > 0
    session.end_stage(step=3)
    session.close()

    resumed, sink2 = _session()
    sink2.points.extend(sink.points)  # the same run: what the first attempt logged
    resumed.resume(state, start_step=3)
    resumed.mark(StepLabel("train", None, 1))
    time.sleep(0.02)
    resumed.step_completed(3)
    resumed.mark(StepLabel("other"))
    resumed.end_stage(step=4)
    resumed.close()
    totals = [v for _, v in sink2.history(keys.TOTAL_J)]
    assert totals == sorted(totals)
    assert sink2.tags[keys.T_ATTEMPTS] == 1 or sink2.tags[keys.T_ATTEMPTS] == 2

    fresh, sink3 = _session()
    fresh.record_checkpoint(state, "abc123")
    fresh.close()
    assert sink3.params[keys.P_CHECKPOINT_RUN_ID] == "abc123"
    assert float(sink3.params[keys.P_CHECKPOINT_TRAIN_J]) > 0


def test_close_leaves_no_thread(gpu):
    before = {t.name for t in threading.enumerate()}
    session, _sink = _session()
    assert any(t.name == "wattlog-sampler" for t in threading.enumerate())
    session.close()
    session.close()  # idempotent
    assert {t.name for t in threading.enumerate()} == before


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_short_run_is_tagged_with_its_reason_and_untagged_when_it_grows(gpu):
    opts = MonitorOptions.from_kwargs(gpus=[0], cpu="estimate", ram="none")
    session = EnergySession(opts, gpus=[0])
    sink = MemorySink()
    session.open(sink)
    session.mark(StepLabel("test", 0, 4))
    _busy(0.3)  # shorter than 2 x the 0.5 s CPU estimate interval
    session.end_stage(step=0)
    reason = str(sink.tags[keys.T_SHORT_RUN])
    assert "0.5 s cpu estimate interval" in reason, reason
    assert sink.last()[keys.kind_j("cpu")] > 0  # a 0.3 s stage still has its estimated energy
    session.suspend()
    session.open(sink2 := MemorySink())
    session.mark(StepLabel("test", 1, 4))
    time.sleep(0.8)
    session.end_stage(step=0)
    session.close()
    assert sink2.tags[keys.T_SHORT_RUN] == "no"  # the run is long enough now: the earlier tag is overwritten


def test_measured_only_run_is_never_short(gpu):
    session, sink = _session()
    session.mark(StepLabel("test", 0, 4))
    time.sleep(0.05)
    session.end_stage(step=0)
    session.close()
    assert keys.T_SHORT_RUN not in sink.tags  # the GPU counter resolves a 50 ms run


def test_trace_chart_bins_never_mix_stages():
    from wattlog.ledger import StepRecord, TraceLog

    trace = TraceLog(["gpu0"], max_plot_rows=8)
    t = 0.0
    for i in range(200):
        stage = "val" if i % 20 >= 17 else "train"  # 17 train steps then 3 val batches, repeated
        trace.append(StepRecord(stage, i, t, t + 0.1, {"gpu0": 1.0}, samples=1, wall_s=0.1))
        t += 0.1
    rows = trace.plot_rows()
    assert len(rows) <= 9
    assert sum(float(r["total_j"]) for r in rows) == pytest.approx(200.0)
    trace2 = TraceLog(["gpu0"], max_plot_rows=50)
    t = 0.0
    for i in range(200):
        stage = "val" if i % 20 >= 17 else "train"
        trace2.append(StepRecord(stage, i, t, t + 0.1, {"gpu0": 1.0}, samples=1, wall_s=0.1))
        t += 0.1
    stages = [r["stage"] for r in trace2.plot_rows()]
    assert stages.count("val") == 10  # each validation run is its own bin, never merged into train
    trace.close()
    trace2.close()


def test_loops_that_count_from_one_log_where_their_own_metrics_are(gpu):
    opts = MonitorOptions.from_kwargs(gpus=[0], cpu="none", ram="none")
    session = EnergySession(opts, gpus=[0], log_every_n_steps=5, first_step=1)  # Hugging Face's global_step
    sink = MemorySink()
    session.open(sink)
    for step in range(1, 11):
        session.mark(StepLabel("train", None, 4))
        time.sleep(0.005)
        session.step_completed(step)
    session.end_stage(step=10)
    session.close()
    assert _steps(sink, keys.STEP_J) == [5, 10]  # where the Trainer logs loss with logging_steps=5


def _stage(session: EnergySession, steps: int = 3) -> None:
    for step in range(steps):
        session.mark(StepLabel("train", None, 4))
        time.sleep(0.02)
        session.step_completed(step)
    session.end_stage(step=steps)


class _Chart:
    """A ChartJob double: ``release`` (an Event) holds its drawing; ``error`` makes it fail."""

    release: threading.Event | None = None
    error: BaseException | None = None

    def __init__(self, rows, estimated) -> None:
        import tempfile

        self._dir = tempfile.mkdtemp()

    def collect(self, timeout_s):
        if self.release is not None:
            self.release.wait(30)
        if self.error is not None:
            return None, self.error
        path = f"{self._dir}/{keys.POWER_PNG}"
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
        return path, None

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)


def test_the_chart_is_finished_off_the_caller_and_a_stage_elsewhere_waits_for_it(gpu, monkeypatch):
    """Outside strict mode, suspend() hands power.png and the sink's close to a thread: the caller
    does not wait for the drawing; a next stage writing elsewhere (no common destination) does."""
    import wattlog.artifacts

    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    release = threading.Event()
    monkeypatch.setattr(_Chart, "release", release)
    monkeypatch.setattr(wattlog.artifacts, "ChartJob", _Chart)
    session, first = _session()
    _stage(session)
    session.suspend()  # returns although the chart is held
    finishing = [t for t in threading.enumerate() if t.name == "wattlog-finish"]
    assert finishing and not finishing[0].daemon  # the interpreter waits for it at exit
    assert not first.closed and keys.TRACE_CSV in [a[0] for a in first.artifacts]
    assert keys.POWER_PNG not in [a[0] for a in first.artifacts]
    release.set()
    second = MemorySink()
    session.open(second)  # waits for the first stage's sink to be closed
    assert first.closed and [a[0] for a in first.artifacts] == [keys.TRACE_CSV, keys.POWER_PNG]
    _stage(session)
    session.close()
    assert second.closed and keys.POWER_PNG in [a[0] for a in second.artifacts]
    assert not [t for t in threading.enumerate() if t.name.startswith("wattlog-")]


class _RunSink(MemorySink):
    """A MemorySink with a destination: two of them are one run's stream (wattlog.finisher)."""

    destination = ("memory", "run-1")
    closings = 0

    def close(self, timeout_s=None) -> None:
        self.closings += 1
        super().close(timeout_s)


def _stage_with_held_chart(monkeypatch, cpu: str, **options) -> tuple[EnergySession, _RunSink, threading.Event]:
    """One stage through a _RunSink, suspended; its chart is held until the returned event is set."""
    import wattlog.artifacts

    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    release = threading.Event()
    monkeypatch.setattr(_Chart, "release", release)
    monkeypatch.setattr(wattlog.artifacts, "ChartJob", _Chart)
    session = EnergySession(MonitorOptions.from_kwargs(gpus=[0], cpu=cpu, ram="none", **options), gpus=[0], log_every_n_steps=1)
    first = _RunSink()
    session.open(first)
    _stage(session)
    session.suspend()
    return session, first, release


def test_the_next_stage_of_the_run_takes_the_finishing_sink_over_without_waiting(gpu, monkeypatch):
    """fit() then test(): the test stage starts while fit's chart is still drawn, writes through fit's
    sink (one stream, one writer), the chart lands in it when drawn, and the sink is closed once, by the
    last stage's end."""
    session, first, release = _stage_with_held_chart(monkeypatch, cpu="none")
    unused = _RunSink()
    session.open(unused)  # returns while the chart is held: no wait
    assert session.sink is first and not unused.started and not first.closed
    _stage(session, steps=2)
    assert first.history("energy/test_j") or first.history("energy/train_j")  # the second stage's summary
    release.set()
    session.suspend()
    session.wait_finished()
    assert [a[0] for a in first.artifacts].count(keys.POWER_PNG) == 2  # both stages' charts, in stage order
    assert first.closings == 1 and not unused.started
    session.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("wattlog-")]


def test_a_next_stage_whose_cpu_reading_sees_the_chart_waits_for_it_before_measuring(gpu, monkeypatch):
    """A machine-wide CPU estimate (like a RAPL package counter) sees the chart process: drawn alongside
    the next stage, its CPU would be billed to that stage. So such a stage waits, then opens its own sink."""
    session, first, release = _stage_with_held_chart(monkeypatch, cpu="estimate", cpu_scope="system")
    second = _RunSink()
    threading.Timer(0.3, release.set).start()
    session.open(second)  # waits for the first stage's chart and close
    assert first.closed and first.closings == 1 and session.sink is second and second.started
    assert keys.POWER_PNG in [a[0] for a in first.artifacts]
    session.close()


def test_a_next_stage_with_a_process_scope_estimate_takes_the_sink_over(gpu, monkeypatch):
    """The process-scope estimate leaves wattlog's helper processes out, so the chart is not billed."""
    session, first, release = _stage_with_held_chart(monkeypatch, cpu="estimate", cpu_scope="process")
    session.open(_RunSink())  # returns while the chart is held
    assert session.sink is first and not first.closed
    release.set()
    session.suspend()
    session.wait_finished()
    assert first.closings == 1
    session.close()


def _stage_with_failing_chart(monkeypatch, message: str) -> tuple[EnergySession, MemorySink]:
    import wattlog.artifacts

    monkeypatch.setattr(_Chart, "error", wattlog.artifacts.ChartError(message))
    monkeypatch.setattr(wattlog.artifacts, "ChartJob", _Chart)
    session, sink = _session()
    _stage(session)
    return session, sink


def test_a_chart_failing_on_the_finishing_thread_is_warned_and_tagged(gpu, monkeypatch):
    from wattlog.errors import WattlogWarning

    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    session, sink = _stage_with_failing_chart(monkeypatch, "RuntimeError: backend exploded")
    with pytest.warns(WattlogWarning, match="power.png skipped: ChartError: RuntimeError: backend exploded"):
        session.suspend()
        session.wait_finished()
    assert sink.closed and "power.png skipped" in str(sink.tags[keys.T_DEGRADED])
    session.close()


def test_strict_mode_finishes_the_chart_on_the_caller(gpu, monkeypatch):
    from wattlog.errors import SourceError

    monkeypatch.setenv("WATTLOG_STRICT", "1")
    session, sink = _stage_with_failing_chart(monkeypatch, "no")
    with pytest.raises(SourceError, match="power.png skipped"):
        session.suspend()
    assert sink.closed  # closed although the chart failed
    session.close()


def test_a_real_chart_reaches_the_sink(gpu, monkeypatch):
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    session, sink = _session()
    _stage(session)
    session.close()
    png = [a for a in sink.artifacts if a[0] == keys.POWER_PNG]
    assert sink.closed and png and png[0][2][:8] == b"\x89PNG\r\n\x1a\n"


def test_a_local_sink_keeps_earlier_stages_tags_and_starts_afresh_over_a_broken_file(tmp_path):
    import json

    from wattlog.sinks.base import LocalSink

    first = LocalSink(tmp_path)
    first.start()
    first.set_tags({"energy.attempts": 1})
    first.close()
    second = LocalSink(tmp_path)  # the next stage of the same run
    second.start()
    second.set_tags({"energy.estimated": "cpu"})
    second.close()
    assert json.loads((tmp_path / "tags.json").read_text()) == {"energy.attempts": "1", "energy.estimated": "cpu"}
    (tmp_path / "tags.json").write_text("[1, 2]")  # not an object: ignored, never a failed stage start
    third = LocalSink(tmp_path)
    third.start()
    third.set_tags({"energy.degraded": "x"})
    third.close()
    assert json.loads((tmp_path / "tags.json").read_text()) == {"energy.degraded": "x"}
