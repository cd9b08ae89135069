"""Simulated NVIDIA GPUs under the *real* pynvml (nvidia-ml-py): only the C library is faked.

``install(...)`` sets ``pynvml.nvmlLib`` to a :class:`SimNvmlLib`, whose attributes are the C entry
points pynvml looks up with ``_nvmlGetFunctionPointer`` (``getattr(nvmlLib, name)``). Each is a
Python callable taking the ctypes arguments pynvml passes (``byref(c_uint)``, string buffers,
``c_nvmlDevice_t`` handles, arrays of ``c_nvmlFieldValue_t``) and returning an ``nvmlReturn_t`` code,
so every layer above the C library (pynvml's wrappers, their error classes, Zeus, CodeCarbon,
MLflow's GPU monitor, wattlog) runs unmodified. A missing entry point is pynvml's own
``NVMLError_FunctionNotFound``.

The GPUs behave like hardware in the ways that matter for energy:

- power follows a *mode*: ``constant`` (300 W), ``square`` (100 W <-> 400 W, 1 s period, 50 % duty), or
  ``steps`` (each training step draws its own level, set by the bench's callback with :meth:`Sim.step`);
- the energy counter (mJ) is the exact integral of power, updated every ``counter_s`` (0: continuously);
- the instant-power field ``NVML_FI_DEV_POWER_INSTANT`` holds the power at its last update, every
  ``instant_s``; ``nvmlDeviceGetPowerUsage`` is the mean power over the last second, as on recent GPUs.

Ground truth: :meth:`Sim.energy_j` (exact joules between two ``time.perf_counter()`` values).
"""

from __future__ import annotations

import bisect
import ctypes
import math
import threading
import time
from typing import Any

SUCCESS, NOT_SUPPORTED, INVALID_ARGUMENT, INSUFFICIENT_SIZE = 0, 3, 2, 7
FI_POWER_AVERAGE, FI_POWER_INSTANT = 185, 186
LOW_W, HIGH_W, SQUARE_PERIOD_S, CONSTANT_W = 100.0, 400.0, 1.0, 300.0
LIMIT_W = 700.0
_HANDLE_BASE = 0x5A000


def _out(arg: Any) -> Any:
    """The object behind ``byref(obj)`` (or the object itself)."""
    return getattr(arg, "_obj", arg)


class Sim:
    """The simulated GPUs' power and energy; thread-safe, exact integrals."""

    def __init__(self, gpus: int = 2, mode: str = "square", counter_s: float = 0.02, instant_s: float = 0.02,
                 scale: tuple[float, ...] = (1.0, 0.8)) -> None:
        if mode not in ("constant", "square", "steps"):
            raise ValueError(f"mode {mode!r}: constant, square or steps")
        self.gpus, self.mode, self.counter_s, self.instant_s = gpus, mode, counter_s, instant_s
        self.scale = [scale[i % len(scale)] for i in range(gpus)]
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._step_times = [0.0]  # mode "steps": level changes (s since t0) and their levels
        self._step_levels = [LOW_W]
        self._step_cum = [0.0]
        self.offset_mj = [987_654_321 + 11_111 * i for i in range(gpus)]

    # -- power ------------------------------------------------------------------------------------

    def step(self, index: int) -> None:
        """Mode ``steps``: a training step starts now and draws its own level from here on."""
        if self.mode != "steps":
            return
        t = time.perf_counter() - self.t0
        level = 150.0 + 250.0 * ((index * 0.6180339887) % 1.0)
        with self._lock:
            last_t, last_w = self._step_times[-1], self._step_levels[-1]
            if t <= last_t:
                return
            self._step_cum.append(self._step_cum[-1] + last_w * (t - last_t))
            self._step_times.append(t)
            self._step_levels.append(level)

    def _power(self, t: float) -> float:
        if self.mode == "constant":
            return CONSTANT_W
        if self.mode == "square":
            return HIGH_W if (t % SQUARE_PERIOD_S) < SQUARE_PERIOD_S / 2 else LOW_W
        with self._lock:
            i = max(0, bisect.bisect_right(self._step_times, t) - 1)
            return self._step_levels[i]

    def _cumulative(self, t: float) -> float:
        """Joules of a scale-1 GPU from t0 to ``t`` (s since t0), exact."""
        t = max(t, 0.0)
        if self.mode == "constant":
            return CONSTANT_W * t
        if self.mode == "square":
            n, r = divmod(t, SQUARE_PERIOD_S)
            half = SQUARE_PERIOD_S / 2
            return n * (HIGH_W + LOW_W) * half + HIGH_W * min(r, half) + LOW_W * max(0.0, r - half)
        with self._lock:
            i = max(0, bisect.bisect_right(self._step_times, t) - 1)
            return self._step_cum[i] + self._step_levels[i] * (t - self._step_times[i])

    def energy_j(self, gpu: int, t0: float, t1: float) -> float:
        """Exact joules of ``gpu`` between two ``time.perf_counter()`` values."""
        return self.scale[gpu] * (self._cumulative(t1 - self.t0) - self._cumulative(t0 - self.t0))

    @staticmethod
    def _last_update(t: float, period_s: float) -> float:
        return t if period_s <= 0 else math.floor(t / period_s) * period_s

    def counter_mj(self, gpu: int) -> int:
        t = self._last_update(time.perf_counter() - self.t0, self.counter_s)
        return self.offset_mj[gpu] + int(1e3 * self.scale[gpu] * self._cumulative(t))

    def instant_mw(self, gpu: int) -> int:
        t = self._last_update(time.perf_counter() - self.t0, self.instant_s)
        return int(round(1e3 * self.scale[gpu] * self._power(t)))

    def average_mw(self, gpu: int) -> int:
        t = time.perf_counter() - self.t0
        t_from = max(0.0, t - 1.0)
        if t - t_from < 1e-3:
            return self.instant_mw(gpu)
        return int(round(1e3 * self.scale[gpu] * (self._cumulative(t) - self._cumulative(t_from)) / (t - t_from)))


