"""Estimated CPU (TDP x utilisation) and RAM (W per GiB in use) sources."""

from __future__ import annotations

import time

import csv
import math
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from wattlog import units
from wattlog.errors import ConfigError, SourceError
from wattlog.sources import estimate
from wattlog.sources.estimate import (
    DEFAULT_TDP_W_PER_THREAD,
    EstimatedCpu,
    EstimatedRam,
    cpu_model_name,
    cpu_socket_count,
    lookup_tdp_w,
)

GIB = 2**30


@pytest.fixture(scope="module")
def cpu_table() -> dict[str, float]:
    """codecarbon's cpu_power.csv read independently: the ground truth for lookups."""
    path = estimate._codecarbon_data_file("data/hardware/cpu_power.csv")
    table: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                table.setdefault(row["Name"], float(row["TDP"]))
            except ValueError:  # the shipped file has a few malformed rows, e.g. TDP "27.29.5"
                continue
    return table


class Clock:
    """A settable stand-in for ``EnergySource.now_s``."""

    def __init__(self, t_s: float = 0.0) -> None:
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s


@pytest.mark.parametrize(
    ("model", "table_name"),
    [
        ("AMD EPYC 7763", "AMD EPYC 7763"),  # exact
        ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", "Intel Xeon Gold 6248"),
        ("AMD EPYC 7763 64-Core Processor", "AMD EPYC 7763"),
        ("Intel(R) Core(TM) i7-8700K CPU @ 3.70GHz", "Intel Core i7-8700K"),
        ("Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", "Intel Xeon E5-2680 v4"),
        ("Intel(R) Xeon(R) Platinum 8480+", "Intel Xeon Platinum 8480+"),
        ("12th Gen Intel(R) Core(TM) i7-12700H", "Intel Core i7-12700H"),  # token subset
        ("AMD Ryzen 9 5950X 16-Core Processor", "AMD Ryzen 9 5950X"),
    ],
)
def test_tdp_lookup_matches_table(model, table_name, cpu_table):
    assert lookup_tdp_w(model) == (cpu_table[table_name], table_name)


@pytest.mark.parametrize("model", ["AMD EPYC", "Intel(R) Xeon(R) CPU @ 2.20GHz", "Totally Unknown Chip", ""])
def test_tdp_lookup_no_match(model):
    assert lookup_tdp_w(model) is None


def test_tdp_default_fallback(monkeypatch):
    monkeypatch.setattr(estimate, "_logical_cpus", lambda: 6)
    src = EstimatedCpu(cpu_model="Totally Unknown Chip")
    [domain] = src.start()
    assert src.tdp_w == 6 * DEFAULT_TDP_W_PER_THREAD == 24.0
    assert domain == estimate.Domain("cpu", "cpu", "estimate", True, 0, 24.0)
    prov = src.provenance()
    assert prov == {
        "cpu_method": "estimate",
        "cpu_model": "Totally Unknown Chip",
        "cpu_tdp_w": "24",
        "cpu_tdp_source": "default:6 threads x 4 W",
        "cpu_scope": "system",
    }


def test_tdp_from_table_times_sockets(monkeypatch, cpu_table):
    monkeypatch.setattr(estimate, "cpu_socket_count", lambda: 2)
    src = EstimatedCpu(cpu_model="AMD EPYC 7763 64-Core Processor")
    src.start()
    assert src.tdp_w == 2 * cpu_table["AMD EPYC 7763"]
    assert src.provenance()["cpu_tdp_source"] == "codecarbon:cpu_power.csv:AMD EPYC 7763 x 2 sockets"


def test_user_tdp():
    src = EstimatedCpu(tdp_w=65)
    src.start()
    assert (src.tdp_w, src.provenance()["cpu_tdp_source"]) == (65.0, "user")


