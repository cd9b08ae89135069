"""NvmlGpu against a fake pynvml: methods, device mapping, faults, MIG, lifecycle."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import types

import pytest
from fakes.nvml import ERR_DRIVER_NOT_LOADED, FakeFaults, FakeGpu, FakeNvml, ManualClock

from wattlog.errors import ConfigError, SourceError, SourceUnavailable
from wattlog.sources.nvml import NvmlGpu, list_gpus

TICK_S = 0.02


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def make(monkeypatch: pytest.MonkeyPatch, clock: ManualClock):
    """Install a FakeNvml on a manual clock; return (fake, source factory)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)

    def _make(gpus: list[FakeGpu], **fake_kw):
        fake = FakeNvml(gpus, clock=clock, **fake_kw).install(monkeypatch)

        def source(**kw) -> NvmlGpu:
            src = NvmlGpu(**kw)
            monkeypatch.setattr(src, "now_s", clock)  # the source and the fake share the clock
            return src

        return fake, source

    return _make


def run_reads(src: NvmlGpu, clock: ManualClock, duration_s: float, step_s: float = TICK_S):
    readings = []
    for _ in range(round(duration_s / step_s)):
        clock.advance(step_s)
        readings.append(src.read())
    return readings


def assert_monotonic(readings, name: str = "gpu0") -> None:
    values = [r.energy_j[name] for r in readings]
    assert all(b >= a for a, b in zip(values, values[1:])), values


# ---------------------------------------------------------------- import and construction


def test_import_and_construction_do_not_import_pynvml() -> None:
    code = (
        "import sys, wattlog.sources.nvml as m; m.NvmlGpu(); m.NvmlGpu(indices=[0], require_counter=True);"
        "bad = [x for x in ('pynvml', 'torch', 'lightning', 'mlflow', 'hydra') if x in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "kw",
    [
        {"indices": [-1]},
        {"indices": []},
        {"indices": "0"},
        {"cuda_devices": [0.5]},
        {"indices": [0], "cuda_devices": [0]},
    ],
)
def test_bad_selection_is_config_error_naming_gpus(kw) -> None:
    with pytest.raises(ConfigError) as info:
        NvmlGpu(**kw)
    assert info.value.field == "gpus"


def test_index_out_of_range_is_config_error(make) -> None:
    fake, source = make([FakeGpu(), FakeGpu()])
    src = source(indices=[0, 5])
    with pytest.raises(ConfigError) as info:
        src.start()
    assert info.value.field == "gpus" and "0..1" in str(info.value)
    assert fake.shutdown_calls == fake.init_calls == 1  # start cleaned up after itself
    src.close()
    assert fake.shutdown_calls == 1


# ---------------------------------------------------------------- methods


def test_counter_path_joules_since_start(make, clock) -> None:
    fake, source = make([FakeGpu(power_w=250.0, counter_offset_mj=987_654_321)])
    src = source()
    (domain,) = src.start()
    assert (domain.name, domain.kind, domain.method, domain.index) == ("gpu0", "gpu", "counter", 0)
    assert domain.power_limit_w == 400.0 and not domain.estimated
    clock.advance(1.0)
    reading = src.read()
    assert reading.time_s == clock()
    assert reading.energy_j["gpu0"] == pytest.approx(250.0, abs=2e-3)
    assert reading.notes == ()
    readings = run_reads(src, clock, 0.4)
    assert readings[-1].energy_j["gpu0"] == pytest.approx(250.0 * 1.4, abs=2e-3)
    # Lean reads: one NVML call per device per read, no power queries on the counter path.
    n_reads = 1 + len(readings)
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == n_reads + 2  # probe + start value
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 0
    prov = src.provenance()
    assert prov["gpu_method"] == "counter" and prov["gpu_count"] == "1"
    assert prov["gpu_model"] == "NVIDIA A100-SXM4-40GB"
    assert prov["driver_version"] == "550.54.15" and prov["gpu_power_limit_w"] == "400"
    assert prov["gpu_uuids"] == fake.gpus[0].uuid
    src.close()