class SimNvmlLib:
    """The C entry points pynvml calls, over a :class:`Sim`. Unknown names raise AttributeError."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        fn = getattr(type(self), "_" + name, None)
        if fn is None:
            raise AttributeError(name)
        calls = self.calls

        def entry(*args: Any) -> int:
            calls[name] = calls.get(name, 0) + 1
            return fn(self, *args)

        entry.__name__ = name
        return entry

    # -- helpers ----------------------------------------------------------------------------------

    def _gpu(self, handle: Any) -> int | None:
        address = ctypes.c_void_p.from_address(ctypes.addressof(handle)).value or 0
        index = address - _HANDLE_BASE
        return index if 0 <= index < self.sim.gpus else None

    @staticmethod
    def _set_handle(arg: Any, index: int) -> None:
        ctypes.c_void_p.from_address(ctypes.addressof(_out(arg))).value = _HANDLE_BASE + index

    @staticmethod
    def _string(buf: Any, text: str) -> int:
        buf.value = text.encode()
        return SUCCESS

    # -- system -----------------------------------------------------------------------------------

    def _nvmlInitWithFlags(self, flags: Any) -> int:
        return SUCCESS

    def _nvmlInit_v2(self) -> int:
        return SUCCESS

    def _nvmlShutdown(self) -> int:
        return SUCCESS

    def _nvmlSystemGetDriverVersion(self, buf: Any, size: Any) -> int:
        return self._string(buf, "580.00.00-sim")

    def _nvmlSystemGetNVMLVersion(self, buf: Any, size: Any) -> int:
        return self._string(buf, "13.580.00-sim")

    def _nvmlSystemGetCudaDriverVersion(self, out: Any) -> int:
        _out(out).value = 13000
        return SUCCESS

    _nvmlSystemGetCudaDriverVersion_v2 = _nvmlSystemGetCudaDriverVersion

    def _nvmlDeviceGetCount_v2(self, out: Any) -> int:
        _out(out).value = self.sim.gpus
        return SUCCESS

    def _nvmlDeviceGetHandleByIndex_v2(self, index: Any, out: Any) -> int:
        i = int(getattr(index, "value", index))
        if not 0 <= i < self.sim.gpus:
            return INVALID_ARGUMENT
        self._set_handle(out, i)
        return SUCCESS

    def _nvmlDeviceGetHandleByUUID(self, uuid: Any, out: Any) -> int:
        text = (uuid.value if hasattr(uuid, "value") else uuid).decode()
        for i in range(self.sim.gpus):
            if text == self._uuid(i):
                self._set_handle(out, i)
                return SUCCESS
        return 6  # NOT_FOUND

    def _nvmlDeviceGetIndex(self, handle: Any, out: Any) -> int:
        _out(out).value = self._gpu(handle)
        return SUCCESS

    # -- identity ---------------------------------------------------------------------------------

    @staticmethod
    def _uuid(i: int) -> str:
        return f"GPU-5a5a5a5a-0000-4000-8000-{i:012d}"

    def _nvmlDeviceGetName(self, handle: Any, buf: Any, size: Any) -> int:
        return self._string(buf, "NVIDIA H100 80GB HBM3 (simulated)")

    def _nvmlDeviceGetUUID(self, handle: Any, buf: Any, size: Any) -> int:
        return self._string(buf, self._uuid(self._gpu(handle) or 0))

    def _nvmlDeviceGetArchitecture(self, handle: Any, out: Any) -> int:
        _out(out).value = 9  # Hopper
        return SUCCESS

    def _nvmlDeviceIsMigDeviceHandle(self, handle: Any, out: Any) -> int:
        _out(out).value = 0
        return SUCCESS

    def _nvmlDeviceGetMigMode(self, handle: Any, current: Any, pending: Any) -> int:
        _out(current).value = _out(pending).value = 0
        return SUCCESS

    def _nvmlDeviceGetC2cModeInfoV(self, handle: Any, out: Any) -> int:
        return NOT_SUPPORTED

    def _nvmlDeviceGetComputeMode(self, handle: Any, out: Any) -> int:
        _out(out).value = 0
        return SUCCESS

    def _nvmlDeviceGetPersistenceMode(self, handle: Any, out: Any) -> int:
        _out(out).value = 1
        return SUCCESS

    def _nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any, count: Any, procs: Any) -> int:
        _out(count).value = 0
        return SUCCESS

    _nvmlDeviceGetGraphicsRunningProcesses_v3 = _nvmlDeviceGetComputeRunningProcesses_v3

    def _nvmlDeviceGetMemoryInfo(self, handle: Any, out: Any) -> int:
        mem = _out(out)
        mem.total, mem.used = 80 * 2**30, 12 * 2**30
        mem.free = mem.total - mem.used
        return SUCCESS

    def _nvmlDeviceGetUtilizationRates(self, handle: Any, out: Any) -> int:
        util = _out(out)
        util.gpu, util.memory = 87, 40
        return SUCCESS

    def _nvmlDeviceGetTemperature(self, handle: Any, sensor: Any, out: Any) -> int:
        _out(out).value = 45
        return SUCCESS

    def _nvmlDeviceGetTemperatureV(self, handle: Any, out: Any) -> int:
        _out(out).temperature = 45
        return SUCCESS

    # -- power and energy -------------------------------------------------------------------------

    def _nvmlDeviceGetTotalEnergyConsumption(self, handle: Any, out: Any) -> int:
        _out(out).value = self.sim.counter_mj(self._gpu(handle) or 0)
        return SUCCESS

    def _nvmlDeviceGetPowerUsage(self, handle: Any, out: Any) -> int:
        _out(out).value = self.sim.average_mw(self._gpu(handle) or 0)
        return SUCCESS

    def _nvmlDeviceGetFieldValues(self, handle: Any, count: Any, values: Any) -> int:
        gpu = self._gpu(handle) or 0
        arr = _out(values)
        for k in range(int(getattr(count, "value", count))):
            fv = arr[k]
            fv.timestamp = int(time.time() * 1e6)
            if fv.fieldId == FI_POWER_INSTANT:
                fv.valueType, fv.nvmlReturn = 1, SUCCESS
                fv.value.uiVal = self.sim.instant_mw(gpu)
            elif fv.fieldId == FI_POWER_AVERAGE:
                fv.valueType, fv.nvmlReturn = 1, SUCCESS
                fv.value.uiVal = self.sim.average_mw(gpu)
            else:
                fv.nvmlReturn = NOT_SUPPORTED
        return SUCCESS

    def _nvmlDeviceGetEnforcedPowerLimit(self, handle: Any, out: Any) -> int:
        _out(out).value = int(LIMIT_W * 1e3)
        return SUCCESS

    _nvmlDeviceGetPowerManagementLimit = _nvmlDeviceGetEnforcedPowerLimit
    _nvmlDeviceGetPowerManagementDefaultLimit = _nvmlDeviceGetEnforcedPowerLimit

    def _nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any, lo: Any, hi: Any) -> int:
        _out(lo).value, _out(hi).value = 200_000, int(LIMIT_W * 1e3)
        return SUCCESS


def install(**sim_kwargs: Any) -> Sim:
    """Put simulated GPUs under the real pynvml of this process; returns the :class:`Sim`."""
    import pynvml

    sim = Sim(**sim_kwargs)
    with pynvml.libLoadLock:
        pynvml.nvmlLib = SimNvmlLib(sim)
        pynvml._nvmlGetFunctionPointer_cache.clear()
    return sim
