"""CPU package and DRAM energy from the Linux powercap RAPL interface.

Zones used:
* top-level zones ``intel-rapl:N`` (Intel, and AMD Zen with the ``intel-rapl`` driver) or
  ``amd-rapl:N`` named ``package-N`` (or ``package-N-die-M``) -> domain ``cpuN``
  (``cpuN_dieM``), kind ``cpu``;
* their sub-zones named ``dram`` -> domain ``dramN``, kind ``ram`` (with ``include_dram``).

Zones deliberately not used:
* ``core``, ``uncore`` and other sub-zones of a package: they are contained in the package
  and adding them would count energy twice;
* a top-level ``psys`` zone (platform / SoC energy): it contains the packages;
* ``intel-rapl-mmio:N``: the same package counter exposed a second time through MMIO.

The same zone appears as ``<root>/intel-rapl:0`` and ``<root>/intel-rapl/intel-rapl:0``; zones
are keyed by their id (the directory name), so each physical zone is counted once.

Counters wrap at ``max_energy_range_uj``; a read below the previous one is taken as one wrap.
A "wrap" of more than half the range between two reads is implausible at the sampler's
cadence (an Intel range of ~262 kJ is half-spent in minutes; AMD's ~4.3 kJ in seconds), so it
is treated as a counter reset: that interval counts 0 J and the reading carries a note.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from wattlog.errors import SourceError, SourceUnavailable
from wattlog.sources.base import Domain, EnergySource, Reading
from wattlog.sources.estimate import cpu_model_name

DEFAULT_ROOT = "/sys/class/powercap"
_CONTROL_TYPES = ("intel-rapl", "amd-rapl")
_TOP_ZONE = re.compile(r"(?:intel|amd)-rapl:(\d+)")
_PACKAGE = re.compile(r"package-(\d+)(?:-die-(\d+))?")
_PERMISSION_FIX = (
    "RAPL energy counters are readable only by root since Linux 5.10 (CVE-2020-8694). "
    "Fix: `sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl:*:*/energy_uj` (until reboot), or a udev rule such as "
    '`SUBSYSTEM=="powercap", ACTION=="add", RUN+="/bin/chmod o+r /sys%p/energy_uj"`, '
    "or run as root. Without it wattlog falls back to the CPU estimate."
)


def _open_counter(path: str) -> int:
    """Open an ``energy_uj`` file for repeated ``pread`` (tests patch this)."""
    return os.open(path, os.O_RDONLY)


def _read_uj(fd: int) -> int:
    """Current value of an open powercap counter, in microjoules."""
    return int(os.pread(fd, 32, 0))


def _read_text(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


@dataclass
class _Counter:
    name: str
    path: str
    fd: int
    max_uj: int
    last_uj: int
    total_uj: int = 0


def _zone_id_key(zone_id: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", zone_id))


class Rapl(EnergySource):
    """CPU package (``cpuN``) and DRAM (``dramN``) energy from powercap RAPL counters.

    Args:
        root: the powercap class directory.
        include_dram: also measure the packages' ``dram`` sub-zones (kind ``ram``).
    """

    kind = "cpu"
    sees_helper_processes = True  # package power: every process on the package

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, include_dram: bool = True) -> None:
        self._root = Path(root)
        self._include_dram = bool(include_dram)
        self._counters: list[_Counter] = []
        self._cpu_model = ""

    def _top_zones(self) -> dict[str, Path]:
        """Top-level zone id -> directory, each id once (flat entries win over nested ones)."""
        zones: dict[str, Path] = {}
        dirs = [self._root] + [self._root / c for c in _CONTROL_TYPES if (self._root / c).is_dir()]
        for base in dirs:
            for entry in sorted(os.listdir(base)):
                if _TOP_ZONE.fullmatch(entry) and entry not in zones and (base / entry).is_dir():
                    zones[entry] = base / entry
        return dict(sorted(zones.items(), key=lambda kv: _zone_id_key(kv[0])))

    def _sub_zones(self, zone_id: str, zone_dir: Path) -> dict[str, Path]:
        """Sub-zone id -> directory for ``zone_id`` (nested inside it, or flat under the root)."""
        pattern = re.compile(re.escape(zone_id) + r":\d+")
        subs: dict[str, Path] = {}
        for base in (zone_dir, self._root):
            for entry in sorted(os.listdir(base)):
                if pattern.fullmatch(entry) and entry not in subs and (base / entry).is_dir():
                    subs[entry] = base / entry
        return dict(sorted(subs.items(), key=lambda kv: _zone_id_key(kv[0])))

    def _discover(self) -> list[tuple[str, Domain, Path]]:
        """(domain name, domain, zone dir) for every package and DRAM zone to measure."""
        found: list[tuple[str, Domain, Path]] = []
        names: set[str] = set()
        for zone_id, zone_dir in self._top_zones().items():
            try:
                zone_name = _read_text(zone_dir / "name")
            except OSError:
                continue
            match = _PACKAGE.fullmatch(zone_name)
            if match is None:  # psys and anything unknown: see the module docstring
                continue
            package = int(match.group(1))
            suffix = f"_die{match.group(2)}" if match.group(2) is not None else ""
            cpu_name = f"cpu{package}{suffix}"
            if cpu_name in names:
                continue
            names.add(cpu_name)
            found.append((cpu_name, Domain(cpu_name, "cpu", "rapl", False, package), zone_dir))
            if not self._include_dram:
                continue
            for sub_dir in self._sub_zones(zone_id, zone_dir).values():
                try:
                    sub_name = _read_text(sub_dir / "name")
                except OSError:
                    continue
                dram_name = f"dram{package}{suffix}"
                if sub_name == "dram" and dram_name not in names:
                    names.add(dram_name)
                    found.append((dram_name, Domain(dram_name, "ram", "rapl", False, package), sub_dir))
        return found

    def start(self) -> list[Domain]:
        """Find the package and DRAM zones and open their counters.

        Raises:
            SourceUnavailable: no powercap RAPL interface, no package zone, or the counters are
                not readable (the message gives the permission fix).
        """
        self.close()
        if not self._root.is_dir() or not self._top_zones_safe():
            raise SourceUnavailable(
                f"no RAPL powercap interface at {self._root} (not Linux, no intel_rapl/amd "
                "powercap driver loaded, or a container without /sys/class/powercap)"
            )
        found = self._discover()
        if not found:
            raise SourceUnavailable(f"no RAPL package zone under {self._root}")
        counters: list[_Counter] = []
        try:
            for name, _domain, zone_dir in found:
                energy_path = str(zone_dir / "energy_uj")
                max_uj = int(_read_text(zone_dir / "max_energy_range_uj"))
                fd = _open_counter(energy_path)
                counters.append(_Counter(name, energy_path, fd, max_uj, 0))
                counters[-1].last_uj = _read_uj(fd)
        except PermissionError as exc:
            self._close_all(counters)
            raise SourceUnavailable(f"cannot read {exc.filename or 'energy_uj'}: {_PERMISSION_FIX}") from exc
        except (OSError, ValueError) as exc:
            self._close_all(counters)
            raise SourceUnavailable(f"RAPL counters under {self._root} are unusable: {exc}") from exc
        self._counters = counters
        self._cpu_model = cpu_model_name()
        return [domain for _name, domain, _dir in found]

    def _top_zones_safe(self) -> dict[str, Path]:
        try:
            return self._top_zones()
        except OSError:
            return {}

    def read(self) -> Reading:
        """Cumulative joules per domain since ``start()``.

        Raises:
            SourceError: a counter could not be read.
        """
        now_s = self.now_s()
        energy_j: dict[str, float] = {}
        notes: list[str] = []
        for c in self._counters:
            try:
                raw_uj = _read_uj(c.fd)
            except (OSError, ValueError) as exc:
                raise SourceError(f"RAPL read of {c.path} failed: {exc}") from exc
            delta_uj = raw_uj - c.last_uj
            if delta_uj < 0:
                delta_uj += c.max_uj
                if delta_uj < 0 or delta_uj > c.max_uj // 2:
                    notes.append(f"rapl {c.name}: counter went back from {c.last_uj} to {raw_uj} uJ (reset)")
                    delta_uj = 0
            c.total_uj += delta_uj
            c.last_uj = raw_uj
            energy_j[c.name] = c.total_uj / 1e6
        return Reading(now_s, energy_j, tuple(notes))

    @staticmethod
    def _close_all(counters: list[_Counter]) -> None:
        for c in counters:
            try:
                os.close(c.fd)
            except OSError:
                pass  # already closed; nothing else to release

    def close(self) -> None:
        """Close the counter files. Safe to call twice."""
        counters, self._counters = self._counters, []
        self._close_all(counters)

    def provenance(self) -> dict[str, str]:
        """``cpu_method=rapl``, ``cpu_model``, ``rapl_domains``; ``ram_method=rapl`` with DRAM."""
        names = [c.name for c in self._counters]
        prov = {"cpu_method": "rapl", "cpu_model": self._cpu_model, "rapl_domains": ",".join(names)}
        if any(n.startswith("dram") for n in names):
            prov["ram_method"] = "rapl"
        return prov
