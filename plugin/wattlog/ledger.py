"""The arithmetic of per-step energy: framework-free, so the Lightning callback is only wiring.

Flow: the meter yields :class:`~wattlog.meter.Segment` objects labelled with a :class:`StepLabel`;
:class:`StepAggregator` (one per process) merges consecutive segments of the same step into a
:class:`StepRecord`; :class:`EnergyLedger` (on the writing process) merges the records of every
rank, keeps the running totals and turns each training step into the contract's metrics:

``energy/step_j``, ``energy/power_w``, ``energy/gpu_power_w`` (only when a GPU is measured),
``energy/total_j``, ``energy/emissions_g`` and, with ``per_device``, ``energy/gpu{i}_power_w``.

Step attribution: a train step's record runs from the start of its first (micro-)batch to the start
of the next step's first batch, so records telescope and gradient accumulation gives one record per
optimizer step. The step number arrives in the same ordered stream as the boundaries, so a record is
emitted only once it is complete and numbered: either as a :class:`StepEnd` event, or (the Lightning
callback's hot path) in each train batch's own label, ``(logged_step, samples)``: see
:class:`StepAggregator`.

Memory stays bounded however long the run: the per-step rows of ``energy/trace.csv`` go to a
:class:`TraceLog` (an unlinked temporary file written as the run goes, plus a decimated copy of at
most ``max_plot_rows`` rows for the power chart), not to a list.

Run attempts: a run that is killed and resumed from a checkpoint has several *attempts*. The
ledger's state (what a checkpoint carries) lists them; :meth:`EnergyLedger.begin_attempt` starts
one, :meth:`EnergyLedger.reconcile_rerun` takes what the previous attempt logged after the
checkpoint (its steps were re-run) and makes the per-step history keep one point per step.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from wattlog import keys
from wattlog.meter import Segment
from wattlog.units import J_PER_KWH, emissions_g

STAGES = keys.STAGES


@dataclass(frozen=True)
class StepLabel:
    """What a boundary starts: a batch of a stage (train batches get their step from :class:`StepEnd`)."""

    stage: str
    step: int | None = None
    samples: int = 0


class StepEnd(int):
    """Ordered event: the open train step completed, and Lightning logs its metrics at ``step``.

    An ``int`` subclass (the step), not a dataclass: one is made per training step, on the training
    thread, and an int subclass is built in C, without a Python ``__init__``. Equal only to a StepEnd
    of the same step, never to a plain int."""

    __slots__ = ()

    @property
    def step(self) -> int:
        return int(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepEnd) and int(other) == int(self)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((StepEnd, int(self)))

    def __repr__(self) -> str:
        return f"StepEnd(step={int(self)})"


@dataclass
class StepRecord:
    """Energy of one step (or one non-step stretch, stage ``other``) on one or more ranks.

    ``start_s``/``end_s`` and ``wall_s`` come from rank 0's clock only (clocks of other nodes
    are not comparable); ``wall_s`` is 0 for a record of another rank.
    """

    stage: str
    step: int
    start_s: float
    end_s: float
    energy_j: dict[str, float]
    samples: int = 0
    ranks: int = 1
    wall_s: float = 0.0

    @property
    def duration_s(self) -> float:
        return self.wall_s

    @property
    def total_j(self) -> float:
        return sum(self.energy_j.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "stage": self.stage, "step": self.step, "start_s": self.start_s, "end_s": self.end_s,
            "energy_j": dict(self.energy_j), "samples": self.samples, "ranks": self.ranks, "wall_s": self.wall_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> StepRecord:
        return cls(**d)  # type: ignore[arg-type]


class StepAggregator:
    """Merge consecutive segments with the same (stage, step) into step records (one process).

    A record is emitted when a segment of another step follows it, so no step is emitted while
    it may still grow (gradient accumulation runs several batches per optimizer step).

    Labels: a :class:`StepLabel` starts a batch of its stage, and a :class:`StepEnd` numbers the open train
    record. A plain tuple ``(logged_step, samples)`` (the Lightning hot path's label) starts a train batch
    and carries the loop's counter of logged steps as the batch starts: when it differs from the open train
    record's, that record's optimizer step has ended and is numbered with the record's own ``logged_step``;
    when it is the same, the batch is another micro-batch of the same step. ``(logged_step, None)`` reports the counter at another
    boundary (validation, the stage's end) without starting a batch.
    """

    def __init__(self, domain_prefix: str = "", rank: int = 0) -> None:
        self._prefix = domain_prefix
        self._rank = rank
        self._current: StepRecord | None = None
        self._numbered = False  # the current train record got its step number
        self._logged: int | None = None  # the open train record's logged_step, when its batches carry one

    def add(self, segments: Iterable[Segment]) -> list[StepRecord]:
        done: list[StepRecord] = []
        for seg in segments:
            label = seg.label
            energy = {self._prefix + k: v for k, v in seg.energy_j.items()}
            wall_s = seg.duration_s if self._rank == 0 else 0.0
            cur = self._current
            if type(label) is tuple:
                logged, samples = label
                open_train = (cur is not None and cur.stage == "train" and not self._numbered
                              and self._logged is not None)
                if open_train and logged != self._logged:
                    cur.step, self._numbered = self._logged, True  # its optimizer step ended at this boundary
                if open_train and (samples is None or not self._numbered):  # a counter report, or a micro-batch
                    self._merge(cur, seg, energy, wall_s, samples or 0)
                    continue
                if samples is None:  # a counter report with no open train batch: like a StepEnd without one
                    stage, step, samples = "other", -1, 0
                else:
                    stage, step = "train", -1
                    self._numbered = True  # never merged into: a new record starts below
            elif isinstance(label, StepEnd):
                if cur is not None and cur.stage == "train" and not self._numbered:
                    cur.step = label.step  # the gap after the step (logging, next fetch) is the step's
                    self._numbered = True
                    self._merge(cur, seg, energy, wall_s, 0)
                    continue
                stage, step, samples = "other", -1, 0
            elif isinstance(label, StepLabel):
                stage, step, samples = label.stage, label.step if label.step is not None else -1, label.samples
            else:
                stage, step, samples = "other", -1, 0
            if cur is not None and cur.stage == stage and (
                (stage == "train" and not self._numbered) or (stage != "train" and cur.step == step)
            ):
                self._merge(cur, seg, energy, wall_s, samples)  # micro-batches of one optimizer step
                continue
            if cur is not None:
                done.append(cur)
            self._current = StepRecord(stage, step, seg.start_s, seg.end_s, energy, samples, 1, wall_s)
            self._numbered, self._logged = False, label[0] if type(label) is tuple and stage == "train" else None
        return done

    @staticmethod
    def _merge(cur: StepRecord, seg: Segment, energy: dict[str, float], wall_s: float, samples: int) -> None:
        cur.end_s = seg.end_s
        cur.wall_s += wall_s
        cur.samples += samples
        for k, v in energy.items():
            cur.energy_j[k] = cur.energy_j.get(k, 0.0) + v

    def finish(self) -> list[StepRecord]:
        """Emit the step in progress (at the end of a stage)."""
        cur, self._current = self._current, None
        return [cur] if cur is not None else []


@dataclass
class LedgerState:
    """Running totals; what a checkpoint carries."""

    total_j: float = 0.0
    kind_j: dict[str, float] = field(default_factory=dict)
    stage_j: dict[str, float] = field(default_factory=dict)
    stage_samples: dict[str, int] = field(default_factory=dict)
    stage_duration_s: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    j_to_target: float | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    rerun_j: float = 0.0


TRACE_FIELDS = ("stage", "step", "attempt", "t_start_s", "t_end_s", "duration_s", "samples")


class TraceLog:
    """The rows of ``energy/trace.csv``, written as they come to a private temporary file.

    :meth:`suspend` closes the file between stages (no descriptor stays open while nothing is
    measured); the next row reopens it. :meth:`close` deletes it.

    Memory is O(``max_plot_rows``): besides the file, it keeps at most ``max_plot_rows`` rows for the
    power chart: every row until there are that many, then bins of 2, 4, ... consecutive rows merged
    (joules and durations summed, so power stays the mean over the bin and the bins stay contiguous).

    Args:
        domains: the domain names (their ``<domain>_j`` columns); a record with a new domain
            widens the header when the file is written out.
        max_plot_rows: bound of :meth:`plot_rows`.
    """

    def __init__(self, domains: Iterable[str] = (), max_plot_rows: int = 5_000) -> None:
        self.domains: list[str] = sorted(set(domains))
        self.max_plot_rows = max(2, int(max_plot_rows))
        self.rows = 0
        self._path: str | None = None
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._file_domains: list[str] = []
        self._known: set[str] = set(self.domains)
        self._plot: list[dict[str, object]] = []
        self._bin: dict[str, object] | None = None
        self._bin_rows = 0
        self._stride = 1

    def append(self, rec: StepRecord, attempt: int = 1) -> None:
        """Add the row of one record."""
        new = [d for d in rec.energy_j if d not in self._known]
        if new:
            self.domains = sorted(set(self.domains) | set(new))
            self._known.update(new)
        if self._path is None:
            fd, self._path = tempfile.mkstemp(prefix="wattlog-trace-", suffix=".csv")
            self._file = os.fdopen(fd, "w+", newline="")
            self._writer = csv.writer(self._file)
            self._file_domains = list(self.domains)
        elif new:  # a late domain: a new trailing column (earlier rows are padded with 0 on write-out)
            self._file_domains += [d for d in new if d not in self._file_domains]
        self._reopen()
        row = _trace_row(rec, attempt, self._file_domains)
        self._writer.writerow(row.values())
        if self._bin is not None and self._bin["stage"] != row["stage"]:
            self._close_bin()  # a bin holds one stage: the chart never smears val energy into train
        self._bin = row if self._bin is None else _merge_rows(self._bin, row)
        self._bin_rows += 1
        if self._bin_rows >= self._stride:
            self._close_bin()
        self.rows += 1

    def _close_bin(self) -> None:
        assert self._bin is not None
        self._plot.append(self._bin)
        self._bin, self._bin_rows = None, 0
        if len(self._plot) > self.max_plot_rows:
            halved = _halve(self._plot, across_stages=False)
            # stages alternating faster than the bins: merge across them too, so memory stays bounded
            self._plot = halved if len(halved) <= 0.75 * self.max_plot_rows else _halve(self._plot, True)
            self._stride *= 2

    def _reopen(self) -> None:
        if self._file is None and self._path is not None:
            self._file = open(self._path, "a+", newline="")  # noqa: SIM115 - closed by suspend()/close()
            self._writer = csv.writer(self._file)

    def suspend(self) -> None:
        """Close the file until the next row or read (its rows are kept)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _columns(self) -> list[str]:
        return [*TRACE_FIELDS, "total_j", "power_w", *(f"{d}_j" for d in self._file_domains)]

    def write_csv(self, path: str) -> int:
        """Write ``energy/trace.csv`` (header + every row) to ``path``; returns the number of rows."""
        cols = self._columns()
        with open(path, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(cols)
            self._reopen()
            if self._file is not None:
                self._file.flush()
                self._file.seek(0)
                for line in csv.reader(self._file):
                    writer.writerow(line + [0.0] * (len(cols) - len(line)) if len(line) < len(cols) else line)
                self._file.seek(0, 2)
        return self.rows

    def plot_rows(self) -> list[dict[str, object]]:
        """At most ``max_plot_rows`` (+1) contiguous rows or bins of rows, in time order (for the power chart)."""
        return self._plot + ([self._bin] if self._bin is not None else [])

    def all_rows(self) -> list[dict[str, object]]:
        """Every row as a dict (reads the file back: memory grows with the run; for small runs)."""
        cols = self._columns()
        self._reopen()
        if self._file is None:
            return []
        self._file.flush()
        self._file.seek(0)
        rows = []
        for line in csv.reader(self._file):
            row: dict[str, object] = {}
            for k, v in itertools.zip_longest(cols, line, fillvalue="0.0"):
                row[k] = v if k == "stage" else (int(v) if k in ("step", "attempt", "samples") else float(v))
            rows.append(row)
        self._file.seek(0, 2)
        return rows

    def close(self) -> None:
        """Delete the temporary file."""
        self.suspend()
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            self._path = None


def _halve(rows: list[dict[str, object]], across_stages: bool) -> list[dict[str, object]]:
    """Merge consecutive pairs of rows; of the same stage only unless ``across_stages``."""
    out: list[dict[str, object]] = []
    i = 0
    while i < len(rows):
        if i + 1 < len(rows) and (across_stages or rows[i]["stage"] == rows[i + 1]["stage"]):
            out.append(_merge_rows(rows[i], rows[i + 1]))
            i += 2
        else:
            out.append(rows[i])
            i += 1
    return out


def _merge_rows(a: dict[str, object], b: dict[str, object]) -> dict[str, object]:
    """Two consecutive trace rows as one: joules, samples and durations summed; the longer one's stage."""
    out = dict(a)
    if float(b["duration_s"]) > float(a["duration_s"]):  # type: ignore[arg-type]
        out["stage"] = b["stage"]
    for k, v in b.items():
        if k.endswith("_j") or k in ("duration_s", "samples"):
            out[k] = out.get(k, 0.0) + v  # type: ignore[operator]
        elif k not in out:
            out[k] = v
    out["t_end_s"], out["step"], out["attempt"] = b["t_end_s"], b["step"], b["attempt"]
    duration_s = float(out["duration_s"])  # type: ignore[arg-type]
    out["power_w"] = float(out["total_j"]) / duration_s if duration_s > 0 else 0.0  # type: ignore[arg-type]
    return out


def _trace_row(r: StepRecord, attempt: int, domains: list[str]) -> dict[str, object]:
    """A trace row, keys in column order: ``TRACE_FIELDS``, ``total_j``, ``power_w``, ``<domain>_j``."""
    row: dict[str, object] = {
        "stage": r.stage, "step": r.step, "attempt": attempt, "t_start_s": r.start_s, "t_end_s": r.end_s,
        "duration_s": r.duration_s, "samples": r.samples, "total_j": r.total_j,
        "power_w": r.total_j / r.duration_s if r.duration_s > 0 else 0.0,
    }
    for d in domains:
        row[f"{d}_j"] = r.energy_j.get(d, 0.0)
    return row


class EnergyLedger:
    """Running totals across ranks and the per-step metrics of the key contract.

    Args:
        domain_kinds: kind (``gpu``/``cpu``/``ram``) of every domain name, as prefixed by rank.
        world_size: how many ranks contribute to each step.
        intensity_g_per_kwh, pue: for ``energy/emissions_g``.
        per_device: also produce ``energy/gpu{i}_power_w``; ``gpu_order`` gives the domain of
            global GPU index i.
    """

    def __init__(
        self,
        domain_kinds: dict[str, str],
        intensity_g_per_kwh: float,
        pue: float = 1.0,
        world_size: int = 1,
        per_device: bool = False,
        gpu_order: list[str] | None = None,
    ) -> None:
        self.domain_kinds = dict(domain_kinds)
        self.intensity_g_per_kwh = intensity_g_per_kwh
        self.pue = pue
        self.world_size = world_size
        self.per_device = per_device
        self.gpu_order = list(gpu_order or [d for d, k in domain_kinds.items() if k == "gpu"])
        self.state = LedgerState()
        self.trace = TraceLog(domain_kinds)
        self.suppress_through_step = -1  # train steps <= this were logged by an earlier attempt
        self._pending: dict[tuple[str, int], StepRecord] = {}

    # -- merging -----------------------------------------------------------------------------

    def add(self, records: Iterable[StepRecord]) -> list[tuple[int, dict[str, float]]]:
        """Add records from any rank; return ``(step, metrics)`` for each completed train step."""
        points: list[tuple[int, dict[str, float]]] = []
        for rec in records:
            if self.world_size > 1 and rec.stage != "other":  # "other" stretches need no merging
                key = (rec.stage, rec.step)
                merged = self._pending.get(key)
                if merged is None:
                    self._pending[key] = StepRecord(rec.stage, rec.step, rec.start_s, rec.end_s,
                                                    dict(rec.energy_j), rec.samples, rec.ranks, rec.wall_s)
                    merged = self._pending[key]
                else:
                    if rec.wall_s > 0:  # rank 0's record carries the clock
                        merged.start_s, merged.end_s = rec.start_s, rec.end_s
                    merged.wall_s += rec.wall_s
                    merged.samples += rec.samples
                    merged.ranks += rec.ranks
                    for k, v in rec.energy_j.items():
                        merged.energy_j[k] = merged.energy_j.get(k, 0.0) + v
                if merged.ranks < self.world_size:
                    continue
                del self._pending[key]
                rec = merged
            point = self._account(rec)
            if point is not None:
                points.append(point)
        return points

    def flush_pending(self) -> list[tuple[int, dict[str, float]]]:
        """Account steps that not every rank reported (end of a stage, or a rank failed)."""
        pending = sorted(self._pending.values(), key=lambda r: r.end_s)
        self._pending.clear()
        points = []
        for rec in pending:
            point = self._account(rec)
            if point is not None:
                points.append(point)
        return points

    def _account(self, rec: StepRecord) -> tuple[int, dict[str, float]] | None:
        s = self.state
        total_j = rec.total_j
        s.total_j += total_j
        for name, joules in rec.energy_j.items():
            kind = self.domain_kinds.get(name, "other")
            s.kind_j[kind] = s.kind_j.get(kind, 0.0) + joules
        if rec.stage in STAGES:
            s.stage_j[rec.stage] = s.stage_j.get(rec.stage, 0.0) + total_j
            s.stage_samples[rec.stage] = s.stage_samples.get(rec.stage, 0) + rec.samples
            s.stage_duration_s[rec.stage] = s.stage_duration_s.get(rec.stage, 0.0) + rec.duration_s
        s.duration_s += rec.wall_s
        self.trace.append(rec, self.attempt)
        if rec.stage != "train" or rec.step <= self.suppress_through_step:
            return None
        return rec.step, self.step_metrics(rec)

    def step_metrics(self, rec: StepRecord) -> dict[str, float]:
        """The per-step contract keys for one train step (cumulative keys use current totals)."""
        duration_s = rec.duration_s
        metrics = {
            keys.STEP_J: rec.total_j,
            keys.POWER_W: rec.total_j / duration_s if duration_s > 0 else 0.0,
            keys.TOTAL_J: self.state.total_j,
            keys.EMISSIONS_G: self.emissions_g,
        }
        if self.gpu_order:  # GPU keys only when a GPU is measured
            gpu_j = sum(v for k, v in rec.energy_j.items() if self.domain_kinds.get(k) == "gpu")
            metrics[keys.GPU_POWER_W] = gpu_j / duration_s if duration_s > 0 else 0.0
        if self.per_device:
            for i, name in enumerate(self.gpu_order):
                joules = rec.energy_j.get(name, 0.0)
                metrics[keys.gpu_device_power_w(i)] = joules / duration_s if duration_s > 0 else 0.0
        return metrics

    # -- totals ------------------------------------------------------------------------------

    @property
    def total_kwh(self) -> float:
        return self.state.total_j / J_PER_KWH

    @property
    def emissions_g(self) -> float:
        return emissions_g(self.total_kwh, self.intensity_g_per_kwh, self.pue)

    def observe_metric(self, value: float, target: float, mode: str) -> bool:
        """Record ``energy/j_to_target`` the first time ``value`` reaches ``target``."""
        if self.state.j_to_target is not None or value is None or not math.isfinite(value):
            return False
        reached = value >= target if mode == "max" else value <= target
        if reached:
            self.state.j_to_target = self.state.total_j
        return reached

    def summary(self) -> dict[str, float]:
        """Summary metrics: totals by measured kind and by stage that ran, J/sample, power, duration.

        Keys: ``energy/{gpu,cpu,ram}_j`` (measured kinds only), ``energy/{train,val,test,predict}_j``
        (stages that ran), ``energy/j_per_sample`` (train), ``energy/{val,test,predict}_j_per_sample``,
        ``energy/avg_power_w``, ``energy/duration_s``, ``energy/total_j``, ``energy/emissions_g``;
        once reached ``energy/j_to_target``; after a resume ``energy/rerun_j``.
        """
        s = self.state
        measured = set(self.domain_kinds.values())
        out: dict[str, float] = {keys.kind_j(k): s.kind_j.get(k, 0.0) for k in keys.KINDS if k in measured}
        for st in STAGES:
            if st in s.stage_j:
                out[keys.stage_j(st)] = s.stage_j[st]
                if s.stage_samples.get(st):
                    out[keys.stage_j_per_sample(st)] = s.stage_j[st] / s.stage_samples[st]
        out[keys.DURATION_S] = s.duration_s
        out[keys.AVG_POWER_W] = s.total_j / s.duration_s if s.duration_s > 0 else 0.0
        out[keys.TOTAL_J] = s.total_j
        out[keys.EMISSIONS_G] = self.emissions_g
        if s.j_to_target is not None:
            out[keys.J_TO_TARGET] = s.j_to_target
        if len(s.attempts) > 1 or s.rerun_j > 0:
            out[keys.RERUN_J] = s.rerun_j
        return out

    # -- run attempts ------------------------------------------------------------------------

    @property
    def attempt(self) -> int:
        """Number of the current attempt (1 for a run never resumed; 0 before ``begin_attempt``)."""
        return len(self.state.attempts)

    def begin_attempt(self, attempt_id: str, start_step: int) -> int:
        """Start an attempt at ``start_step`` (the checkpoint's global step, 0 if none); returns its number."""
        self.state.attempts.append({"id": attempt_id, "start_step": int(start_step)})
        return self.attempt

    def reconcile_rerun(self, total_j_by_step: dict[int, float], start_step: int) -> tuple[int, float]:
        """Account what the previous attempt logged after the checkpoint this attempt resumed from.

        The previous attempt (killed) logged ``energy/total_j`` at steps after ``start_step``;
        those steps are re-run now. Policy: the per-step history keeps the *first* value logged for a
        step (MLflow cannot delete points, and the killed attempt's points may already be delivered),
        so this attempt does not log per-step keys for steps up to the previous attempt's last logged
        step (:attr:`suppress_through_step`); its energy for them still counts in the totals. The
        energy the killed attempt spent after the checkpoint, as far as it logged it, was spent for
        nothing: it is reported as ``energy/rerun_j`` and stays in ``energy/total_j`` (energy spent
        is spent; and the run's cumulative keys never decrease across attempts).

        Args:
            total_j_by_step: every ``energy/total_j`` value earlier attempts logged, by step.
            start_step: the first step this attempt logs (steps before it came from the checkpoint).

        Returns:
            (last step the previous attempt logged, wasted joules); ``(start_step, 0.0)`` if none.
        """
        logged = {s: v for s, v in total_j_by_step.items() if math.isfinite(v)}
        if not logged:
            return start_step, 0.0
        last = max([s for s in logged if s >= start_step], default=start_step - 1)
        wasted_j = max(0.0, max(logged.values()) - self.state.total_j)  # the highest total any attempt logged
        self.state.rerun_j += wasted_j
        self.state.total_j += wasted_j
        if last >= start_step:
            self.suppress_through_step = max(self.suppress_through_step, last)
        if self.state.attempts:
            self.state.attempts[-1].update({"rerun_through_step": last, "rerun_j": wasted_j})
        return last, wasted_j

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        s = self.state
        return {
            "version": 3, "total_j": s.total_j, "kind_j": dict(s.kind_j), "stage_j": dict(s.stage_j),
            "stage_samples": dict(s.stage_samples), "stage_duration_s": dict(s.stage_duration_s),
            "duration_s": s.duration_s, "j_to_target": s.j_to_target,
            "attempts": [dict(a) for a in s.attempts], "rerun_j": s.rerun_j,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Continue the totals of ``state`` (version 2 checkpoints stored the target energy in kWh)."""
        j_to_target = state.get("j_to_target")
        if j_to_target is None and state.get("kwh_to_target") is not None:
            j_to_target = float(state["kwh_to_target"]) * J_PER_KWH  # type: ignore[arg-type]
        self.state = LedgerState(
            total_j=float(state.get("total_j", 0.0)),  # type: ignore[arg-type]
            kind_j=dict(state.get("kind_j", {})),  # type: ignore[arg-type]
            stage_j=dict(state.get("stage_j", {})),  # type: ignore[arg-type]
            stage_samples=dict(state.get("stage_samples", {})),  # type: ignore[arg-type]
            stage_duration_s=dict(state.get("stage_duration_s", {})),  # type: ignore[arg-type]
            duration_s=float(state.get("duration_s", 0.0)),  # type: ignore[arg-type]
            j_to_target=j_to_target,  # type: ignore[arg-type]
            attempts=[dict(a) for a in state.get("attempts", [])],  # type: ignore[union-attr]
            rerun_j=float(state.get("rerun_j", 0.0)),  # type: ignore[arg-type]
        )

    # -- trace artifact ----------------------------------------------------------------------

    def trace_rows(self) -> list[dict[str, object]]:
        """Every row of ``energy/trace.csv`` (joules per domain as ``<domain>_j``), read back from its file."""
        return self.trace.all_rows()
