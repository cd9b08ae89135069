"""A fake Linux powercap sysfs tree under ``tmp_path`` for the RAPL source.

Layout (as on a real machine, where ``/sys/class/powercap/intel-rapl:0`` is a symlink into
``/sys/devices/virtual/powercap/intel-rapl/intel-rapl:0``)::

    root/intel-rapl/enabled
    root/intel-rapl/intel-rapl:0/{name=package-0, energy_uj, max_energy_range_uj}
    root/intel-rapl/intel-rapl:0/intel-rapl:0:0/{name=dram, ...}
    root/intel-rapl/intel-rapl:0/intel-rapl:0:1/{name=core, ...}
    root/intel-rapl:0 -> intel-rapl/intel-rapl:0          (nested_duplicate=True)
    root/intel-rapl:0:0 -> intel-rapl/intel-rapl:0/intel-rapl:0:0
    root/intel-rapl:<packages> {name=psys}                 (psys=True)

With ``nested_duplicate=False`` the zones are plain directories directly under ``root``.

Usage::

    pc = make_powercap(tmp_path, packages=2)
    src = Rapl(pc.root)
    pc.zones["cpu0"].advance_uj(1_500_000)      # 1.5 J more on package 0
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

INTEL_MAX_ENERGY_RANGE_UJ = 262_143_328_850
"""A typical Intel package ``max_energy_range_uj`` (~262 kJ)."""


@dataclass
class FakeZone:
    """One powercap zone; ``energy_uj`` is written to its file at every change."""

    path: Path
    name: str
    max_energy_range_uj: int
    energy_uj: int = 0

    def set_uj(self, value_uj: int) -> None:
        """Set the raw counter (no wrap applied)."""
        self.energy_uj = int(value_uj)
        (self.path / "energy_uj").write_text(f"{self.energy_uj}\n")

    def advance_uj(self, delta_uj: int) -> None:
        """Add ``delta_uj``, wrapping at ``max_energy_range_uj`` like the hardware."""
        self.set_uj((self.energy_uj + int(delta_uj)) % self.max_energy_range_uj)


@dataclass
class FakePowercap:
    """The fake tree: ``root`` to pass to ``Rapl`` and zones by role (cpuN, dramN, coreN, psys)."""

    root: Path
    zones: dict[str, FakeZone] = field(default_factory=dict)


def _make_zone(path: Path, name: str, max_uj: int, initial_uj: int) -> FakeZone:
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (path / "enabled").write_text("1\n")
    zone = FakeZone(path, name, max_uj)
    zone.set_uj(initial_uj)
    return zone


def make_powercap(
    tmp_path: Path,
    packages: int = 2,
    dram: bool = True,
    core: bool = True,
    max_energy_range_uj: int = INTEL_MAX_ENERGY_RANGE_UJ,
    nested_duplicate: bool = True,
    psys: bool = False,
    control: str = "intel-rapl",
    initial_uj: int = 1_000_000_000,
) -> FakePowercap:
    """Build a fake ``/sys/class/powercap`` under ``tmp_path / "powercap"``.

    Args:
        packages: number of ``package-N`` zones.
        dram: add a ``dram`` sub-zone to each package.
        core: add a ``core`` sub-zone to each package (must never be counted).
        max_energy_range_uj: wrap point of every counter.
        nested_duplicate: real layout (zones nested under ``root/<control>`` plus top-level
            symlinks to them); False: plain zone directories directly under ``root``.
        psys: add a top-level ``psys`` zone after the packages (must never be counted).
        control: control type name, ``intel-rapl`` or ``amd-rapl``.
        initial_uj: initial raw value of every counter (real counters count since boot).
    """
    root = tmp_path / "powercap"
    root.mkdir()
    pc = FakePowercap(root)
    base = root / control if nested_duplicate else root
    if nested_duplicate:
        base.mkdir()
        (base / "enabled").write_text("1\n")
    top = [(f"package-{n}", f"cpu{n}") for n in range(packages)] + ([("psys", "psys")] if psys else [])
    for index, (zone_name, role) in enumerate(top):
        zone_id = f"{control}:{index}"
        zone = _make_zone(base / zone_id, zone_name, max_energy_range_uj, initial_uj)
        pc.zones[role] = zone
        if nested_duplicate:
            os.symlink(os.path.relpath(zone.path, root), root / zone_id)
        if role == "psys":
            continue
        subs = ([("dram", f"dram{index}")] if dram else []) + ([("core", f"core{index}")] if core else [])
        for sub_index, (sub_name, sub_role) in enumerate(subs):
            sub_id = f"{zone_id}:{sub_index}"
            sub_dir = (zone.path / sub_id) if nested_duplicate else (root / sub_id)
            sub = _make_zone(sub_dir, sub_name, max_energy_range_uj, initial_uj)
            pc.zones[sub_role] = sub
            if nested_duplicate:
                os.symlink(os.path.relpath(sub.path, root), root / sub_id)
    return pc
