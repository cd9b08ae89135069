"""The arithmetic of per-step energy: framework-free, so the Lightning callback is only wiring.

Flow: the meter yields :class:`~wattlog.meter.Segment` objects labelled with a :class:`StepLabel`;
:class:`StepAggregator` (one per process) merges consecutive segments of the same step into a
:class:`StepRecord`; :class:`EnergyLedger` (on the writing process) merges the records of every
rank, keeps the running totals and turns each training step into the contract's metrics:

``energy/step_j``, ``energy/power_w``, ``energy/gpu_power_w``, ``energy/total_kwh``,
``energy/emissions_g`` and, with ``per_device``, ``energy/gpu{i}_power_w``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from wattlog.meter import Segment
from wattlog.units import J_PER_KWH, emissions_g

STAGES = ("train", "val", "test", "predict")


@dataclass
class StepLabel:
    """What a boundary starts: a step of a stage (``step`` may be filled in when the step ends)."""

    stage: str
    step: int | None = None
    samples: int = 0


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
    """

    def __init__(self, domain_prefix: str = "", rank: int = 0) -> None:
        self._prefix = domain_prefix
        self._rank = rank
        self._current: StepRecord | None = None

    def add(self, segments: Iterable[Segment]) -> list[StepRecord]:
        done: list[StepRecord] = []
        for seg in segments:
            label = seg.label
            if isinstance(label, StepLabel):
                stage, step, samples = label.stage, label.step if label.step is not None else -1, label.samples
            else:
                stage, step, samples = "other", -1, 0
            energy = {self._prefix + k: v for k, v in seg.energy_j.items()}
            cur = self._current
            wall_s = seg.duration_s if self._rank == 0 else 0.0
            if cur is not None and cur.stage == stage and cur.step == step:
                cur.end_s = seg.end_s
                cur.wall_s += wall_s
                cur.samples += samples
                for k, v in energy.items():
                    cur.energy_j[k] = cur.energy_j.get(k, 0.0) + v
                continue
            if cur is not None:
                done.append(cur)
            self._current = StepRecord(stage, step, seg.start_s, seg.end_s, energy, samples, 1, wall_s)
        return done

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
    kwh_to_target: float | None = None


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
        self.trace: list[StepRecord] = []
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
        self.trace.append(rec)
        if rec.stage != "train":
            return None
        return rec.step, self.step_metrics(rec)

    def step_metrics(self, rec: StepRecord) -> dict[str, float]:
        """The per-step contract keys for one train step (cumulative keys use current totals)."""
        duration_s = rec.duration_s
        gpu_j = sum(v for k, v in rec.energy_j.items() if self.domain_kinds.get(k) == "gpu")
        metrics = {
            "energy/step_j": rec.total_j,
            "energy/power_w": rec.total_j / duration_s if duration_s > 0 else 0.0,
            "energy/gpu_power_w": gpu_j / duration_s if duration_s > 0 else 0.0,
            "energy/total_kwh": self.total_kwh,
            "energy/emissions_g": self.emissions_g,
        }
        if self.per_device:
            for i, name in enumerate(self.gpu_order):
                joules = rec.energy_j.get(name, 0.0)
                metrics[f"energy/gpu{i}_power_w"] = joules / duration_s if duration_s > 0 else 0.0
        return metrics

    # -- totals ------------------------------------------------------------------------------

    @property
    def total_kwh(self) -> float:
        return self.state.total_j / J_PER_KWH

    @property
    def emissions_g(self) -> float:
        return emissions_g(self.total_kwh, self.intensity_g_per_kwh, self.pue)

    def observe_metric(self, value: float, target: float, mode: str) -> bool:
        """Record ``energy/kwh_to_target`` the first time ``value`` reaches ``target``."""
        if self.state.kwh_to_target is not None or value is None or not math.isfinite(value):
            return False
        reached = value >= target if mode == "max" else value <= target
        if reached:
            self.state.kwh_to_target = self.total_kwh
        return reached

    def summary(self, stage: str) -> dict[str, float]:
        """Summary metrics after a stage: totals by kind and stage, J/sample, power, duration.

        Keys: ``energy/{gpu,cpu,ram}_kwh``, ``energy/{train,val,test,predict}_kwh``,
        ``energy/j_per_sample`` (train), ``energy/{test,predict}_j_per_sample``,
        ``energy/avg_power_w``, ``energy/duration_s``, ``energy/total_kwh``,
        ``energy/emissions_g`` and, once reached, ``energy/kwh_to_target``.
        """
        s = self.state
        out: dict[str, float] = {f"energy/{k}_kwh": s.kind_j.get(k, 0.0) / J_PER_KWH for k in ("gpu", "cpu", "ram")}
        for st in STAGES:
            if st in s.stage_j:
                out[f"energy/{st}_kwh"] = s.stage_j[st] / J_PER_KWH
        for st, key in (("train", "energy/j_per_sample"), ("test", "energy/test_j_per_sample"),
                        ("predict", "energy/predict_j_per_sample"), ("val", "energy/val_j_per_sample")):
            if s.stage_samples.get(st):
                out[key] = s.stage_j.get(st, 0.0) / s.stage_samples[st]
        out["energy/duration_s"] = s.duration_s
        out["energy/avg_power_w"] = s.total_j / s.duration_s if s.duration_s > 0 else 0.0
        out["energy/total_kwh"] = self.total_kwh
        out["energy/emissions_g"] = self.emissions_g
        if s.kwh_to_target is not None:
            out["energy/kwh_to_target"] = s.kwh_to_target
        return out

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        s = self.state
        return {
            "version": 1, "total_j": s.total_j, "kind_j": dict(s.kind_j), "stage_j": dict(s.stage_j),
            "stage_samples": dict(s.stage_samples), "stage_duration_s": dict(s.stage_duration_s),
            "duration_s": s.duration_s, "kwh_to_target": s.kwh_to_target,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.state = LedgerState(
            total_j=float(state.get("total_j", 0.0)),  # type: ignore[arg-type]
            kind_j=dict(state.get("kind_j", {})),  # type: ignore[arg-type]
            stage_j=dict(state.get("stage_j", {})),  # type: ignore[arg-type]
            stage_samples=dict(state.get("stage_samples", {})),  # type: ignore[arg-type]
            stage_duration_s=dict(state.get("stage_duration_s", {})),  # type: ignore[arg-type]
            duration_s=float(state.get("duration_s", 0.0)),  # type: ignore[arg-type]
            kwh_to_target=state.get("kwh_to_target"),  # type: ignore[arg-type]
        )

    # -- trace artifact ----------------------------------------------------------------------

    def trace_rows(self) -> list[dict[str, object]]:
        """One row per record for ``energy/trace.csv`` (joules per domain as ``<domain>_j``)."""
        domains = sorted({k for r in self.trace for k in r.energy_j})
        rows = []
        for r in self.trace:
            row: dict[str, object] = {
                "stage": r.stage, "step": r.step, "t_start_s": r.start_s, "t_end_s": r.end_s,
                "duration_s": r.duration_s, "samples": r.samples,
            }
            for d in domains:
                row[f"{d}_j"] = r.energy_j.get(d, 0.0)
            row["total_j"] = r.total_j
            row["power_w"] = r.total_j / r.duration_s if r.duration_s > 0 else 0.0
            rows.append(row)
        return rows