def test_instant_power_path_on_manual_clock(make, clock) -> None:
    def power_w(t: float) -> float:
        return 220.0 + 90.0 * math.sin(2 * math.pi * t / 0.45) + 30.0 * t

    fake, source = make([FakeGpu(power_w=power_w, has_counter=False)])
    src = source()
    (domain,) = src.start()
    assert domain.method == "power"
    t_start = clock()
    readings = run_reads(src, clock, 2.0)
    truth = fake.true_energy_j(0, t_start, readings[-1].time_s)
    assert readings[-1].energy_j["gpu0"] == pytest.approx(truth, rel=0.01)
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 0
    assert src.provenance()["gpu_method"] == "power"
    src.close()


def test_instant_power_double_value_type(make, clock) -> None:
    _, source = make([FakeGpu(power_w=123.4, has_counter=False, instant_value_type=0)])
    src = source()
    src.start()
    readings = run_reads(src, clock, 0.5)
    assert readings[-1].energy_j["gpu0"] == pytest.approx(123.4 * 0.5, rel=1e-9)
    src.close()


def test_instant_power_accuracy_real_clock(monkeypatch) -> None:
    """Sampled every 20 ms on the real clock for 2 s; the integral is within 1% of the truth."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def power_w(t: float) -> float:
        return 250.0 + 120.0 * math.sin(2 * math.pi * t / 0.6) + 40.0 * math.cos(2 * math.pi * t / 0.17)

    fake = FakeNvml([FakeGpu(power_w=power_w, has_counter=False)]).install(monkeypatch)
    src = NvmlGpu()
    src.start()
    first = src.read()
    deadline = first.time_s + 2.0
    last = first
    while last.time_s < deadline:
        time.sleep(TICK_S)
        last = src.read()
    src.close()
    measured_j = last.energy_j["gpu0"] - first.energy_j["gpu0"]
    truth_j = fake.true_energy_j(0, first.time_s, last.time_s)
    assert measured_j == pytest.approx(truth_j, rel=0.01)


def test_averaged_power_fallback_is_labelled(make, clock) -> None:
    _, source = make([FakeGpu(power_w=150.0, has_counter=False, has_instant=False)])
    src = source()
    (domain,) = src.start()
    assert domain.method == "power_avg"
    readings = run_reads(src, clock, 0.4)
    assert readings[-1].energy_j["gpu0"] == pytest.approx(150.0 * 0.4, rel=1e-6)
    prov = src.provenance()
    assert prov["gpu_method"] == "power_avg"
    assert "averaged" in prov["gpu_method_detail"] and "nvmlDeviceGetPowerUsage" in prov["gpu_method_detail"]
    src.close()


def test_averaged_power_refused_when_disallowed(make) -> None:
    fake, source = make([FakeGpu(has_counter=False, has_instant=False)])
    with pytest.raises(SourceUnavailable, match="allow_averaged_power"):
        source(allow_averaged_power=False).start()
    assert fake.shutdown_calls == 1


def test_require_counter_fails_clearly(make) -> None:
    fake, source = make([FakeGpu(name="Tesla P100-PCIE-16GB", has_counter=False)])
    src = source(require_counter=True)
    with pytest.raises(SourceUnavailable) as info:
        src.start()
    message = str(info.value)
    assert "GPU 0" in message and "Tesla P100" in message and "Volta or newer" in message
    src.close()
    src.close()
    assert fake.shutdown_calls == 1


def test_instant_field_constant_missing(make, clock) -> None:
    fake, source = make([FakeGpu(power_w=80.0, has_counter=False)], field_constant=False)
    assert not hasattr(fake.module, "NVML_FI_DEV_POWER_INSTANT")
    src = source()
    assert src.start()[0].method == "power_avg"
    assert fake.calls["nvmlDeviceGetFieldValues"] == 0
    src.close()


def test_instant_field_unsupported_per_field_return(make) -> None:
    fake, source = make([FakeGpu(has_counter=False, has_instant=False), FakeGpu(has_counter=False)])
    src = source()
    assert [d.method for d in src.start()] == ["power_avg", "power"]
    assert fake.calls["nvmlDeviceGetFieldValues"] >= 2
    assert src.provenance()["gpu_method"] == "power_avg,power"
    src.close()


def test_mixed_gpus_provenance_and_unknown_limit(make, clock) -> None:
    _, source = make(
        [
            FakeGpu(name="NVIDIA H100 80GB HBM3", power_w=300.0, power_limit_w=700.0),
            FakeGpu(name="NVIDIA A100-SXM4-40GB", power_w=100.0, has_counter=False, power_limit_w=None),
        ]
    )
    src = source()
    domains = src.start()
    assert [d.name for d in domains] == ["gpu0", "gpu1"]
    assert [d.power_limit_w for d in domains] == [700.0, None]
    readings = run_reads(src, clock, 0.2)
    assert readings[-1].energy_j == pytest.approx({"gpu0": 60.0, "gpu1": 20.0}, abs=2e-3)
    prov = src.provenance()
    assert prov["gpu_model"] == "NVIDIA H100 80GB HBM3,NVIDIA A100-SXM4-40GB"
    assert prov["gpu_method"] == "counter,power" and prov["gpu_count"] == "2"
    assert prov["gpu_power_limit_w"] == "700,unknown"
    src.close()


def test_explicit_indices_measure_only_those(make, clock) -> None:
    _, source = make([FakeGpu(power_w=100.0), FakeGpu(power_w=200.0), FakeGpu(power_w=300.0)])
    src = source(indices=[2, 0])
    assert [d.name for d in src.start()] == ["gpu2", "gpu0"]
    clock.advance(0.5)
    assert src.read().energy_j == pytest.approx({"gpu2": 150.0, "gpu0": 50.0}, abs=2e-3)
    src.close()


# ---------------------------------------------------------------- faults


def test_gpu_lost_mid_run_raises_source_error(make, clock) -> None:
    fake, source = make([FakeGpu(faults=FakeFaults(lost_after_s=0.3))])
    src = source()
    src.start()
    run_reads(src, clock, 0.2)
    clock.advance(0.2)
    with pytest.raises(SourceError, match=r"gpu0: GPU is lost"):
        src.read()
    src.close()
    assert fake.shutdown_calls == 1


def test_gpu_lost_on_power_path(make, clock) -> None:
    fake, source = make([FakeGpu(has_counter=False)])
    src = source()
    src.start()
    fake.gpus[0].faults.lost_after_s = fake.elapsed_s()  # set while running
    clock.advance(TICK_S)
    with pytest.raises(SourceError, match="gpu0"):
        src.read()
    src.close()


@pytest.mark.parametrize("has_counter", [True, False])
def test_intermittent_unknown_is_retried(make, clock, has_counter) -> None:
    fake, source = make([FakeGpu(power_w=200.0, has_counter=has_counter)])
    src = source()
    src.start()
    fake.gpus[0].faults.unknown_every_n = 3
    readings = run_reads(src, clock, 0.3)
    assert readings[-1].energy_j["gpu0"] == pytest.approx(60.0, abs=2e-3)
    assert_monotonic(readings)


def test_persistent_unknown_raises_after_one_retry(make, clock) -> None:
    fake, source = make([FakeGpu()])
    src = source()
    src.start()
    fake.gpus[0].faults.unknown_every_n = 1
    before = fake.calls["nvmlDeviceGetTotalEnergyConsumption"]
    clock.advance(TICK_S)
    with pytest.raises(SourceError, match=r"gpu0: NVML error: Unknown Error"):
        src.read()
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] - before == 2
    src.close()


def test_counter_reset_never_negative_and_noted(make, clock) -> None:
    fake, source = make([FakeGpu(power_w=250.0, faults=FakeFaults(reset_at_s=0.25))])
    src = source()
    t_start = clock()
    src.start()
    readings = run_reads(src, clock, 0.5)
    assert_monotonic(readings)
    notes = [n for r in readings for n in r.notes]
    assert notes == ["gpu0: counter went backwards (reset?)"]
    truth = fake.true_energy_j(0, t_start, readings[-1].time_s)
    # Only the energy between the last read before the reset and the reset itself is lost.
    assert truth - 250.0 * TICK_S - 1e-3 <= readings[-1].energy_j["gpu0"] <= truth + 1e-3


def test_counter_backwards_jump_is_capped(make, clock) -> None:
    faults = FakeFaults(backwards_at_s=0.2, backwards_mj=50_000_000)
    fake, source = make([FakeGpu(power_w=250.0, faults=faults)])
    src = source()
    src.start()
    readings = run_reads(src, clock, 0.4)
    assert_monotonic(readings)
    notes = [n for r in readings for n in r.notes]
    assert notes == ["gpu0: counter went backwards (reset?)", "gpu0: energy jump above power limit capped"]
    jump = [r for r in readings if r.notes][0]
    before = readings[readings.index(jump) - 1]
    step_j = jump.energy_j["gpu0"] - before.energy_j["gpu0"]
    assert 0.0 <= step_j <= 400.0 * 1.2 * (2 * TICK_S + 0.1) + 1e-6
    assert readings[-1].energy_j["gpu0"] <= 250.0 * 0.4 + 400.0 * 1.2 * (2 * TICK_S + 0.1) + 1e-3  # not 73 kJ


def test_counter_forward_jump_is_capped(make, clock) -> None:
    fake, source = make([FakeGpu(power_w=100.0, faults=FakeFaults(jump_at_s=0.1, jump_mj=10_000_000))])
    src = source()
    src.start()
    readings = run_reads(src, clock, 0.3)
    assert [n for r in readings for n in r.notes] == ["gpu0: energy jump above power limit capped"]
    assert readings[-1].energy_j["gpu0"] <= 100.0 * 0.3 + 400.0 * 1.2 * (2 * TICK_S + 0.1) + 1e-6


def test_stuck_counter_is_not_an_error_and_catches_up(make, clock) -> None:
    fake, source = make([FakeGpu(power_w=300.0, faults=FakeFaults(stuck_after_s=0.1))])
    src = source()
    src.start()
    readings = run_reads(src, clock, 0.4)
    assert readings[-1].energy_j["gpu0"] == pytest.approx(30.0, abs=2e-3)
    fake.gpus[0].faults.stuck_after_s = None  # the driver updates again: the backlog is plausible
    readings += run_reads(src, clock, 0.1)
    assert not any(r.notes for r in readings)
    assert readings[-1].energy_j["gpu0"] == pytest.approx(300.0 * 0.5, abs=2e-3)
    src.close()


# ---------------------------------------------------------------- MIG


def test_mig_id_in_cuda_visible_devices(make, monkeypatch) -> None:
    fake, source = make([FakeGpu(mig=True)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", fake.gpus[0].mig_uuids[0])
    with pytest.raises(SourceUnavailable) as info:
        source(cuda_devices=[0]).start()
    message = str(info.value)
    assert "MIG slice" in message and "will not invent" in message and "NVML index" in message
    assert fake.shutdown_calls == fake.init_calls == 1


def test_gpu_in_mig_mode_refused_by_default(make) -> None:
    _, source = make([FakeGpu(mig=True)])
    with pytest.raises(SourceUnavailable, match="MIG"):
        source().start()


def test_gpu_in_mig_mode_measured_whole_by_nvml_index(make, clock) -> None:
    _, source = make([FakeGpu(power_w=200.0, mig=True)])
    src = source(indices=[0])
    assert src.start()[0].method == "counter"
    clock.advance(0.1)
    assert src.read().energy_j["gpu0"] == pytest.approx(20.0, abs=2e-3)
    assert "whole GPU" in src.provenance()["gpu_method_detail"]
    src.close()


def test_mig_device_seen_through_torch(make, monkeypatch) -> None:
    fake, source = make([FakeGpu(mig=True)])
    mig_uuid = fake.gpus[0].mig_uuids[1].removeprefix("MIG-")
    monkeypatch.setitem(sys.modules, "torch", _fake_torch([mig_uuid]))
    with pytest.raises(SourceUnavailable, match="MIG"):
        source(cuda_devices=[0]).start()


# ---------------------------------------------------------------- CUDA -> NVML mapping


def _fake_torch(uuids: list[str]) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(
        is_initialized=lambda: True,
        get_device_properties=lambda k: types.SimpleNamespace(uuid=uuids[k]),
    )
    return torch


def test_cuda_visible_devices_integers_map_by_uuid(make, monkeypatch) -> None:
    fake, source = make([FakeGpu(), FakeGpu(), FakeGpu()])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    src = source(cuda_devices=[0])
    assert [d.name for d in src.start()] == ["gpu2"]
    assert fake.calls["nvmlDeviceGetHandleByUUID"] >= 1
    assert src.provenance()["gpu_uuids"] == fake.gpus[2].uuid
    src.close()
    src = source(cuda_devices=[1, 0])
    assert [d.name for d in src.start()] == ["gpu0", "gpu2"]
    src.close()


def test_cuda_visible_devices_uuid_and_prefix(make, monkeypatch) -> None:
    fake, source = make([FakeGpu(), FakeGpu(), FakeGpu()])
    uuids = [g.uuid for g in fake.gpus]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{uuids[1]},{uuids[2][:12]}")
    src = source(cuda_devices=[0, 1])
    assert [d.name for d in src.start()] == ["gpu1", "gpu2"]
    src.close()


def test_cuda_visible_devices_unknown_uuid_is_config_error(make, monkeypatch) -> None:
    _, source = make([FakeGpu()])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-deadbeef")
    with pytest.raises(ConfigError) as info:
        source(cuda_devices=[0]).start()
    assert info.value.field == "CUDA_VISIBLE_DEVICES"


def test_cuda_ordinal_beyond_visible_is_config_error(make, monkeypatch) -> None:
    _, source = make([FakeGpu(), FakeGpu()])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(ConfigError) as info:
        source(cuda_devices=[1]).start()
    assert info.value.field == "gpus"


def test_cuda_devices_without_visible_devices_is_identity(make) -> None:
    _, source = make([FakeGpu(), FakeGpu()])
    src = source(cuda_devices=[1])
    assert [d.name for d in src.start()] == ["gpu1"]
    src.close()


def test_cuda_devices_through_torch_uuids(make, monkeypatch) -> None:
    fake, source = make([FakeGpu(), FakeGpu(), FakeGpu()])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # ignored: torch knows the real UUIDs
    bare = [g.uuid.removeprefix("GPU-") for g in fake.gpus]
    monkeypatch.setitem(sys.modules, "torch", _fake_torch([bare[2], bare[1]]))
    src = source(cuda_devices=[0])
    assert [d.name for d in src.start()] == ["gpu2"]
    src.close()


# ---------------------------------------------------------------- availability and lifecycle


def test_library_missing_is_source_unavailable(make) -> None:
    fake, source = make([FakeGpu()], library_missing=True)
    src = source()
    with pytest.raises(SourceUnavailable, match=r"no NVIDIA driver/GPU found \(NVML library"):
        src.start()
    src.close()
    src.close()
    assert fake.shutdown_calls == 0
    with pytest.raises(SourceUnavailable, match="no NVIDIA driver/GPU found"):
        list_gpus()


def test_driver_not_loaded_is_source_unavailable(make) -> None:
    _, source = make([FakeGpu()], init_error=ERR_DRIVER_NOT_LOADED)
    with pytest.raises(SourceUnavailable, match="driver not loaded"):
        source().start()


def test_real_pynvml_here_is_unavailable_or_works() -> None:
    """On this machine the real nvmlInit raises LibraryNotFound; on a GPU box it just works."""
    src = NvmlGpu()
    try:
        domains = src.start()
    except SourceUnavailable as exc:
        assert "NVIDIA" in str(exc) or "NVML" in str(exc) or "MIG" in str(exc)
    else:
        assert domains and all(d.kind == "gpu" for d in domains)
        assert src.read().energy_j.keys() == {d.name for d in domains}
    finally:
        src.close()
        src.close()


def test_close_idempotent_and_read_after_close(make, clock) -> None:
    fake, source = make([FakeGpu()])
    src = source()
    src.start()
    assert src.start()[0].name == "gpu0"  # a second start is a no-op
    src.close()
    src.close()
    assert fake.init_calls == fake.shutdown_calls == 1
    with pytest.raises(SourceError, match="before start"):
        src.read()
    NvmlGpu().close()  # never started


def test_list_gpus(make) -> None:
    fake, _ = make(
        [
            FakeGpu(name="NVIDIA H100 80GB HBM3", power_limit_w=700.0),
            FakeGpu(name="Tesla P100-PCIE-16GB", has_counter=False, mig_capable=False, power_limit_w=None),
            FakeGpu(mig=True),
        ]
    )
    gpus = list_gpus()
    assert [g["index"] for g in gpus] == [0, 1, 2]
    assert gpus[0] == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": fake.gpus[0].uuid,
        "counter": True,
        "instant_power": True,
        "mig": False,
        "power_limit_w": 700.0,
        "method": "counter",
    }
    assert (gpus[1]["counter"], gpus[1]["method"], gpus[1]["power_limit_w"]) == (False, "power", None)
    assert gpus[2]["mig"] is True
    assert fake.init_calls == fake.shutdown_calls == 1
