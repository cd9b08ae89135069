"""Shaping a slow energy counter by instant power: accuracy on deterministic simulated data, exact totals.

Every figure here is an *accuracy* on simulated reads (no threads, no wall clock): a square wave
(100 W <-> 400 W, 1 s period, 50 % duty), an energy counter that updates every 100 ms (each update the
exact integral), an instant-power field that holds the power sampled at its last update (every 20 ms),
reads every 20 ms (+-25 % while shaping: the sampler's dither, seeded), 25 ms steps.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
from fakes.nvml import FakeGpu, FakeNvml, ManualClock, SquareWave

from wattlog.sampler import Sampler, Trace
from wattlog.sources.nvml import NvmlGpu
from wattlog.sources.shaping import CounterShaper, estimate_period, locate_update, merge_curves, shape_quantum


def _last_update(t: float, period_s: float, phase_s: float) -> float:
    return t if period_s <= 0 else phase_s + math.floor((t - phase_s) / period_s) * period_s


def simulate(wave: SquareWave, *, counter_s: float = 0.1, instant_s: float = 0.02, read_s: float = 0.02,
             step_s: float = 0.025, duration_s: float = 6.25, seed: int = 1, phase_s: float = 0.0123,
             gain: float = 1.0, shape: bool = True):
    """Feed a CounterShaper simulated reads; return (shaper, step bounds, true step energies, reads)."""
    rng = random.Random(seed)
    t0 = 0.5

    def counter(t: float) -> float:
        return wave.integral(0.0, _last_update(t, counter_s, phase_s))

    def instant(t: float) -> float:
        return gain * wave(_last_update(t, instant_s, 0.7 * phase_s))

    c0 = counter(t0)
    shaper = CounterShaper(t0, 0.0, instant(t0), shape=shape)
    reads = []
    t = t0
    while t < t0 + duration_s:  # like the sampler: dithered while shaping, else regular (+0.2 ms jitter)
        t += read_s * (1 + (0.25 if shaper.engaged else 0.0) * rng.uniform(-1, 1)) + rng.gauss(0.0, 2e-4)
        reads.append((t, counter(t) - c0))
        shaper.add(t, counter(t) - c0, instant(t) if shaper.wants_power else None)
    end_s = t
    bounds = [t0 + i * step_s for i in range(int((end_s - t0) / step_s) + 1)]
    truth = [wave.integral(a, b) for a, b in zip(bounds, bounds[1:])]
    return shaper, bounds, truth, reads


def step_errors(shaper: CounterShaper, bounds, truth) -> list[float]:
    est = [shaper.value_at(b) - shaper.value_at(a) for a, b in zip(bounds, bounds[1:])]
    return sorted(abs(e - t) / t for e, t in zip(est, truth))


def median_p95(errors: list[float]) -> tuple[float, float]:
    return statistics.median(errors), errors[int(0.95 * len(errors))]


# ---------------------------------------------------------------- accuracy (deterministic data)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("phase_s", [0.0, 0.0123, 0.047, 0.077])
def test_square_wave_100ms_counter_meets_the_per_step_targets(seed, phase_s) -> None:
    shaper, bounds, truth, reads = simulate(SquareWave(), seed=seed, phase_s=phase_s)
    shaper.flush(reads[-1][0])
    median, p95 = median_p95(step_errors(shaper, bounds[:-2], truth[:-2]))
    assert shaper.engaged and shaper.period_s == pytest.approx(0.1, rel=0.01)
    assert median <= 0.03 and p95 <= 0.20, (median, p95)


def test_shaping_beats_the_counter_alone() -> None:
    shaped, bounds, truth, reads = simulate(SquareWave())
    raw, *_ = simulate(SquareWave(), shape=False)
    shaped.flush(reads[-1][0])
    raw.flush(reads[-1][0])
    m_shaped, p_shaped = median_p95(step_errors(shaped, bounds[:-2], truth[:-2]))
    m_raw, p_raw = median_p95(step_errors(raw, bounds[:-2], truth[:-2]))
    assert p_raw > 0.9 and m_raw > 0.5  # a 100 ms staircase under 25 ms steps: most steps badly wrong
    assert p_shaped < p_raw / 5 and m_shaped < m_raw / 10


@pytest.mark.parametrize("gain", [0.9, 1.1])
def test_a_miscalibrated_instant_sensor_is_corrected_by_the_counter(gain) -> None:
    shaper, bounds, truth, reads = simulate(SquareWave(), gain=gain)
    shaper.flush(reads[-1][0])
    median, p95 = median_p95(step_errors(shaper, bounds[:-2], truth[:-2]))
    assert median <= 0.03 and p95 <= 0.20, (median, p95)


def test_smooth_power_stays_accurate() -> None:
    class Sine:
        def __call__(self, t: float) -> float:
            return 250.0 + 100.0 * math.sin(2 * math.pi * t / 0.7)

        def integral(self, a: float, b: float) -> float:
            w = 2 * math.pi / 0.7
            return 250.0 * (b - a) + 100.0 * (math.cos(w * a) - math.cos(w * b)) / w

    shaper, bounds, truth, reads = simulate(Sine())  # type: ignore[arg-type]
    shaper.flush(reads[-1][0])
    median, p95 = median_p95(step_errors(shaper, bounds[20:-2], truth[20:-2]))
    assert median <= 0.02 and p95 <= 0.06, (median, p95)


# ---------------------------------------------------------------- exactness


def test_curve_equals_the_counter_at_every_update_and_total_is_exact() -> None:
    shaper, _, _, reads = simulate(SquareWave(), duration_s=3.0)
    counter_values = sorted({e for _, e in reads})
    curve = set(shaper.values_j)
    engaged_from = next(i for i, v in enumerate(counter_values) if v >= shaper.values_j[0])
    # every counter value after the curve's first kept point is a point of the curve, exactly
    assert all(v in curve for v in counter_values[engaged_from + 1:])
    shaper.flush(reads[-1][0], tail=False)
    assert shaper.values_j[-1] == reads[-1][1]  # no tail: the total is the counter's delta, exactly


def test_tail_is_instant_power_after_the_last_update() -> None:
    shaper, _, _, reads = simulate(SquareWave(low_w=200.0, high_w=200.0))
    last_counter = reads[-1][1]
    last_update = shaper.final_s
    shaper.flush(reads[-1][0])
    tail_j = shaper.values_j[-1] - last_counter
    assert tail_j == pytest.approx(200.0 * (reads[-1][0] - last_update), rel=0.01)  # gain ~1


def test_fast_counter_keeps_every_reading_and_is_shaped_between_reads() -> None:
    shaper, bounds, truth, reads = simulate(SquareWave(), counter_s=0.001)
    assert not shaper.engaged
    assert all(shaper.value_at(t) == pytest.approx(e, abs=1e-9) for t, e in reads)  # the counter, exactly
    shaper.flush(reads[-1][0])
    median, p95 = median_p95(step_errors(shaper, bounds[:-2], truth[:-2]))
    assert median <= 0.01 and p95 <= 0.06, (median, p95)  # interpolating the reads alone: p95 ~15 %


def test_without_instant_power_a_fast_counter_passes_through_unchanged() -> None:
    shaper = CounterShaper(0.0, 0.0)
    reads = [(0.02 * i, 5.0 * i + (i % 3)) for i in range(1, 30)]
    for t, e in reads:
        shaper.add(t, e)
    assert shaper.times_s[1:] == [t for t, _ in reads] and shaper.values_j[1:] == [e for _, e in reads]


def test_stuck_counter_is_flat_and_never_engages() -> None:
    shaper = CounterShaper(0.0, 0.0)
    t, e = 0.0, 0.0
    for _ in range(10):
        t, e = t + 0.02, e + 4.0
        shaper.add(t, e)
    for _ in range(30):  # stuck: the same value for 0.6 s
        t += 0.02
        shaper.add(t, e)
    assert not shaper.engaged
    assert shaper.final_s > 0.2 + 0.25 and shaper.values_j[-1] == e


def test_shape_quantum_places_one_step_exactly() -> None:
    # 100 W until 0.033, then 400 W, inside a change window [0.02, 0.04]; quantum [0, 0.1]
    energy = 100 * 0.033 + 400 * (0.1 - 0.033)
    pieces = [(0.0, 0.02, 100.0, 100.0), (0.02, 0.04, 100.0, 400.0), (0.04, 0.1, 400.0, 400.0)]
    points, _, changed = shape_quantum(0.0, 0.1, energy, pieces, gain=1.0)
    assert changed and points[-1] == (0.1, energy)
    tau, cum = points[1]
    assert tau == pytest.approx(0.033) and cum == pytest.approx(3.3)


def test_period_and_update_time_from_brackets() -> None:
    rng = random.Random(7)
    true_period, phase = 0.1, 0.0311
    brackets, t = [], 0.0
    while len(brackets) < 20:
        t_next = t + 0.02 * (1 + 0.25 * rng.uniform(-1, 1))
        if math.floor((t_next - phase) / true_period) != math.floor((t - phase) / true_period):
            brackets.append((t, t_next))
        t = t_next
    period, numbers = estimate_period(brackets)
    assert period == pytest.approx(true_period, rel=0.01) and numbers == list(range(20))
    update = phase + math.floor((brackets[-1][1] - phase) / true_period) * true_period
    assert abs(locate_update(brackets) - update) < 0.004  # brackets are ~20 ms wide


def test_merge_curves_waits_for_every_device() -> None:
    fast, slow = CounterShaper(0.0, shape=False), CounterShaper(0.0)
    for t in (0.02, 0.04):
        fast.add(t, 10 * t)
    assert [p[0] for p in merge_curves([fast, slow], -1.0)] == [0.0]
    slow.flush(0.04)
    merged = merge_curves([fast, slow], 0.0)
    assert [p[0] for p in merged] == [0.02, 0.04]


# ---------------------------------------------------------------- through NvmlGpu and the sampler


def test_nvml_source_shapes_a_slow_counter_end_to_end(monkeypatch) -> None:
    """FakeNvml with a 100 ms counter and 20 ms instant field, read like the sampler does."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    clock = ManualClock()
    wave = SquareWave(phase_s=0.013)
    gpus = [FakeGpu(power_w=wave, counter_period_s=0.1, instant_period_s=0.02, counter_phase_s=0.0371),
            FakeGpu(power_w=150.0)]  # a second GPU with a fast counter: merged on one time axis
    fake = FakeNvml(gpus, clock=clock).install(monkeypatch)
    src = NvmlGpu()
    monkeypatch.setattr(src, "now_s", clock)
    domains = src.start()
    trace = Trace(domains)
    sampler = Sampler([src], [trace], 0.02, on_failure=lambda i, e: None, on_note=lambda n: None)
    rng = random.Random(3)
    t_start = clock()
    sampler.sample_once()
    while clock() - t_start < 6.0:
        clock.advance(0.02 * (1 + 0.25 * rng.uniform(-1, 1)))
        sampler.sample_once()
    t_end = clock()
    sampler.sample_once(final=True)
    src.close()
    bounds = [t_start + 0.3 + 0.025 * i for i in range(int((t_end - t_start - 0.4) / 0.025))]
    est = [trace.at(b)[0] - trace.at(a)[0] for a, b in zip(bounds, bounds[1:])]
    truth = [fake.true_energy_j(0, a, b) for a, b in zip(bounds, bounds[1:])]
    errors = sorted(abs(e - t) / t for e, t in zip(est, truth))
    median, p95 = median_p95(errors)
    assert median <= 0.03 and p95 <= 0.20, (median, p95)
    fast = [trace.at(b)[1] - trace.at(a)[1] for a, b in zip(bounds, bounds[1:])]
    assert all(f == pytest.approx(150.0 * 0.025, abs=2e-3) for f in fast)  # mJ integers
    # the run total: the counter's delta since start, plus the instant-power tail after its last update
    assert trace.values_j[-1][0] == pytest.approx(fake.true_energy_j(0, t_start, t_end), rel=0.03)


def test_a_back_to_back_identical_read_is_no_evidence_of_a_slow_counter() -> None:
    shaper = CounterShaper(0.0, 0.0, 100.0)
    shaper.add(0.0003, 0.0, 100.0)  # read again at once (the meter's first sample right after start)
    for i in range(1, 40):
        shaper.add(0.02 * i, 2.0 * i, 100.0)
    assert not shaper.engaged
    assert shaper.value_at(0.5) == pytest.approx(50.0)  # no lag correction for a fast counter
