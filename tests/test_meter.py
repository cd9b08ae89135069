"""EnergyMeter against sources with a known ground truth."""

from __future__ import annotations

import math
import threading
import time

import pytest

from wattlog.errors import ConfigError, SourceError
from wattlog.meter import EnergyMeter
from wattlog.sources.base import Domain, EnergySource, Reading


class KnownPowerSource(EnergySource):
    """A counter whose cumulative energy is the exact integral of power(t) = a + b*sin(w t)."""

    kind = "gpu"

    def __init__(self, name: str = "gpu0", base_w: float = 100.0, swing_w: float = 40.0, fail_after_s: float | None = None):
        self.name, self.base_w, self.swing_w, self.fail_after_s = name, base_w, swing_w, fail_after_s
        self.t0 = 0.0
        self.reads = 0

    def energy_at(self, t: float) -> float:
        dt = t - self.t0
        return self.base_w * dt + self.swing_w * (1 - math.cos(3.0 * dt)) / 3.0

    def start(self) -> list[Domain]:
        self.t0 = time.perf_counter()
        return [Domain(self.name, "gpu", "counter", False)]

    def read(self) -> Reading:
        self.reads += 1
        t = time.perf_counter()
        if self.fail_after_s is not None and t - self.t0 > self.fail_after_s:
            raise SourceError(f"{self.name} lost")
        return Reading(t, {self.name: self.energy_at(t)})


def test_segments_telescope_and_match_ground_truth():
    src = KnownPowerSource()
    meter = EnergyMeter([src], sample_interval_s=0.01)
    meter.start()
    t_first = time.perf_counter()
    meter.mark("a", t_first)
    boundaries = [t_first]
    for i in range(20):
        time.sleep(0.1)
        t = time.perf_counter()
        meter.mark(i, t)
        boundaries.append(t)
    segments = meter.close()
    steps = [s for s in segments if s.label is not None and s.end_s <= boundaries[-1]]
    assert len(steps) == 20
    total = sum(s.energy_j["gpu0"] for s in steps)
    truth = src.energy_at(boundaries[-1]) - src.energy_at(boundaries[0])
    assert total == pytest.approx(truth, rel=0.01)  # >= 2 s window within 1 %
    # telescoping: the sum of per-segment energies equals the interpolated counter delta exactly
    all_total = sum(s.energy_j["gpu0"] for s in segments)
    assert all_total == pytest.approx(meter.energy_j()["gpu0"], rel=1e-12, abs=1e-9)
    for seg, (t0, t1) in zip(steps, zip(boundaries, boundaries[1:])):
        assert seg.start_s == t0 and seg.end_s == t1
        assert seg.energy_j["gpu0"] == pytest.approx(src.energy_at(t1) - src.energy_at(t0), rel=0.02)


def test_drain_returns_only_resolved_segments_and_keeps_order():
    meter = EnergyMeter([KnownPowerSource()], sample_interval_s=0.05)
    meter.start()
    labels = []
    for i in range(5):
        meter.mark(i)
        time.sleep(0.02)
    got = []
    deadline = time.time() + 2
    while len(got) < 5 and time.time() < deadline:  # the last mark's segment is still open
        got += meter.drain()
        time.sleep(0.01)
    labels = [s.label for s in got]
    assert labels == [None, 0, 1, 2, 3]
    assert all(s.energy_j["gpu0"] >= 0 for s in got)
    assert [s.label for s in meter.close()] == [4]


def test_window_measures_block():
    src = KnownPowerSource(base_w=50.0, swing_w=0.0)
    meter = EnergyMeter([src], sample_interval_s=0.01)
    meter.start()
    with meter.window("w") as w:
        time.sleep(0.3)
    meter.close()
    assert w.energy_j["gpu0"] == pytest.approx(50.0 * w.duration_s, rel=1e-6)
    assert w.power_w == pytest.approx(50.0, rel=1e-6)


def test_source_failure_degrades_not_kills(monkeypatch):
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)
    good, bad = KnownPowerSource("gpu0"), KnownPowerSource("gpu1", fail_after_s=0.1)
    meter = EnergyMeter([good, bad], sample_interval_s=0.01)
    meter.start()
    with pytest.warns(UserWarning, match="gpu1 lost"):
        time.sleep(0.3)
        meter.mark("x")
        meter.drain()
    segments = meter.close()
    assert any("gpu1 lost" in r for r in meter.degraded)
    totals = meter.energy_j()
    assert totals["gpu0"] > 2 * totals["gpu1"]  # gpu1 stopped accruing, gpu0 went on
    assert all(v >= 0 for s in segments for v in s.energy_j.values())


def test_source_failure_raises_in_strict_mode():
    meter = EnergyMeter([KnownPowerSource(fail_after_s=0.05)], sample_interval_s=0.01)
    meter.start()
    time.sleep(0.2)
    with pytest.raises(SourceError, match="lost"):
        meter.drain()
    meter.close()


def test_backwards_counter_is_held_never_negative(monkeypatch):
    monkeypatch.delenv("WATTLOG_STRICT", raising=False)

    class Backwards(KnownPowerSource):
        def read(self):
            r = super().read()
            if self.reads == 5:
                return Reading(r.time_s, {self.name: 0.0})
            return r

    meter = EnergyMeter([Backwards()], sample_interval_s=0.01)
    meter.start()
    with pytest.warns(UserWarning, match="backwards"):
        for i in range(10):
            meter.mark(i)
            time.sleep(0.01)
        segments = meter.close()
    assert all(s.energy_j["gpu0"] >= 0 for s in segments)


def test_mark_is_thread_safe_and_state_roundtrip():
    meter = EnergyMeter([KnownPowerSource()], sample_interval_s=0.01)
    meter.load_state_dict({"energy_j": {"gpu0": 1000.0}})
    meter.start()
    threads = [threading.Thread(target=lambda: [meter.mark("t") for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.05)
    segments = meter.close()
    assert len(segments) >= 4000
    state = meter.state_dict()
    assert state["energy_j"]["gpu0"] > 1000.0
    assert meter.close() == []  # idempotent


def test_bad_interval():
    with pytest.raises(ConfigError, match="sample_interval_s"):
        EnergyMeter([], sample_interval_s=0)


def test_duplicate_domains_rejected():
    meter = EnergyMeter([KnownPowerSource("gpu0"), KnownPowerSource("gpu0")])
    with pytest.raises(ConfigError, match="distinct"):
        meter.start()
