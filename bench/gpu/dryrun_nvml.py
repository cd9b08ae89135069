"""Simulated NVML for the dry run of the GPU validation: the project's fake (tests/fakes/nvml.py) plus
what a real H200 driver has that the fake lacks, and a GPU that behaves like hardware in two ways:

- the energy counter updates only every ``COUNTER_PERIOD_S`` (the fake's counter is exact at every read);
- instant power holds each value for ``INSTANT_PERIOD_S``.

Power follows a *load level* that the validation sets when it tells its load process what to run
(``Sim.set_level``): ``idle``, ``full``, ``duty:PERIOD_S:FRACTION``, or ``busy`` (the default: what a
training loop draws, with a slow ripple). The level history is kept, so the counter stays the exact
integral of the power that was reported.

Also added for Zeus (``ZeusMonitor`` probes these): ``nvmlDeviceGetArchitecture`` (Hopper),
``nvmlDeviceGetC2cModeInfoV`` (not supported: no Grace), ``_nvmlGetFunctionPointer`` (marks the official
bindings), the power-scope and temperature constants; and, where httpx is missing (zeus imports it for
its daemon client), an inert ``httpx`` module (:func:`stub_httpx`, called by the Zeus part only).
"""

from __future__ import annotations

import bisect
import math
import sys
import types
from typing import Any

from common import REPO

if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from fakes.nvml import ERR_NOT_SUPPORTED, FakeGpu, FakeNvml, NVMLError  # noqa: E402

COUNTER_PERIOD_S = 0.1
INSTANT_PERIOD_S = 0.02
IDLE_W, FULL_W, BUSY_W = 75.0, 680.0, 420.0
LIMIT_W = 700.0
NVML_DEVICE_ARCH_VOLTA, NVML_DEVICE_ARCH_HOPPER = 5, 9


class Sim:
    """One simulated H200 whose power follows the load level."""

    def __init__(self, default_level: str = "busy") -> None:
        self._times = [0.0]
        self._levels = [default_level]
        gpu = FakeGpu(
            name="NVIDIA H200 (simulated)",
            power_w=self.power_w,
            power_limit_w=LIMIT_W,
            counter_offset_mj=987_654_321,
        )
        self.fake = FakeNvml([gpu], driver_version="580.00.00-dryrun")
        self.module = self.fake.module
        self._patch()

    # -- load levels ------------------------------------------------------------------------------

    def set_level(self, level: str) -> None:
        self._times.append(self.fake.elapsed_s())
        self._levels.append(level)

    def level_at(self, t: float) -> str:
        return self._levels[max(0, bisect.bisect_right(self._times, t) - 1)]

    def power_w(self, t: float) -> float:
        k = math.floor(t / INSTANT_PERIOD_S)
        tb = k * INSTANT_PERIOD_S
        level = self.level_at(tb)
        jitter = 2.0 * math.sin(1.7 * k)  # a reading that moves at every update, as real sensors do
        if level == "idle":
            return IDLE_W + jitter
        if level == "full":
            return FULL_W + jitter
        if level.startswith("duty:"):
            _, period, frac = level.split(":")
            return (FULL_W if (tb % float(period)) < float(frac) * float(period) else IDLE_W) + jitter
        return BUSY_W + 60.0 * math.sin(2 * math.pi * tb / 0.7) + jitter

    # -- the module -------------------------------------------------------------------------------

    def _patch(self) -> None:
        fake, mod = self.fake, self.module

        def counter(handle: Any) -> int:
            i, gpu = fake._gpu(handle, data=True)
            if not gpu.has_counter:
                raise NVMLError(ERR_NOT_SUPPORTED)
            t = math.floor(fake.elapsed_s() / COUNTER_PERIOD_S) * COUNTER_PERIOD_S
            return fake.counter_mj(i, t)

        def not_supported(*_a: Any) -> Any:
            raise NVMLError(ERR_NOT_SUPPORTED)

        def limit_mw(handle: Any) -> int:
            fake._gpu(handle)
            return int(LIMIT_W * 1000)

        mod.nvmlDeviceGetTotalEnergyConsumption = counter
        mod._nvmlGetFunctionPointer = lambda name: None
        mod.nvmlDeviceGetC2cModeInfoV = not_supported
        mod.nvmlDeviceGetArchitecture = lambda h: (fake._gpu(h), NVML_DEVICE_ARCH_HOPPER)[1]
        mod.NVML_DEVICE_ARCH_VOLTA = NVML_DEVICE_ARCH_VOLTA
        mod.NVML_DEVICE_ARCH_HOPPER = NVML_DEVICE_ARCH_HOPPER
        mod.NVML_POWER_SCOPE_GPU, mod.NVML_POWER_SCOPE_MODULE, mod.NVML_POWER_SCOPE_MEMORY = 0, 1, 2
        mod.NVML_TEMPERATURE_GPU = 0
        mod.nvmlDeviceGetTemperature = lambda h, sensor: 40
        mod.nvmlDeviceGetTemperatureV = lambda h, sensor: 40
        mod.nvmlSystemGetNVMLVersion = lambda: "13.580.00-dryrun"
        mod.nvmlSystemGetCudaDriverVersion = lambda: 13000
        mod.nvmlDeviceGetPowerManagementLimit = limit_mw
        mod.nvmlDeviceGetPowerManagementDefaultLimit = limit_mw
        mod.nvmlDeviceGetPowerManagementLimitConstraints = lambda h: [200_000, int(LIMIT_W * 1000)]
        mod.nvmlDeviceGetPersistenceMode = lambda h: 1
        mod.nvmlDeviceGetPowerSource = not_supported


def stub_httpx() -> bool:
    """Where httpx is missing, an inert ``httpx`` module (zeus imports it for its daemon client only)."""
    try:
        import httpx  # noqa: F401
    except ImportError:
        stub = types.ModuleType("httpx")

        def attr(name: str) -> Any:
            if name.startswith("_"):
                raise AttributeError(name)
            return type(name, (Exception,), {})

        stub.__getattr__ = attr  # type: ignore[method-assign]
        sys.modules["httpx"] = stub
        return True
    return False


def install(default_level: str = "busy") -> Sim:
    """Make ``import pynvml`` return the simulated module (this process only)."""
    sim = Sim(default_level)
    sys.modules["pynvml"] = sim.module
    return sim
