"""A fake ``pynvml`` module (nvidia-ml-py) for tests without a GPU.

It mirrors the real module's names, signatures, return types (``str`` strings, ints in mW/mJ,
a ctypes array of ``c_nvmlFieldValue_t`` from ``nvmlDeviceGetFieldValues``, a ``c_uint`` from
``nvmlDeviceIsMigDeviceHandle``) and exceptions (``NVMLError(code)`` maps to its subclass).

Usage::

    fake = FakeNvml([FakeGpu(power_w=250.0), FakeGpu(power_w=lambda t: 100 + 50 * t)])
    fake.install(monkeypatch)          # sys.modules["pynvml"] = fake.module
    ...
    fake.true_energy_j(0, r0.time_s, r1.time_s)   # ground truth between two clock values

Time: ``power_w(t)`` and every fault time take *fake time*, seconds since the ``FakeNvml`` was
created (``fake.elapsed_s()``); ``true_energy_j`` takes values of ``clock`` (the clock readings
are stamped with, ``time.perf_counter`` by default). The energy counter is the exact integral of
``power_w`` since fake start plus ``counter_offset_mj`` (real counters count since driver load).
Faults live in ``gpu.faults`` and can be changed while a test runs.
"""

from __future__ import annotations

import ctypes
import math
import string
import time
import types
import uuid as uuid_lib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------- constants (as in pynvml)

NVML_SUCCESS = 0
ERROR_CODES = {
    "NVML_ERROR_UNINITIALIZED": 1,
    "NVML_ERROR_INVALID_ARGUMENT": 2,
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_ALREADY_INITIALIZED": 5,
    "NVML_ERROR_NOT_FOUND": 6,
    "NVML_ERROR_INSUFFICIENT_SIZE": 7,
    "NVML_ERROR_INSUFFICIENT_POWER": 8,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_TIMEOUT": 10,
    "NVML_ERROR_IRQ_ISSUE": 11,
    "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
    "NVML_ERROR_CORRUPTED_INFOROM": 14,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_RESET_REQUIRED": 16,
    "NVML_ERROR_OPERATING_SYSTEM": 17,
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": 18,
    "NVML_ERROR_IN_USE": 19,
    "NVML_ERROR_MEMORY": 20,
    "NVML_ERROR_NO_DATA": 21,
    "NVML_ERROR_UNKNOWN": 999,
}
ERR_NOT_SUPPORTED = ERROR_CODES["NVML_ERROR_NOT_SUPPORTED"]
ERR_UNINITIALIZED = ERROR_CODES["NVML_ERROR_UNINITIALIZED"]
ERR_INVALID_ARGUMENT = ERROR_CODES["NVML_ERROR_INVALID_ARGUMENT"]
ERR_NOT_FOUND = ERROR_CODES["NVML_ERROR_NOT_FOUND"]
ERR_LIBRARY_NOT_FOUND = ERROR_CODES["NVML_ERROR_LIBRARY_NOT_FOUND"]
ERR_DRIVER_NOT_LOADED = ERROR_CODES["NVML_ERROR_DRIVER_NOT_LOADED"]
ERR_GPU_IS_LOST = ERROR_CODES["NVML_ERROR_GPU_IS_LOST"]
ERR_UNKNOWN = ERROR_CODES["NVML_ERROR_UNKNOWN"]

NVML_FI_DEV_POWER_AVERAGE = 185
NVML_FI_DEV_POWER_INSTANT = 186
NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1

# ---------------------------------------------------------------- exceptions (as in pynvml)