def test_cpu_integration_is_exact(monkeypatch):
    clock = Clock(100.0)
    src = EstimatedCpu(tdp_w=100.0, update_interval_s=0.5)
    monkeypatch.setattr(src, "now_s", clock)
    utilisations = iter([0.5, 1.0, 0.25, 0.4])
    monkeypatch.setattr(src, "_utilisation", lambda span_s: next(utilisations))
    src.start()
    expected = [  # (now, reading time, joules): each interval gets the utilisation measured over it
        (100.25, 100.0, 0.0),  # no update yet: the start's reading is repeated
        (100.5, 100.5, 25.0),  # 50 % of 100 W over the first 0.5 s: no warm-up hole
        (101.0, 101.0, 75.0),  # + 100 W x 0.5 s
        (103.0, 103.0, 125.0),  # + 25 W x 2 s
    ]
    for now_s, time_s, energy_j in expected:
        clock.t_s = now_s
        reading = src.read()
        assert reading.time_s == time_s
        assert reading.energy_j == {"cpu": pytest.approx(energy_j, abs=1e-12)}
    clock.t_s = 103.2  # shorter than the update interval: the final read still accounts it
    assert src.read_final().energy_j == {"cpu": pytest.approx(125.0 + 40.0 * 0.2)}


def test_stage_shorter_than_the_update_interval_gets_cpu_energy():
    from wattlog.meter import EnergyMeter

    meter = EnergyMeter([EstimatedCpu(tdp_w=100.0, scope="process", update_interval_s=0.5)], 0.02)
    meter.start()
    meter.mark("busy")
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:  # 0.3 s of busy CPU on this process
        sum(i * i for i in range(1000))
    segments = meter.close()
    busy_j = sum(s.energy_j["cpu"] for s in segments if s.label == "busy")
    assert busy_j > 0.0


Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")


def test_system_utilisation_from_cpu_times(monkeypatch):
    samples = iter(
        [
            Times(10, 0, 5, 100, 5, 0, 0, 0, 2, 0),
            # +30 busy (user includes +10 guest, which is not counted twice), +65 idle, +5 iowait
            Times(40, 0, 5, 165, 10, 0, 0, 0, 12, 0),
        ]
    )
    monkeypatch.setattr(psutil, "cpu_times", lambda: next(samples))
    clock = Clock(0.0)
    src = EstimatedCpu(tdp_w=200.0, update_interval_s=1.0)
    monkeypatch.setattr(src, "now_s", clock)
    src.start()
    clock.t_s = 1.0  # update: utilisation 30/100 over the first second -> 60 W x 1 s
    assert src.read().energy_j["cpu"] == pytest.approx(60.0)


PCpuTimes = namedtuple("PCpuTimes", "user system children_user children_system")


class FakeProc:
    def __init__(self, user_s: float, children: list[FakeProc] | None = None, rss: int = 0) -> None:
        self.user_s = user_s
        self.rss = rss
        self._children = children or []
        self.pid = -id(self)  # no real process has it

    def cpu_times(self):
        return PCpuTimes(self.user_s, 0.0, 0.0, 0.0)

    def children(self, recursive: bool = False):
        assert recursive
        return self._children

    def memory_info(self):
        return namedtuple("mem", "rss")(self.rss)


def test_process_utilisation_counts_children(monkeypatch):
    child = FakeProc(user_s=0.0)
    proc = FakeProc(user_s=0.0, children=[child])
    monkeypatch.setattr(psutil, "Process", lambda: proc)
    monkeypatch.setattr(estimate, "_logical_cpus", lambda: 4)
    clock = Clock(0.0)
    src = EstimatedCpu(tdp_w=100.0, scope="process", update_interval_s=0.5)
    monkeypatch.setattr(src, "now_s", clock)
    src.start()
    proc.user_s, child.user_s = 0.5, 1.5  # 2 CPU-s busy over 1 s x 4 CPUs = 50 %
    clock.t_s = 1.0
    src.read()
    clock.t_s = 2.0
    assert src.read().energy_j["cpu"] == pytest.approx(50.0)  # 50 W x 1 s
    assert src.provenance()["cpu_scope"] == "process"


