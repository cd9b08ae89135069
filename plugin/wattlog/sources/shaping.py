"""Per-step energy finer than the energy counter: each counter delta shaped by instant power.

A GPU's energy counter (NVML ``nvmlDeviceGetTotalEnergyConsumption``) may update more slowly than
the sampler reads it (20-100 ms is plausible). Interpolating the raw readings then turns every counter
*quantum* into a staircase: flat for a whole period, then a jump, so steps shorter than the period get
badly wrong energies. :class:`CounterShaper` fixes that without giving up the counter's exactness:

1. **Detect a slow counter**: identical readings after it has moved, then a change. Until then every
   reading is kept at its read time (each read interval shaped as in 3.); a counter whose period is under
   1.2 read intervals goes back to that (its updates cannot be told apart), with half a period of lag.
2. **Locate each update** in its bracket ``(a_k, b_k]`` (last read with the old value, first with the new):
   the period is the slope of the brackets' midpoints against their update numbers, searched for the
   widest window common to the recent brackets shifted by whole periods; the update is that window's
   middle. The sampler dithers its cadence meanwhile, so the brackets land at varying phases.
3. **Shape each quantum** ``[u_(k-1), u_k]`` by the instant-power readings in it: flat between two reads
   with the same power; where they differ, one step from the old to the new level inside a *change
   window* (the read interval, extended back over the previous flat one: the sensor lags the read). The
   counter delta minus the gain-scaled flat energy is what the windows hold: each window's step is placed
   so that it does (weighted by its level change, clipped to its window); what cannot be placed is spread
   in proportion to power. The gain (counter J per instant-power J) is the ratio over recent flat quanta.

The shaped curve equals the counter at every located update, so energies between updates are exactly
the counter's deltas and per-step energies still telescope. The energy after the last update is an
estimate (``flush(tail=True)``: gain x instant power). Limits: README, "Step attribution".
Everything here is plain arithmetic on (time, joules, watts) tuples: no NVML.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from wattlog.sources.base import Reading

_HISTORY = 24  # update brackets kept to estimate the counter's period and phase
_GAIN_QUANTA = 12
_GAIN_RANGE = (0.25, 4.0)
_SAME_POWER_REL = 1e-3  # two power readings within this relative difference are the same level
_ENGAGE_AFTER = 1  # shaping engages once the counter moved, held still over a read, and moved again...
_DISENGAGE_AFTER = 100  # ...and disengages after this many reads in a row that each saw a change
_MIN_PERIOD_READS = 1.2  # shaping needs a counter period of at least this many read intervals
_BACK_TO_BACK_S = 0.002  # an identical reading this soon (or under half the usual interval) is no hold
_HOLD_S = 0.25  # not engaged: identical readings are held back this long before they count as flat
_STALL_PERIODS, _STALL_MIN_S = 4.0, 0.5  # engaged: no change for max(4 periods, 0.5 s) is flat to now


def estimate_period(brackets: Sequence[tuple[float, float]]) -> tuple[float | None, list[int]]:
    """The update period (s) from update brackets ``(a, b]``, and each bracket's update number.

    Update numbers count whole periods from the first bracket (a missed update advances it by 2).
    Returns ``(None, [])`` with fewer than 3 brackets.
    """
    if len(brackets) < 3:
        return None, []
    mids = [(a + b) / 2 for a, b in brackets]
    gaps = sorted(m1 - m0 for m0, m1 in zip(mids, mids[1:]))
    usual = [g for g in gaps if g < 2.5 * gaps[len(gaps) // 2]]  # without stalls and missed updates
    p0 = sum(usual) / len(usual) if usual else 0.0  # a mean: aliased reads make gaps of d and 2d, not P
    if p0 <= 0:
        return None, []
    numbers = [0]
    for m0, m1 in zip(mids, mids[1:]):
        numbers.append(numbers[-1] + max(1, round((m1 - m0) / p0)))
    n_mean, m_mean = sum(numbers) / len(numbers), sum(mids) / len(mids)
    var = sum((n - n_mean) ** 2 for n in numbers)
    if var <= 0:
        return None, []
    slope = sum((n - n_mean) * (m - m_mean) for n, m in zip(numbers, mids)) / var
    return (slope if slope > 0 else None), numbers


def _phase_window(brackets: Sequence[tuple[float, float]], numbers: Sequence[int],
                  period: float) -> tuple[float, float]:
    """The times the newest update can have if updates are exactly ``period`` apart: ``(lo, hi)``."""
    last = numbers[-1]
    lo = max(a + (last - n) * period for (a, _), n in zip(brackets, numbers))
    hi = min(b + (last - n) * period for (_, b), n in zip(brackets, numbers))
    return lo, hi


def locate_update(brackets: Sequence[tuple[float, float]]) -> float:
    """The most likely time of the newest update: the middle of the widest window common to the brackets
    shifted by whole periods (period searched near the estimate); when none fits (an irregular counter),
    fewer recent brackets; failing that, the newest bracket's middle.
    """
    brackets = list(brackets)
    a_n, b_n = brackets[-1]
    for keep in (len(brackets), 8, 4):
        recent = brackets[-keep:]
        period, numbers = estimate_period(recent)
        if period is None:
            continue
        lo_p, hi_p = period * 0.98, period * 1.02
        for _ in range(40):  # the window width is concave in the period: ternary search
            m1, m2 = lo_p + (hi_p - lo_p) / 3, hi_p - (hi_p - lo_p) / 3
            w1, w2 = _phase_window(recent, numbers, m1), _phase_window(recent, numbers, m2)
            if w1[1] - w1[0] < w2[1] - w2[0]:
                lo_p = m1
            else:
                hi_p = m2
        lo, hi = _phase_window(recent, numbers, (lo_p + hi_p) / 2)
        if hi > lo:
            return min(max((lo + hi) / 2, a_n), b_n)
    return (a_n + b_n) / 2


def _same(p: float, q: float) -> bool:
    return abs(p - q) <= _SAME_POWER_REL * max(abs(p), abs(q), 1e-9)


def power_pieces(reads: Sequence[tuple[float, float | None]]) -> list[tuple[float, float, float, float]]:
    """Instant-power readings ``(time, watts | None)`` -> pieces ``(start, end, from_w, to_w)``.

    A piece with ``from_w == to_w`` is flat. A change piece steps from ``from_w`` to ``to_w`` somewhere
    inside it; it spans its read interval extended back over the previous interval when that one was
    flat (the sensor's update lags the read by up to its own period). A missing reading holds the
    previous one.
    """
    filled: list[tuple[float, float]] = []
    last_w: float | None = next((w for _, w in reads if w is not None), None)
    if last_w is None:
        return []
    for t, w in reads:
        if w is not None:
            last_w = max(0.0, float(w))
        filled.append((t, last_w))
    pieces: list[tuple[float, float, float, float]] = []
    for (t0, w0), (t1, w1) in zip(filled, filled[1:]):
        if t1 <= t0:
            continue
        if _same(w0, w1):
            pieces.append((t0, t1, w1, w1))
            continue
        start = t0
        if pieces and pieces[-1][2] == pieces[-1][3] and _same(pieces[-1][3], w0):
            start = pieces.pop()[0]  # the previous flat interval joins the window
        pieces.append((start, t1, w0, w1))
    return pieces


def _clip(pieces: Sequence[tuple[float, float, float, float]], lo: float, hi: float,
          first_w: float | None) -> list[tuple[float, float, float, float]]:
    """Pieces restricted to ``[lo, hi]``; gaps before the first piece hold ``first_w``."""
    out: list[tuple[float, float, float, float]] = []
    cursor = lo
    for s, e, wa, wb in pieces:
        if e <= lo or s >= hi:
            continue
        s2, e2 = max(s, lo), min(e, hi)
        if s2 > cursor and first_w is not None and not out:
            out.append((cursor, s2, first_w, first_w))
        out.append((s2, e2, wa, wb))
        cursor = e2
    if out and cursor < hi:
        w = out[-1][3]
        out.append((cursor, hi, w, w))
    elif not out and first_w is not None:
        out.append((lo, hi, first_w, first_w))
    return out


def shape_quantum(
    start_s: float, end_s: float, energy_j: float,
    pieces: Sequence[tuple[float, float, float, float]], gain: float | None,
) -> tuple[list[tuple[float, float]], float, bool]:
    """Distribute ``energy_j`` over ``[start_s, end_s]`` by power pieces already clipped to it.

    Returns the cumulative points ``(time, joules since start_s)`` after ``start_s`` (the last at
    ``end_s`` with exactly ``energy_j``), the nominal instant-power energy of the quantum (for the gain),
    and whether the quantum had a power change.
    """
    nominal = sum((e - s) * (wa + wb) / 2 for s, e, wa, wb in pieces)
    changes = [i for i, (_, _, wa, wb) in enumerate(pieces) if wa != wb]
    if energy_j <= 0 or nominal <= 0 or end_s <= start_s:
        return [(end_s, max(energy_j, 0.0))], nominal, bool(changes)
    a = gain if gain is not None else energy_j / nominal
    amounts = [a * (e - s) * (wa + wb) / 2 for s, e, wa, wb in pieces]
    residual = energy_j - sum(amounts)
    weights = {i: abs(pieces[i][3] - pieces[i][2]) * (pieces[i][1] - pieces[i][0]) for i in changes}
    total_w = sum(weights.values())
    if total_w > 0:
        for i in changes:
            s, e, wa, wb = pieces[i]
            lo, hi = a * (e - s) * min(wa, wb), a * (e - s) * max(wa, wb)
            amounts[i] = min(max(amounts[i] + residual * weights[i] / total_w, lo), hi)
    placed = sum(amounts)
    scale = energy_j / placed if placed > 0 else 0.0
    points: list[tuple[float, float]] = []
    cum = 0.0
    for (s, e, wa, wb), amount in zip(pieces, amounts):
        if wa != wb and amount > 0:
            # the step at tau holds `amount`: a*(wa*(tau-s) + wb*(e-tau)) = amount
            tau = s + (amount / a - wb * (e - s)) / (wa - wb)
            tau = min(max(tau, s), e)
            if s < tau < e:
                points.append((tau, cum + scale * a * wa * (tau - s)))
        cum += scale * amount
        points.append((e, cum))
    if points:
        points[-1] = (end_s, energy_j)
    return points, nominal, bool(changes)


class CounterShaper:
    """One cumulative counter, read at a sampler's cadence, turned into a final cumulative curve.

    Feed every read with :meth:`add` (cumulative joules since start, instant watts or None); take the
    final curve with :meth:`take` / :meth:`value_at`. ``final_s`` is the time up to which the curve is
    final; it lags the reads by up to a counter period once the shaper is ``engaged``.

    Args:
        start_s: time of the starting read; the curve starts at ``(start_s, energy_j)``.
        energy_j: cumulative joules at ``start_s``.
        power_w: instant power at ``start_s`` (None: unknown).
        shape: False: always pass readings through (a source without a counter).
    """

    def __init__(self, start_s: float, energy_j: float = 0.0, power_w: float | None = None,
                 shape: bool = True) -> None:
        self.shape = shape
        self.wants_power = shape  # reads should carry instant power: every counter is shaped
        self.engaged = False
        self.period_s: float | None = None
        self.times_s: list[float] = [start_s]
        self.values_j: list[float] = [energy_j]
        self.final_s = start_s
        self._reads: list[tuple[float, float, float | None]] = [(start_s, energy_j, power_w)]
        self._counter_j = energy_j
        self._held = 0
        self._resumes = 0
        self._streak = 0
        self._read_dt: float | None = None
        self._lag_s = 0.0
        self._brackets: deque[tuple[float, float]] = deque(maxlen=_HISTORY)
        self._last_change_s = start_s
        self._gain_hist: deque[tuple[float, float, bool]] = deque(maxlen=_GAIN_QUANTA)

    # -- feeding ------------------------------------------------------------------------------

    def add(self, time_s: float, energy_j: float, power_w: float | None = None) -> None:
        """One read: the counter's cumulative joules at ``time_s`` and instant power (or None)."""
        prev_s = self._reads[-1][0]
        if time_s <= prev_s:
            return
        self._reads.append((time_s, energy_j, power_w))
        dt = time_s - prev_s
        back_to_back = dt < _BACK_TO_BACK_S or (self._read_dt is not None and dt < 0.5 * self._read_dt)
        if not back_to_back:
            self._read_dt = dt if self._read_dt is None else 0.9 * self._read_dt + 0.1 * dt
        if not self.shape:
            self._counter_j = energy_j
            self._emit(time_s, energy_j)
            del self._reads[:-1]
            return
        if energy_j != self._counter_j:
            self._counter_j = energy_j
            self._brackets.append((prev_s, time_s))
            self._last_change_s = time_s
            if self._held:
                self._resumes += 1
                self._streak = 0
                if self._resumes >= _ENGAGE_AFTER:
                    self.engaged = True  # moved, held still, moved again: slower than the reads
            else:
                self._streak += 1
                if self._streak >= _DISENGAGE_AFTER:
                    self.engaged = False
                    self._resumes = 0
            self._held = 0
            if self.engaged and len(self._brackets) >= 8:
                period = estimate_period(self._brackets)[0]
                if period is not None and period < _MIN_PERIOD_READS * self._read_dt:
                    self.engaged = False  # about as fast as the reads: updates cannot be told apart,
                    self._resumes = -_DISENGAGE_AFTER  # but a reading lags its update by half a period
                    self._lag_s = period / 2
            end_s = max(time_s - self._lag_s, (self.times_s[-1] + time_s) / 2)
            self._close_quantum(None if self.engaged else end_s)
            return
        if back_to_back:
            return  # too soon after the last read for a fast counter to have moved: no evidence either way
        self._held += 1
        limit_s = max(_STALL_PERIODS * (self.period_s or 0.0), _STALL_MIN_S) if self.engaged else _HOLD_S
        if time_s - self.final_s > limit_s:
            self._emit(time_s, self.values_j[-1])  # the counter is not moving: no energy up to now
            self._trim(time_s)

    def flush(self, time_s: float, tail: bool = True) -> None:
        """Make the curve final up to ``time_s`` (the final read, or a lost device).

        ``tail=True``: energy since the last update is instant power x gain (the counter has not
        reported it yet); False: none (the curve stays flat at the last counter value).
        """
        if time_s <= self.final_s:
            return
        extra = 0.0
        if tail and self.engaged:
            reads = [(t, w) for t, _, w in self._reads]
            pieces = _clip(power_pieces(reads), self.final_s, time_s, self._first_power())
            nominal = sum((e - s) * (wa + wb) / 2 for s, e, wa, wb in pieces)
            extra = max(0.0, nominal * (self._gain() or 1.0))
        else:
            extra = self._counter_j - self.values_j[-1]
        self._emit(time_s, self.values_j[-1] + max(extra, 0.0))
        self._trim(time_s)

    # -- reading the curve ---------------------------------------------------------------------

    def value_at(self, time_s: float) -> float:
        """The final curve at ``time_s`` (linear between its points; clamped at its ends)."""
        times, values = self.times_s, self.values_j
        i = bisect.bisect_left(times, time_s)
        if i <= 0:
            return values[0]
        if i >= len(times):
            return values[-1]
        t0, t1 = times[i - 1], times[i]
        return values[i - 1] + (values[i] - values[i - 1]) * (time_s - t0) / (t1 - t0)

    def prune_before(self, time_s: float) -> None:
        """Forget curve points no longer needed to evaluate at or after ``time_s``."""
        i = bisect.bisect_left(self.times_s, time_s) - 1
        if i > 0:
            del self.times_s[:i]
            del self.values_j[:i]

    # -- internals ----------------------------------------------------------------------------

    def _emit(self, time_s: float, energy_j: float) -> None:
        if time_s <= self.times_s[-1]:
            return
        self.times_s.append(time_s)
        self.values_j.append(max(energy_j, self.values_j[-1]))
        self.final_s = time_s

    def _trim(self, time_s: float) -> None:
        """Drop reads not needed for the pieces after ``time_s`` (keep the read before it)."""
        i = bisect.bisect_left([t for t, _, _ in self._reads], time_s) - 2
        if i > 0:
            del self._reads[:i]

    def _first_power(self) -> float | None:
        return next((w for _, _, w in self._reads if w is not None), None)
    def _gain(self) -> float | None:
        flat = [(e, w) for e, w, changed in self._gain_hist if not changed and w > 0]
        use = flat if flat else [(e, w) for e, w, _ in self._gain_hist if w > 0]
        if not use:
            return None
        total_w = sum(w for _, w in use)
        return min(max(sum(e for e, _ in use) / total_w, _GAIN_RANGE[0]), _GAIN_RANGE[1])

    def _close_quantum(self, end_s: float | None) -> None:
        """The counter just changed: shape the quantum from the curve's end to its update.

        ``end_s`` None: the located update (engaged); else the read time (a counter not known to be slow).
        """
        start_s, start_j = self.times_s[-1], self.values_j[-1]
        if end_s is None:
            self.period_s = estimate_period(self._brackets)[0]
            a_k, b_k = self._brackets[-1]
            end_s = min(max(locate_update(self._brackets), a_k, start_s + 1e-9), b_k)
        reads = [(t, w) for t, _, w in self._reads]
        pieces = _clip(power_pieces(reads), start_s, end_s, self._first_power())
        delta_j = self._counter_j - start_j
        points, nominal, changed = shape_quantum(start_s, end_s, delta_j, pieces, self._gain())
        for t, e in points:
            self._emit(t, start_j + e)
        if (self.engaged or self._streak >= 10) and nominal > 0 and delta_j > 0:  # placed right: a calibration
            self._gain_hist.append((delta_j, nominal, changed))
        self._trim(end_s)


def merge_curves(shapers: Sequence[CounterShaper], since_s: float) -> list[tuple[float, list[float]]]:
    """Points of several curves after ``since_s`` up to where all are final, on the union of their times.

    Each point is ``(time, [value of each curve])``; curves are evaluated linearly between their own
    points. Prunes what no later call needs.
    """
    if not shapers:
        return []
    final_s = min(s.final_s for s in shapers)
    if final_s <= since_s:
        return []
    times = sorted({t for s in shapers for t in s.times_s if since_s < t <= final_s})
    out = [(t, [s.value_at(t) for s in shapers]) for t in times]
    for s in shapers:
        s.prune_before(final_s)
    return out


@dataclass(frozen=True)
class ShapedReading(Reading):
    """A :class:`Reading` that also carries earlier final points: ``((time_s, {domain: J}), ...)``.

    The sampler appends ``history`` (oldest first) before the reading itself.
    """

    history: tuple[tuple[float, dict[str, float]], ...] = ()