class NVMLError(Exception):
    """``NVMLError(code)`` returns an instance of the subclass for ``code``, like pynvml."""

    _valClassMapping: dict[int, type] = {}
    _errcode_to_string = {
        1: "Uninitialized",
        2: "Invalid Argument",
        3: "Not Supported",
        4: "Insufficient Permissions",
        5: "Already Initialized",
        6: "Not Found",
        9: "Driver Not Loaded",
        12: "NVML Shared Library Not Found",
        13: "Function Not Found",
        15: "GPU is lost",
        999: "Unknown Error",
    }

    def __new__(typ, value):  # noqa: N804 - mirrors pynvml
        if typ == NVMLError:
            typ = NVMLError._valClassMapping.get(value, typ)
        obj = Exception.__new__(typ)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return NVMLError._errcode_to_string.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return self.value == getattr(other, "value", None)

    __hash__ = Exception.__hash__


def _make_error_classes() -> dict[str, type]:
    classes = {}
    for err_name, err_val in ERROR_CODES.items():
        class_name = "NVMLError_" + string.capwords(err_name.replace("NVML_ERROR_", ""), "_").replace("_", "")

        def gen_new(val: int) -> Callable[..., Any]:
            def new(typ, *args):
                return NVMLError.__new__(typ, val)

            return new

        cls = type(class_name, (NVMLError,), {"__new__": gen_new(err_val)})
        NVMLError._valClassMapping[err_val] = cls
        classes[class_name] = cls
    return classes


ERROR_CLASSES = _make_error_classes()
NVMLError_GPUIsLost = ERROR_CLASSES["NVMLError_GpuIsLost"]
# pynvml names it NVMLError_GpuIsLost (capwords); older code and docs say GPUIsLost: expose both.
ERROR_CLASSES["NVMLError_GPUIsLost"] = NVMLError_GPUIsLost

# ---------------------------------------------------------------- ctypes structs (as in pynvml)


class c_nvmlValue_t(ctypes.Union):  # noqa: N801
    _fields_ = [
        ("dVal", ctypes.c_double),
        ("uiVal", ctypes.c_uint),
        ("ulVal", ctypes.c_ulong),
        ("ullVal", ctypes.c_ulonglong),
        ("sllVal", ctypes.c_longlong),
        ("siVal", ctypes.c_int),
        ("usVal", ctypes.c_ushort),
    ]


class c_nvmlFieldValue_t(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("fieldId", ctypes.c_uint32),
        ("scopeId", ctypes.c_uint32),
        ("timestamp", ctypes.c_int64),
        ("latencyUsec", ctypes.c_int64),
        ("valueType", ctypes.c_uint),
        ("nvmlReturn", ctypes.c_uint),
        ("value", c_nvmlValue_t),
    ]


# ---------------------------------------------------------------- devices


@dataclass
class FakeFaults:
    """Faults of one fake GPU; every time is fake time (s since the FakeNvml was created).

    Attributes:
        lost_after_s: every device call after this raises ``NVMLError_GPUIsLost``.
        unknown_every_n: every N-th data query (energy, field values, power usage) on this GPU
            raises ``NVMLError_Unknown`` (N=1: all of them).
        reset_at_s: the energy counter restarts from zero at this time.
        backwards_at_s, backwards_mj: the counter drops by ``backwards_mj`` from this time on.
        jump_at_s, jump_mj: the counter jumps forward by ``jump_mj`` from this time on.
        stuck_after_s: the counter stops updating at this time.
    """

    lost_after_s: float | None = None
    unknown_every_n: int | None = None
    reset_at_s: float | None = None
    backwards_at_s: float | None = None
    backwards_mj: int = 0
    jump_at_s: float | None = None
    jump_mj: int = 0
    stuck_after_s: float | None = None