def test_ram_estimate_is_exact(monkeypatch):
    used = iter([8 * GIB, 16 * GIB, 16 * GIB])
    monkeypatch.setattr(EstimatedRam, "_used_bytes", lambda self: next(used))
    clock = Clock(10.0)
    src = EstimatedRam(update_interval_s=1.0)
    monkeypatch.setattr(src, "now_s", clock)
    assert src.start() == [estimate.Domain("ram", "ram", "estimate", True, 0)]
    watts_8gib = units.RAM_W_PER_GB * 8  # 2.98 W, known from start()
    # no update before 1 s; then the trapezoid of the memory in use at both ends of each interval
    for t_s, energy_j in [(10.5, 0.0), (11.0, 1.5 * watts_8gib), (12.0, 3.5 * watts_8gib)]:
        clock.t_s = t_s
        assert src.read().energy_j == {"ram": pytest.approx(energy_j, abs=1e-12)}
    assert math.isclose(watts_8gib, 2.98)
    assert src.provenance() == {"ram_method": "estimate", "ram_scope": "process"}


def test_ram_system_scope_uses_total_minus_available(monkeypatch):
    vm = namedtuple("vm", "total available")(16 * GIB, 12 * GIB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm)
    clock = Clock(0.0)
    src = EstimatedRam(scope="system", update_interval_s=1.0)
    monkeypatch.setattr(src, "now_s", clock)
    src.start()
    clock.t_s = 2.0
    assert src.read().energy_j["ram"] == pytest.approx(2.0 * 4 * units.RAM_W_PER_GB)


def test_ram_process_scope_sums_children(monkeypatch):
    proc = FakeProc(0.0, children=[FakeProc(0.0, rss=1 * GIB)], rss=3 * GIB)
    monkeypatch.setattr(psutil, "Process", lambda: proc)
    clock = Clock(0.0)
    src = EstimatedRam(update_interval_s=5.0)
    monkeypatch.setattr(src, "now_s", clock)
    src.start()
    clock.t_s = 1.0  # before the 5 s update interval: the final read accounts it all the same
    assert src.read_final().energy_j["ram"] == pytest.approx(4 * units.RAM_W_PER_GB)


def test_real_psutil_smoke():
    cpu, ram = EstimatedCpu(update_interval_s=0.0), EstimatedRam(update_interval_s=0.0)
    cpu.start(), ram.start()
    sum(range(200_000))
    first = cpu.read().energy_j["cpu"], ram.read().energy_j["ram"]
    sum(range(200_000))
    second = cpu.read().energy_j["cpu"], ram.read().energy_j["ram"]
    assert all(b >= a >= 0.0 for a, b in zip(first, second))
    assert ram._power_w > 0  # this process has resident memory
    cpu.close(), ram.close()


def test_sampling_failure_is_source_error(monkeypatch):
    src = EstimatedCpu(tdp_w=10.0, update_interval_s=0.0)
    src.start()

    def fail(now_s: float) -> float:
        raise psutil.AccessDenied(pid=1)

    monkeypatch.setattr(src, "_utilisation", fail)
    with pytest.raises(SourceError, match="sampling failed"):
        src.read()


def test_read_before_start():
    with pytest.raises(SourceError, match="before start"):
        EstimatedRam().read()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scope": "node"}, "scope"),
        ({"tdp_w": 0}, "tdp_w"),
        ({"tdp_w": -5.0}, "tdp_w"),
        ({"tdp_w": float("nan")}, "tdp_w"),
        ({"tdp_w": True}, "tdp_w"),
        ({"tdp_w": "95"}, "tdp_w"),
        ({"update_interval_s": -1}, "update_interval_s"),
    ],
)
def test_cpu_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as info:
        EstimatedCpu(**kwargs)
    assert info.value.field == field


def test_ram_config_errors():
    with pytest.raises(ConfigError) as info:
        EstimatedRam(scope="gpu")
    assert info.value.field == "scope" and "'process'" in str(info.value)


def test_cpuinfo_parsing(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nphysical id\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz\n\n"
        "processor\t: 1\nphysical id\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz\n"
    )
    assert cpu_model_name(cpuinfo) == "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz"
    assert cpu_socket_count(cpuinfo) == 2
    assert cpu_socket_count(tmp_path / "missing") == 1
    assert cpu_model_name(tmp_path / "missing")  # platform fallback, never empty


def test_import_is_light():
    code = (
        "import sys, wattlog.sources.estimate, wattlog.sources.rapl, wattlog.carbon;"
        "heavy = {'torch', 'lightning', 'mlflow', 'hydra', 'pandas', 'matplotlib', 'codecarbon'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
