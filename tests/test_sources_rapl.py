"""The RAPL source against a fake powercap tree (tests/fakes/powercap.py)."""

from __future__ import annotations

import errno
import os

import pytest

from fakes.powercap import make_powercap
from wattlog.errors import SourceError, SourceUnavailable
from wattlog.sources import rapl as rapl_mod
from wattlog.sources.rapl import Rapl


@pytest.fixture
def started():
    sources: list[Rapl] = []

    def _start(src: Rapl):
        sources.append(src)
        return src.start()

    yield _start
    for src in sources:
        src.close()


def test_packages_and_dram_counted_once_core_never(tmp_path, started):
    pc = make_powercap(tmp_path, packages=2, dram=True, core=True, nested_duplicate=True)
    src = Rapl(pc.root)
    domains = started(src)
    assert [(d.name, d.kind, d.method, d.estimated, d.index) for d in domains] == [
        ("cpu0", "cpu", "rapl", False, 0),
        ("dram0", "ram", "rapl", False, 0),
        ("cpu1", "cpu", "rapl", False, 1),
        ("dram1", "ram", "rapl", False, 1),
    ]
    pc.zones["cpu0"].advance_uj(1_500_000)
    pc.zones["dram0"].advance_uj(250_000)
    pc.zones["core0"].advance_uj(1_000_000)  # contained in cpu0: must not add
    pc.zones["cpu1"].advance_uj(2_000_001)
    reading = src.read()
    assert reading.energy_j == {"cpu0": 1.5, "dram0": 0.25, "cpu1": 2.000001, "dram1": 0.0}
    assert reading.notes == ()
    pc.zones["cpu0"].advance_uj(500_000)
    assert src.read().energy_j["cpu0"] == 2.0  # cumulative since start


def test_flat_layout_and_no_dram(tmp_path, started):
    pc = make_powercap(tmp_path, packages=1, nested_duplicate=False)
    src = Rapl(pc.root, include_dram=False)
    assert [d.name for d in started(src)] == ["cpu0"]
    pc.zones["cpu0"].advance_uj(3_000_000)
    pc.zones["dram0"].advance_uj(3_000_000)
    assert src.read().energy_j == {"cpu0": 3.0}
    assert src.provenance()["rapl_domains"] == "cpu0"
    assert "ram_method" not in src.provenance()


def test_flat_layout_finds_dram(tmp_path, started):
    pc = make_powercap(tmp_path, packages=1, nested_duplicate=False)
    src = Rapl(pc.root)
    assert [d.name for d in started(src)] == ["cpu0", "dram0"]


def test_wraparound(tmp_path, started):
    pc = make_powercap(tmp_path, packages=1, dram=False, max_energy_range_uj=1_000_000, initial_uj=999_000)
    src = Rapl(pc.root)
    started(src)
    pc.zones["cpu0"].advance_uj(1_500)  # raw 999_000 -> 500
    assert pc.zones["cpu0"].energy_uj == 500
    assert src.read().energy_j["cpu0"] == pytest.approx(0.0015, abs=1e-12)
    for _ in range(10):  # 3 more wraps in 10 reads
        pc.zones["cpu0"].advance_uj(300_000)
        reading = src.read()
    assert reading.energy_j["cpu0"] == pytest.approx(3.0015, abs=1e-12)
    assert reading.notes == ()


def test_counter_going_back_is_a_reset_not_a_huge_wrap(tmp_path, started):
    pc = make_powercap(tmp_path, packages=1, dram=False, max_energy_range_uj=10**9, initial_uj=100_000_000)
    src = Rapl(pc.root)
    started(src)
    pc.zones["cpu0"].advance_uj(2_000_000)
    assert src.read().energy_j["cpu0"] == 2.0
    pc.zones["cpu0"].set_uj(1_000)  # reset to ~0: a "wrap" would add ~898 J
    reading = src.read()
    assert reading.energy_j["cpu0"] == 2.0
    assert len(reading.notes) == 1 and "reset" in reading.notes[0]
    pc.zones["cpu0"].advance_uj(1_000_000)  # counting resumes from the new raw value
    assert src.read().energy_j["cpu0"] == 3.0


def test_psys_is_ignored(tmp_path, started):
    pc = make_powercap(tmp_path, packages=1, dram=False, psys=True)
    src = Rapl(pc.root)
    assert [d.name for d in started(src)] == ["cpu0"]
    pc.zones["psys"].advance_uj(9_000_000)
    pc.zones["cpu0"].advance_uj(1_000_000)
    assert src.read().energy_j == {"cpu0": 1.0}


def test_only_psys_is_unavailable(tmp_path):
    pc = make_powercap(tmp_path, packages=0, psys=True)
    with pytest.raises(SourceUnavailable, match="no RAPL package zone"):
        Rapl(pc.root).start()


def test_amd_rapl_control_type(tmp_path, started):
    pc = make_powercap(tmp_path, packages=1, dram=False, control="amd-rapl")
    src = Rapl(pc.root)
    assert [d.name for d in started(src)] == ["cpu0"]
    pc.zones["cpu0"].advance_uj(7)
    assert src.read().energy_j == {"cpu0": 7e-6}


def test_missing_root(tmp_path):
    src = Rapl(tmp_path / "nope")  # construction touches nothing
    with pytest.raises(SourceUnavailable, match="no RAPL powercap interface at"):
        src.start()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceUnavailable, match="no RAPL powercap interface at"):
        Rapl(empty).start()
    src.close()
    src.close()


def test_unreadable_energy_explains_the_fix(tmp_path, monkeypatch):
    # Tests run as root, so chmod 000 would not block reads: simulate the kernel >= 5.10 mode.
    pc = make_powercap(tmp_path, packages=2)
    opened: list[int] = []
    real_open = rapl_mod._open_counter

    def deny_second(path: str) -> int:
        if opened:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        opened.append(real_open(path))
        return opened[-1]

    monkeypatch.setattr(rapl_mod, "_open_counter", deny_second)
    with pytest.raises(SourceUnavailable) as info:
        Rapl(pc.root).start()
    with pytest.raises(OSError) as closed:  # the counter opened before the failure was released
        os.fstat(opened[0])
    assert closed.value.errno == errno.EBADF
    message = str(info.value)
    assert "energy_uj" in message and "chmod o+r" in message and "udev" in message and "root" in message


def test_read_error_mid_run_is_source_error(tmp_path, monkeypatch, started):
    pc = make_powercap(tmp_path, packages=1)
    src = Rapl(pc.root)
    started(src)

    def broken(fd: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(rapl_mod, "_read_uj", broken)
    with pytest.raises(SourceError, match="RAPL read"):
        src.read()


def test_provenance(tmp_path, started):
    pc = make_powercap(tmp_path, packages=2)
    src = Rapl(pc.root)
    started(src)
    prov = src.provenance()
    assert prov["cpu_method"] == "rapl"
    assert prov["cpu_model"]
    assert prov["rapl_domains"] == "cpu0,dram0,cpu1,dram1"
    assert prov["ram_method"] == "rapl"


def test_close_is_idempotent_and_restart_works(tmp_path):
    pc = make_powercap(tmp_path, packages=1, dram=False)
    src = Rapl(pc.root)
    src.start()
    pc.zones["cpu0"].advance_uj(1_000_000)
    src.close()
    src.close()
    src.start()  # counts from the new start
    pc.zones["cpu0"].advance_uj(2_000_000)
    assert src.read().energy_j == {"cpu0": 2.0}
    src.close()