@dataclass
class FakeGpu:
    """One fake NVIDIA GPU.

    Attributes:
        power_w: constant watts, or a function of fake time (s) returning watts.
        has_counter: ``nvmlDeviceGetTotalEnergyConsumption`` supported (Volta+).
        has_instant: the ``NVML_FI_DEV_POWER_INSTANT`` field supported.
        has_power_usage: ``nvmlDeviceGetPowerUsage`` (1-s average) supported.
        power_limit_w: enforced power limit; None: ``nvmlDeviceGetEnforcedPowerLimit`` unsupported.
        mig: MIG mode enabled; the GPU then has MIG devices (``mig_uuids``) reachable by UUID.
        mig_capable: ``nvmlDeviceGetMigMode`` supported (Ampere+); forced True when ``mig``.
        counter_offset_mj: counter value at fake start (real counters count since driver load).
        instant_value_type: ``valueType`` of the field value (1: uiVal mW, 0: dVal mW).
        counter_period_s: the energy counter updates only every this many seconds (0: at every read),
            at fake times ``counter_phase_s + k * counter_period_s``; each update holds the exact integral.
        instant_period_s: the instant-power field holds the power sampled at its last update, every this
            many seconds (0: the power now), at fake times ``instant_phase_s + k * instant_period_s``.
    """

    name: str = "NVIDIA A100-SXM4-40GB"
    uuid: str | None = None
    power_w: float | Callable[[float], float] = 100.0
    has_counter: bool = True
    has_instant: bool = True
    has_power_usage: bool = True
    power_limit_w: float | None = 400.0
    mig: bool = False
    mig_capable: bool = True
    counter_offset_mj: int = 123_456_789
    instant_value_type: int = NVML_VALUE_TYPE_UNSIGNED_INT
    faults: FakeFaults = field(default_factory=FakeFaults)
    mig_uuids: list[str] = field(default_factory=list)
    counter_period_s: float = 0.0
    counter_phase_s: float = 0.0
    instant_period_s: float = 0.0
    instant_phase_s: float = 0.0


def _last_update(t: float, period_s: float, phase_s: float) -> float:
    """The latest update time ``phase_s + k * period_s`` at or before ``t`` (``t`` itself for period 0)."""
    if period_s <= 0:
        return t
    return phase_s + math.floor((t - phase_s) / period_s + 1e-9) * period_s


class SquareWave:
    """Power alternating between ``low_w`` and ``high_w``: high for ``duty`` of each ``period_s``.

    Callable (watts at fake time t) and with an exact :meth:`integral`, which the fake uses instead of
    numerical integration (a jump inside a Simpson panel would blur the ground truth).
    """

    def __init__(self, low_w: float = 100.0, high_w: float = 400.0, period_s: float = 1.0, duty: float = 0.5,
                 phase_s: float = 0.0) -> None:
        self.low_w, self.high_w, self.period_s, self.duty, self.phase_s = low_w, high_w, period_s, duty, phase_s

    def __call__(self, t: float) -> float:
        return self.high_w if ((t - self.phase_s) % self.period_s) < self.duty * self.period_s else self.low_w

    def _cumulative(self, t: float) -> float:
        n, r = divmod(t - self.phase_s, self.period_s)
        hi = self.duty * self.period_s
        per_period = self.high_w * hi + self.low_w * (self.period_s - hi)
        return n * per_period + self.high_w * min(r, hi) + self.low_w * max(0.0, r - hi)

    def integral(self, t0: float, t1: float) -> float:
        """Exact joules over ``[t0, t1]``."""
        return self._cumulative(t1) - self._cumulative(t0)


class FakeHandle:
    """Opaque device handle (the real one is a ``c_nvmlDevice_t`` pointer)."""

    def __init__(self, gpu_index: int, mig: int | None = None) -> None:
        self.gpu_index = gpu_index
        self.mig = mig

    def __repr__(self) -> str:
        return f"FakeHandle(gpu={self.gpu_index}, mig={self.mig})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeHandle) and (other.gpu_index, other.mig) == (self.gpu_index, self.mig)

    def __hash__(self) -> int:
        return hash((self.gpu_index, self.mig))


def _fake_uuid(seed: str) -> str:
    return str(uuid_lib.uuid5(uuid_lib.NAMESPACE_OID, seed))


_STEP_S = 5e-4


