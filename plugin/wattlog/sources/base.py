"""The energy-source interface: every source reports cumulative joules per domain.

A source is constructed cheaply (no hardware access); ``start()`` opens the hardware and
returns the domains it measures; ``read()`` returns a :class:`Reading` of cumulative
joules since ``start()`` for each domain; ``close()`` releases the hardware.
Sources that only know power integrate it themselves between reads, so callers never
care whether a domain is a counter or an integral.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["gpu", "cpu", "ram"]


@dataclass(frozen=True)
class Domain:
    """One measured quantity.

    Attributes:
        name: unique within a meter, e.g. ``gpu0``, ``cpu0``, ``dram0``, ``ram``.
        kind: ``gpu``, ``cpu`` or ``ram``; summaries add domains by kind.
        method: how it is measured: ``counter`` (hardware energy counter), ``power``
            (integrated instant power), ``power_avg`` (integrated 1-s averaged power),
            ``rapl`` or ``estimate``.
        estimated: True for anything not read from a hardware sensor.
        index: the device index within its kind (NVML index for GPUs, package for RAPL).
        power_limit_w: upper bound on plausible power, if known (used to reject absurd deltas).
    """

    name: str
    kind: Kind
    method: str
    estimated: bool
    index: int = 0
    power_limit_w: float | None = None


@dataclass(frozen=True)
class Reading:
    """Cumulative energy of each domain since ``start()``, at one instant.

    Attributes:
        time_s: ``time.perf_counter()`` when the values were read.
        energy_j: cumulative joules per domain name; non-decreasing between reads.
        notes: anomalies the source corrected on this read (counter reset, capped jump);
            the meter turns each into an ``energy.degraded`` reason.
    """

    time_s: float
    energy_j: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


class EnergySource(ABC):
    """Base class of the hardware energy sources."""

    kind: Kind

    resolution_s: float = 0.0
    """The shortest time this source resolves (an estimate's update interval); 0: no coarser than the sampler."""

    sees_helper_processes: bool = False
    """Whether wattlog's own delivery and chart processes show up in this source's energy (a package
    power counter, a machine-wide estimate): a next stage then waits for the last stage's chart."""

    @abstractmethod
    def start(self) -> list[Domain]:
        """Open the hardware and return the domains this source measures.

        Raises:
            SourceUnavailable: the source cannot measure here; the message says why.
        """

    @abstractmethod
    def read(self) -> Reading:
        """Read cumulative joules per domain since ``start()``.

        Raises:
            SourceError: the hardware failed; the meter degrades this source.
        """

    def read_final(self) -> Reading:
        """The last reading before ``close()``; sources that update on a slower cadence force an update."""
        return self.read()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the hardware. Safe to call twice and after a failed start."""

    def provenance(self) -> dict[str, str]:
        """Facts about the hardware for params and tags (model, driver, limits). After start()."""
        return {}

    @staticmethod
    def now_s() -> float:
        """The clock every source and the meter share."""
        return time.perf_counter()


class PowerIntegrator:
    """Cumulative joules from power samples (trapezoidal rule) for sources without counters."""

    def __init__(self) -> None:
        self.energy_j = 0.0
        self._last_time_s: float | None = None
        self._last_power_w = 0.0

    def add(self, time_s: float, power_w: float) -> float:
        """Add a power sample taken at ``time_s``; return the cumulative energy in joules."""
        power_w = max(0.0, float(power_w))
        if self._last_time_s is not None and time_s > self._last_time_s:
            self.energy_j += 0.5 * (power_w + self._last_power_w) * (time_s - self._last_time_s)
        self._last_time_s = time_s
        self._last_power_w = power_w
        return self.energy_j