def _integral_j(power_w: float | Callable[[float], float], t0: float, t1: float) -> float:
    """Integral of power over [t0, t1] in joules: exact for constants, composite Simpson otherwise."""
    if t1 <= t0:
        return 0.0
    if not callable(power_w):
        return float(power_w) * (t1 - t0)
    exact = getattr(power_w, "integral", None)
    if exact is not None:
        return float(exact(t0, t1))
    n = max(2, math.ceil((t1 - t0) / _STEP_S))
    n += n % 2
    h = (t1 - t0) / n
    total = power_w(t0) + power_w(t1)
    total += 4.0 * sum(power_w(t0 + (2 * k - 1) * h) for k in range(1, n // 2 + 1))
    total += 2.0 * sum(power_w(t0 + 2 * k * h) for k in range(1, n // 2))
    return total * h / 3.0


class FakeNvml:
    """A fake NVML driver with ``gpus``; ``module`` is the fake ``pynvml`` module.

    Attributes:
        calls: how often each NVML function was called.
        init_calls, shutdown_calls: nvmlInit / successful nvmlShutdown counts.
    """

    def __init__(
        self,
        gpus: list[FakeGpu],
        clock: Callable[[], float] = time.perf_counter,
        *,
        library_missing: bool = False,
        init_error: int | None = None,
        driver_version: str = "550.54.15",
        field_constant: bool = True,
    ) -> None:
        self.gpus = gpus
        self.clock = clock
        self.t0 = clock()
        self.init_error = ERR_LIBRARY_NOT_FOUND if library_missing else init_error
        self.driver_version = driver_version
        self.calls: Counter[str] = Counter()
        self.init_calls = 0
        self.shutdown_calls = 0
        self._refcount = 0
        self._data_calls = [0] * len(gpus)
        # Incremental integral cache per GPU: (fake time, joules since fake start).
        self._cache = [(0.0, 0.0) for _ in gpus]
        for i, gpu in enumerate(gpus):
            if gpu.uuid is None:
                gpu.uuid = f"GPU-{_fake_uuid(f'wattlog-fake-gpu-{i}')}"
            if gpu.mig:
                gpu.mig_capable = True
                if not gpu.mig_uuids:
                    gpu.mig_uuids = [f"MIG-{_fake_uuid(f'{gpu.uuid}-mig-{k}')}" for k in range(2)]
        self.module = self._build_module(field_constant)

    # ------------------------------------------------------------ helpers for tests

    def install(self, monkeypatch: Any) -> FakeNvml:
        """Make ``import pynvml`` return the fake for the rest of the test."""
        monkeypatch.setitem(__import__("sys").modules, "pynvml", self.module)
        return self

    def elapsed_s(self) -> float:
        """Fake time now: seconds since this fake was created."""
        return self.clock() - self.t0

    def true_energy_j(self, gpu_index: int, t0: float, t1: float) -> float:
        """Exact joules drawn by GPU ``gpu_index`` between two ``clock`` values."""
        return _integral_j(self.gpus[gpu_index].power_w, t0 - self.t0, t1 - self.t0)

    def energy_since_start_j(self, gpu_index: int, t_fake: float) -> float:
        """Joules since fake start at fake time ``t_fake`` (cached, incremental)."""
        gpu = self.gpus[gpu_index]
        if not callable(gpu.power_w):
            return float(gpu.power_w) * max(t_fake, 0.0)
        t_last, e_last = self._cache[gpu_index]
        if t_fake >= t_last:
            e = e_last + _integral_j(gpu.power_w, t_last, t_fake)
            self._cache[gpu_index] = (t_fake, e)
            return e
        return _integral_j(gpu.power_w, 0.0, t_fake)

    def power_now_w(self, gpu_index: int) -> float:
        gpu = self.gpus[gpu_index]
        t = self.elapsed_s()
        return float(gpu.power_w(t)) if callable(gpu.power_w) else float(gpu.power_w)

    def instant_w(self, gpu_index: int) -> float:
        """What the instant-power field reads now: the power at its last update."""
        gpu = self.gpus[gpu_index]
        if not callable(gpu.power_w):
            return float(gpu.power_w)
        return float(gpu.power_w(_last_update(self.elapsed_s(), gpu.instant_period_s, gpu.instant_phase_s)))

    # ------------------------------------------------------------ internals

    def _check_init(self) -> None:
        if self._refcount <= 0:
            raise NVMLError(ERR_UNINITIALIZED)

    def _gpu(self, handle: Any, *, data: bool = False) -> tuple[int, FakeGpu]:
        self._check_init()
        if not isinstance(handle, FakeHandle) or not 0 <= handle.gpu_index < len(self.gpus):
            raise NVMLError(ERR_INVALID_ARGUMENT)
        i = handle.gpu_index
        gpu = self.gpus[i]
        faults = gpu.faults
        if faults.lost_after_s is not None and self.elapsed_s() >= faults.lost_after_s:
            raise NVMLError(ERR_GPU_IS_LOST)
        if data and faults.unknown_every_n:
            self._data_calls[i] += 1
            if self._data_calls[i] % faults.unknown_every_n == 0:
                raise NVMLError(ERR_UNKNOWN)
        return i, gpu

    def counter_mj(self, gpu_index: int, t_fake: float) -> int:
        """The raw counter value (mJ) of GPU ``gpu_index`` at fake time ``t_fake``, with faults."""
        gpu = self.gpus[gpu_index]
        f = gpu.faults
        if f.stuck_after_s is not None:
            t_fake = min(t_fake, f.stuck_after_s)
        energy_j = self.energy_since_start_j(gpu_index, t_fake)
        if f.reset_at_s is not None and t_fake >= f.reset_at_s:
            value = (energy_j - _integral_j(gpu.power_w, 0.0, f.reset_at_s)) * 1e3
        else:
            value = gpu.counter_offset_mj + energy_j * 1e3
        if f.backwards_at_s is not None and t_fake >= f.backwards_at_s:
            value -= f.backwards_mj
        if f.jump_at_s is not None and t_fake >= f.jump_at_s:
            value += f.jump_mj
        return max(0, int(value))

    def _power_avg_w(self, gpu_index: int) -> float:
        t = self.elapsed_s()
        t_from = max(0.0, t - 1.0)
        if t <= t_from:
            return self.power_now_w(gpu_index)
        return _integral_j(self.gpus[gpu_index].power_w, t_from, t) / (t - t_from)

    # ------------------------------------------------------------ the pynvml functions

    def _build_module(self, field_constant: bool) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        mod.__file__ = __file__
        mod.NVML_SUCCESS = NVML_SUCCESS
        for name, value in ERROR_CODES.items():
            setattr(mod, name, value)
        for name, cls in ERROR_CLASSES.items():
            setattr(mod, name, cls)
        mod.NVMLError = NVMLError
        mod.NVML_FI_DEV_POWER_AVERAGE = NVML_FI_DEV_POWER_AVERAGE
        if field_constant:
            mod.NVML_FI_DEV_POWER_INSTANT = NVML_FI_DEV_POWER_INSTANT
        mod.NVML_VALUE_TYPE_DOUBLE = NVML_VALUE_TYPE_DOUBLE
        mod.NVML_VALUE_TYPE_UNSIGNED_INT = NVML_VALUE_TYPE_UNSIGNED_INT
        mod.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
        mod.NVML_DEVICE_MIG_DISABLE = NVML_DEVICE_MIG_DISABLE
        mod.NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE
        mod.c_nvmlFieldValue_t = c_nvmlFieldValue_t
        mod.c_nvmlValue_t = c_nvmlValue_t
        for name in (
            "nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetHandleByUUID", "nvmlDeviceGetUUID",
            "nvmlDeviceGetName", "nvmlDeviceGetIndex", "nvmlDeviceGetTotalEnergyConsumption",
            "nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit",
            "nvmlDeviceIsMigDeviceHandle", "nvmlDeviceGetMigMode",
            "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
        ):
            setattr(mod, name, self._counted(name, getattr(self, "_" + name)))
        mod.fake = self
        return mod

    def _counted(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            self.calls[name] += 1
            return fn(*args)

        wrapper.__name__ = name
        return wrapper

    def _nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.init_calls += 1
        self._refcount += 1

    def _nvmlShutdown(self) -> None:
        self._check_init()
        self._refcount -= 1
        self.shutdown_calls += 1

    def _nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return self.driver_version

    def _nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.gpus)

    def _nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise NVMLError(ERR_INVALID_ARGUMENT)
        return FakeHandle(index)

    def _nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle:
        self._check_init()
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for i, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                return FakeHandle(i)
            if uuid in gpu.mig_uuids:
                return FakeHandle(i, gpu.mig_uuids.index(uuid))
        raise NVMLError(ERR_NOT_FOUND)

    def _nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        _, gpu = self._gpu(handle)
        return gpu.mig_uuids[handle.mig] if handle.mig is not None else str(gpu.uuid)

    def _nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        _, gpu = self._gpu(handle)
        return gpu.name if handle.mig is None else f"{gpu.name} MIG 3g.20gb"

    def _nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        i, _ = self._gpu(handle)
        return i

    def _nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        i, gpu = self._gpu(handle, data=True)
        if not gpu.has_counter or handle.mig is not None:
            raise NVMLError(ERR_NOT_SUPPORTED)
        return self.counter_mj(i, _last_update(self.elapsed_s(), gpu.counter_period_s, gpu.counter_phase_s))

    def _nvmlDeviceGetFieldValues(self, handle: FakeHandle, fieldIds: list[Any]) -> Any:  # noqa: N803
        i, gpu = self._gpu(handle, data=True)
        values = (c_nvmlFieldValue_t * len(fieldIds))()
        now_us = int(time.time() * 1e6)
        for k, field_id in enumerate(fieldIds):
            try:
                values[k].fieldId, values[k].scopeId = field_id
            except TypeError:
                values[k].fieldId = field_id
            values[k].timestamp = now_us
            is_instant = values[k].fieldId == NVML_FI_DEV_POWER_INSTANT
            supported = is_instant and gpu.has_instant and handle.mig is None
            if not supported:
                values[k].nvmlReturn = ERR_NOT_SUPPORTED
                continue
            power_mw = self.instant_w(i) * 1e3
            values[k].nvmlReturn = NVML_SUCCESS
            values[k].valueType = gpu.instant_value_type
            if gpu.instant_value_type == NVML_VALUE_TYPE_DOUBLE:
                values[k].value.dVal = power_mw
            else:
                values[k].value.uiVal = max(0, round(power_mw))
        return values

    def _nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        i, gpu = self._gpu(handle, data=True)
        if not gpu.has_power_usage or handle.mig is not None:
            raise NVMLError(ERR_NOT_SUPPORTED)
        return max(0, round(self._power_avg_w(i) * 1e3))

    def _nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        _, gpu = self._gpu(handle)
        if gpu.power_limit_w is None or handle.mig is not None:
            raise NVMLError(ERR_NOT_SUPPORTED)
        return round(gpu.power_limit_w * 1e3)

    def _nvmlDeviceIsMigDeviceHandle(self, handle: FakeHandle) -> ctypes.c_uint:
        self._gpu(handle)
        return ctypes.c_uint(1 if handle.mig is not None else 0)

    def _nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        _, gpu = self._gpu(handle)
        if not gpu.mig_capable or handle.mig is not None:
            raise NVMLError(ERR_NOT_SUPPORTED)
        mode = NVML_DEVICE_MIG_ENABLE if gpu.mig else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def _nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: FakeHandle) -> FakeHandle:
        i, _ = self._gpu(handle)
        if handle.mig is None:
            raise NVMLError(ERR_INVALID_ARGUMENT)
        return FakeHandle(i)


class ManualClock:
    """A clock tests advance by hand: ``clock()`` returns the time, ``clock.advance(dt)`` moves it."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, dt_s: float) -> float:
        self.now_s += dt_s
        return self.now_s
