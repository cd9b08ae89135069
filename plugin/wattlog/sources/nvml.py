"""NVIDIA GPU energy through NVML (the ``nvidia-ml-py`` package, module ``pynvml``).

Per device, the best available method is chosen at ``start()``:

- ``counter``: ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load; Volta and newer).
- ``power``: the instant-power field ``NVML_FI_DEV_POWER_INSTANT`` (mW), integrated at every read.
- ``power_avg``: ``nvmlDeviceGetPowerUsage`` (mW, a 1-second average on recent GPUs), integrated;
  only with ``allow_averaged_power=True`` and labelled as such in the provenance.

``pynvml`` is imported inside :meth:`NvmlGpu.start` and :func:`list_gpus`, never at import time.
NVML ignores ``CUDA_VISIBLE_DEVICES``, so CUDA ordinals are mapped to NVML devices by UUID.
A MIG slice has no power reading of its own: wattlog refuses to measure one rather than invent it.

Faults are handled per device (see :meth:`NvmlGpu.read`): a lost GPU stops accruing while the others
go on; a failed read is skipped (the counter is cumulative, nothing is lost); counter resets,
backwards and implausible forward jumps never yield negative or above-power-limit energy; a counter
that stops moving while instant power is above 0 W is flagged. Each adds a note that the meter turns
into an ``energy.degraded`` reason.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from wattlog.errors import ConfigError, SourceError, SourceUnavailable, WattlogWarning
from wattlog.sources.base import Domain, EnergySource, PowerIntegrator, Reading
from wattlog.sources.shaping import CounterShaper, ShapedReading, merge_curves

_NVML_SUCCESS = 0
_NVML_ERROR_GPU_IS_LOST = 15
_MIG_ENABLE = 1
_CAP_FACTOR = 1.2
"""A delta above ``power_limit_w * elapsed_s * _CAP_FACTOR`` is implausible and gets capped."""
_FALLBACK_MAX_W = 2000.0
"""Plausibility ceiling per GPU when the driver reports no power limit."""
_COUNTER_GRACE_S = 0.1
"""Slack for the counter's own update lag when judging whether a delta is plausible."""
_FATAL_CODES = frozenset({9, 15, 16})
"""NVML error codes after which a device is gone for good: driver not loaded, GPU lost, reset required."""
_DEAD_AFTER_S = 10.0
"""A device whose reads keep failing (after the retry) for this long stops accruing energy."""
_STUCK_AFTER_S = 2.0
"""A counter that has not moved for this long while instant power reads > 0 W is flagged as stuck."""
# nvmlValueType_t -> attribute of c_nvmlValue_t (double, uint, ulong, ulonglong, slonglong, sint, ushort)
_VALUE_ATTRS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")

_METHOD_DETAIL = {
    "counter": "hardware energy counter (nvmlDeviceGetTotalEnergyConsumption)",
    "power": "instant power (NVML_FI_DEV_POWER_INSTANT) integrated at the sampling cadence",
    "power_avg": (
        "1-second averaged power (nvmlDeviceGetPowerUsage) integrated at the sampling cadence; "
        "lags and smooths short steps, less accurate than a counter"
    ),
}


def _text(value: Any) -> str:
    """NVML strings are ``str`` in current nvidia-ml-py, ``bytes`` in old releases."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _mig_message(what: str) -> str:
    return (
        f"{what} is a MIG slice (or on a GPU in MIG mode): NVML has no power or energy reading "
        "for a MIG slice, and wattlog will not invent one. If the job owns the whole GPU, "
        "measure it by NVML index instead (e.g. NvmlGpu(indices=[0]) / energy.gpus=[0])."
    )


def _import_nvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise SourceUnavailable(
            "the pynvml module is missing: install nvidia-ml-py (pip install nvidia-ml-py)"
        ) from exc
    return pynvml


def _error_class(nvml: Any, name: str) -> type[BaseException]:
    """An NVMLError subclass by name, or a class never raised if this pynvml lacks it."""
    cls = getattr(nvml, name, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        return cls
    return type(f"_Missing{name}", (Exception,), {})


def _init_nvml(nvml: Any) -> None:
    """``nvmlInit`` with failures turned into :class:`SourceUnavailable` that say why."""
    try:
        nvml.nvmlInit()
    except _error_class(nvml, "NVMLError_LibraryNotFound") as exc:
        raise SourceUnavailable(
            "no NVIDIA driver/GPU found (NVML library libnvidia-ml.so.1 not found)"
        ) from exc
    except _error_class(nvml, "NVMLError_DriverNotLoaded") as exc:
        raise SourceUnavailable("no NVIDIA driver/GPU found (NVIDIA driver not loaded)") from exc
    except _error_class(nvml, "NVMLError_NoPermission") as exc:
        raise SourceUnavailable(f"no permission to use NVML ({exc})") from exc
    except nvml.NVMLError as exc:
        raise SourceUnavailable(f"NVML failed to initialise ({exc})") from exc


def _shutdown_nvml(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError as exc:  # nothing left to release; report, never mask the caller's error
        warnings.warn(f"wattlog: nvmlShutdown failed ({exc})", WattlogWarning, stacklevel=3)


def _field_power_mw(fv: Any) -> float:
    return float(getattr(fv.value, _VALUE_ATTRS[fv.valueType]))


def _probe_counter(nvml: Any, handle: Any) -> bool:
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except nvml.NVMLError:
        return False
    return True


def _probe_instant(nvml: Any, handle: Any, field_id: int | None) -> bool:
    if field_id is None:
        return False
    try:
        fv = nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0]
    except nvml.NVMLError:
        return False
    return fv.nvmlReturn == _NVML_SUCCESS and 0 <= fv.valueType < len(_VALUE_ATTRS)


def _probe_power_usage(nvml: Any, handle: Any) -> bool:
    try:
        nvml.nvmlDeviceGetPowerUsage(handle)
    except nvml.NVMLError:
        return False
    return True


def _power_limit_w(nvml: Any, handle: Any) -> float | None:
    try:
        limit_mw = nvml.nvmlDeviceGetEnforcedPowerLimit(handle)
    except nvml.NVMLError:
        return None
    return limit_mw / 1e3 if limit_mw else None


def _is_mig_handle(nvml: Any, handle: Any) -> bool:
    fn = getattr(nvml, "nvmlDeviceIsMigDeviceHandle", None)
    if fn is None:
        return False
    try:
        result = fn(handle)
    except nvml.NVMLError:  # NotSupported / FunctionNotFound on pre-Ampere GPUs and old drivers
        return False
    return bool(getattr(result, "value", result))


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    fn = getattr(nvml, "nvmlDeviceGetMigMode", None)
    if fn is None:
        return False
    try:
        current, _pending = fn(handle)
    except nvml.NVMLError:  # NotSupported: the GPU has no MIG
        return False
    return current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", _MIG_ENABLE)


def _all_uuids(nvml: Any) -> list[str]:
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    return [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]


def _visible_entries() -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` parsed like CUDA does (stops at ``-1``); None when unset."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    entries: list[str] = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def _torch_uuid(cuda_index: int) -> str | None:
    """The UUID of CUDA device ``cuda_index`` from torch, only if torch already initialised CUDA."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
    except (AttributeError, RuntimeError, AssertionError, ValueError):  # old torch: fall back to env
        return None
    return uuid or None


def _resolve_entry(entry: str, uuids: list[str]) -> int:
    """NVML index of one ``CUDA_VISIBLE_DEVICES`` entry (integer, ``GPU-`` UUID or prefix)."""
    if entry.upper().startswith("MIG-"):
        raise SourceUnavailable(_mig_message(f"CUDA_VISIBLE_DEVICES entry {entry!r}"))
    if entry.isdigit():
        index = int(entry)
        if index >= len(uuids):
            raise ConfigError("CUDA_VISIBLE_DEVICES", entry, f"NVML indices 0..{len(uuids) - 1} or GPU UUIDs")
        return index
    prefix = entry if entry.upper().startswith("GPU-") else f"GPU-{entry}"
    matches = [i for i, u in enumerate(uuids) if u.lower().startswith(prefix.lower())]
    if len(matches) != 1:
        raise ConfigError("CUDA_VISIBLE_DEVICES", entry, uuids)
    return matches[0]


def _cuda_to_nvml(nvml: Any, cuda_devices: list[int]) -> list[int]:
    """NVML indices of the CUDA ordinals this process sees, matched by UUID.

    Uses torch's device UUIDs when torch has already initialised CUDA; otherwise the k-th
    ``CUDA_VISIBLE_DEVICES`` entry (or NVML index k when unset). Device numbers are CUDA's
    enumeration order, which equals NVML's PCI order with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or when
    all GPUs are the same model; otherwise a warning suggests fixing the order.
    """
    uuids = _all_uuids(nvml)
    entries = _visible_entries()
    visible = len(entries) if entries is not None else len(uuids)
    indices: list[int] = []
    for k in cuda_devices:
        torch_uuid = _torch_uuid(k)
        if torch_uuid is not None:
            bare = torch_uuid.lower().removeprefix("gpu-").removeprefix("mig-")
            by_uuid = [i for i, u in enumerate(uuids) if u.lower().removeprefix("gpu-") == bare]
            if by_uuid:
                indices.append(by_uuid[0])
                continue
            raise SourceUnavailable(_mig_message(f"CUDA device {k} (UUID {torch_uuid})"))
        if k >= visible:
            cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError("gpus", k, f"CUDA ordinals 0..{visible - 1} (CUDA_VISIBLE_DEVICES={cvd!r})")
        index = _resolve_entry(entries[k], uuids) if entries is not None else k
        # Resolve through the UUID: the handle NVML gives for it is the device CUDA means.
        handle = nvml.nvmlDeviceGetHandleByUUID(uuids[index])
        if _is_mig_handle(nvml, handle):
            raise SourceUnavailable(_mig_message(f"CUDA device {k}"))
        indices.append(index)
    by_number = entries is None or any(e.isdigit() for e in entries)
    if by_number and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" and len(uuids) > 1:
        names = {_text(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(len(uuids))}
        if len(names) > 1:
            warnings.warn(
                "wattlog: CUDA devices chosen by number on a machine with mixed GPU models: CUDA's default "
                "order (FASTEST_FIRST) may differ from NVML's; set CUDA_DEVICE_ORDER=PCI_BUS_ID or use UUIDs",
                WattlogWarning,
                stacklevel=3,
            )
    return indices


def _check_index_list(value: list[int] | None, field: str = "gpus") -> list[int] | None:
    if value is None:
        return None
    valid = not isinstance(value, (str, bytes)) and bool(value)
    if not valid or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ConfigError(field, value, "a non-empty list of non-negative integer indices, or None for all")
    return list(value)


class _Device:
    """Per-device state kept between reads (plain attributes, no per-read allocation)."""

    __slots__ = (
        "index", "name", "uuid", "handle", "method", "power_limit_w", "cap_w", "mig_enabled",
        "start_raw_mj", "last_raw_mj", "energy_j", "window_start_s", "last_read_s", "integrator",
        "domain", "reset_note", "cap_note", "dead", "fail_since_s", "last_change_s", "rate_w",
        "has_instant", "stuck_checked", "shaper",
    )

    def __init__(self, index: int, handle: Any) -> None:
        self.index = index
        self.domain = f"gpu{index}"
        self.reset_note = f"gpu{index}: counter went backwards (reset?)"
        self.cap_note = f"gpu{index}: energy jump above power limit capped"
        self.dead: str | None = None
        self.fail_since_s: float | None = None
        self.last_change_s = 0.0
        self.rate_w: float | None = None
        self.has_instant = False
        self.stuck_checked = False
        self.handle = handle
        self.name = ""
        self.uuid = ""
        self.method = ""
        self.power_limit_w: float | None = None
        self.cap_w = _FALLBACK_MAX_W * _CAP_FACTOR
        self.mig_enabled = False
        self.start_raw_mj = 0
        self.last_raw_mj = 0
        self.energy_j = 0.0
        self.window_start_s = 0.0
        self.last_read_s = 0.0
        self.integrator = PowerIntegrator()
        self.shaper = CounterShaper(0.0, shape=False)


class NvmlGpu(EnergySource):
    """NVIDIA GPUs through NVML: cumulative joules per GPU since ``start()``.

    Args:
        indices: NVML device indices to measure (NVML/PCI order, ignores ``CUDA_VISIBLE_DEVICES``).
            A GPU in MIG mode may be measured this way as a whole (the job must own all of it).
        cuda_devices: CUDA ordinals as this process sees them; mapped to NVML devices by UUID,
            honouring ``CUDA_VISIBLE_DEVICES``. MIG slices raise :class:`SourceUnavailable`.
        require_counter: refuse GPUs without the hardware energy counter (pre-Volta).
        allow_averaged_power: fall back to ``nvmlDeviceGetPowerUsage`` (1-s average) when neither
            the counter nor the instant-power field exists.

    With both ``indices`` and ``cuda_devices`` None, every NVML device is measured (GPUs in MIG
    mode are refused; pass ``indices`` to measure them whole).

    Raises:
        ConfigError: bad ``indices``/``cuda_devices`` (field ``gpus``).
    """

    kind = "gpu"

    def __init__(
        self,
        indices: list[int] | None = None,
        cuda_devices: list[int] | None = None,
        require_counter: bool = False,
        allow_averaged_power: bool = True,
    ) -> None:
        if indices is not None and cuda_devices is not None:
            both = {"indices": indices, "cuda_devices": cuda_devices}
            raise ConfigError("gpus", both, "indices or cuda_devices, not both")
        self._indices = _check_index_list(indices)
        self._cuda_devices = _check_index_list(cuda_devices)
        self.require_counter = bool(require_counter)
        self.allow_averaged_power = bool(allow_averaged_power)
        self._nvml: Any = None
        self._devices: list[_Device] = []
        self._driver_version = ""
        self._field_ids: list[int] = []
        self._nvml_error: type[BaseException] = Exception
        self._unknown_error: type[BaseException] = Exception
        self._emitted: tuple[float, dict[str, float]] = (float("-inf"), {})

    # ------------------------------------------------------------------ start / close

    def start(self) -> list[Domain]:
        """Initialise NVML, pick each device's method and record the counters' starting values.

        Raises:
            SourceUnavailable: no driver/GPU, a MIG slice, or a GPU without a usable method.
            ConfigError: an index or CUDA ordinal that does not exist (field ``gpus``).
        """
        if self._nvml is not None:
            return self.domains()
        nvml = _import_nvml()
        _init_nvml(nvml)
        self._nvml = nvml
        try:
            self._nvml_error = nvml.NVMLError
            self._unknown_error = _error_class(nvml, "NVMLError_Unknown")
            field_id = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
            self._field_ids = [field_id] if field_id is not None else []
            self._driver_version = _text(nvml.nvmlSystemGetDriverVersion())
            self._devices = [self._open(nvml, i, field_id) for i in self._select(nvml)]
            now_s = self.now_s()
            for dev in self._devices:
                self._begin(dev, now_s)
        except (SourceUnavailable, ConfigError):
            self.close()
            raise
        except SourceError as exc:
            self.close()
            raise SourceUnavailable(str(exc)) from exc
        except nvml.NVMLError as exc:
            self.close()
            raise SourceUnavailable(f"NVML failed while opening the GPUs ({exc})") from exc
        except BaseException:
            self.close()
            raise
        return self.domains()

    def _select(self, nvml: Any) -> list[int]:
        count = nvml.nvmlDeviceGetCount()
        if self._cuda_devices is not None:
            selected = _cuda_to_nvml(nvml, self._cuda_devices)
        elif self._indices is not None:
            bad = [i for i in self._indices if i >= count]
            if bad:
                allowed = f"NVML indices 0..{count - 1}" if count else "none (NVML sees no GPU)"
                raise ConfigError("gpus", self._indices, allowed)
            selected = self._indices
        else:
            selected = list(range(count))
            if not selected:
                raise SourceUnavailable("NVML sees no GPU on this machine")
        return list(dict.fromkeys(selected))

    def _open(self, nvml: Any, index: int, field_id: int | None) -> _Device:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        dev = _Device(index, handle)
        dev.name = _text(nvml.nvmlDeviceGetName(handle))
        dev.uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        dev.mig_enabled = _mig_enabled(nvml, handle)
        if _is_mig_handle(nvml, handle) or (dev.mig_enabled and self._indices is None):
            raise SourceUnavailable(_mig_message(f"GPU {index} ({dev.name}, {dev.uuid})"))
        dev.has_instant = _probe_instant(nvml, handle, field_id)
        if _probe_counter(nvml, handle):
            dev.method = "counter"
        elif self.require_counter:
            raise SourceUnavailable(
                f"GPU {index} ({dev.name}) has no NVML energy counter: counters need a Volta or newer GPU "
                "(set require_counter=False to integrate power instead)"
            )
        elif dev.has_instant:
            dev.method = "power"
        elif self.allow_averaged_power and _probe_power_usage(nvml, handle):
            dev.method = "power_avg"
        else:
            why = "" if self.allow_averaged_power else " (allow_averaged_power=False)"
            raise SourceUnavailable(
                f"GPU {index} ({dev.name}) reports neither an energy counter nor instant power{why}"
            )
        dev.power_limit_w = _power_limit_w(nvml, handle)
        dev.cap_w = (dev.power_limit_w or _FALLBACK_MAX_W) * _CAP_FACTOR
        return dev

    def _begin(self, dev: _Device, now_s: float) -> None:
        dev.energy_j = 0.0
        dev.last_read_s = now_s
        dev.window_start_s = now_s
        dev.last_change_s = now_s
        dev.integrator = PowerIntegrator()
        self._emitted = (float("-inf"), {})
        if dev.method == "counter":
            raw = self._call_counter(dev)
            dev.start_raw_mj = dev.last_raw_mj = raw
        else:
            dev.integrator.add(now_s, self._call_power_w(dev))
        # A counter slower than the sampler gets each delta shaped by instant power (sources/shaping.py).
        dev.shaper = CounterShaper(now_s, 0.0, shape=dev.method == "counter")

    def domains(self) -> list[Domain]:
        """The domains of the started devices: ``gpu{nvml_index}``."""
        return [
            Domain(
                name=f"gpu{d.index}",
                kind="gpu",
                method=d.method,
                estimated=False,
                index=d.index,
                power_limit_w=d.power_limit_w,
            )
            for d in self._devices
        ]

    def close(self) -> None:
        """Shut NVML down once; safe to call twice and after a failed ``start()``."""
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            _shutdown_nvml(nvml)

    # ------------------------------------------------------------------ read

    def _call_counter(self, dev: _Device) -> int:
        """The raw counter (mJ); an ``NVMLError_Unknown`` is retried once. Raises NVML errors."""
        nvml = self._nvml
        try:
            return nvml.nvmlDeviceGetTotalEnergyConsumption(dev.handle)
        except self._unknown_error:
            return nvml.nvmlDeviceGetTotalEnergyConsumption(dev.handle)

    def _power_mw_once(self, dev: _Device, instant: bool) -> float:
        nvml = self._nvml
        if instant:
            fv = nvml.nvmlDeviceGetFieldValues(dev.handle, self._field_ids)[0]
            if fv.nvmlReturn != _NVML_SUCCESS:
                raise nvml.NVMLError(fv.nvmlReturn)
            return _field_power_mw(fv)
        return nvml.nvmlDeviceGetPowerUsage(dev.handle)

    def _call_power_w(self, dev: _Device, instant: bool | None = None) -> float:
        """Power in W (instant field or 1-s average); ``NVMLError_Unknown`` retried once.

        Raises NVML errors.
        """
        instant = dev.method == "power" if instant is None else instant
        try:
            return self._power_mw_once(dev, instant) / 1e3
        except self._unknown_error:
            return self._power_mw_once(dev, instant) / 1e3

    def _read_failed(self, dev: _Device, exc: BaseException, now_s: float) -> str:
        """Apply the per-device failure policy; returns the note that says what happened.

        A fatal error (GPU lost, reset required, driver gone) freezes the device at its last
        reading. Any other error skips this read: counters are cumulative, so the next good read
        recovers the energy (attribution over the gap is interpolated). Errors persisting for
        ``_DEAD_AFTER_S`` freeze the device too.
        """
        code = getattr(exc, "value", None)
        if code in _FATAL_CODES:
            if code == _NVML_ERROR_GPU_IS_LOST:
                dev.dead = f"gpu{dev.index}: GPU is lost (fell off the bus?)"
            else:
                dev.dead = f"gpu{dev.index}: NVML error: {exc}"
            return f"{dev.dead}; its energy stops at the last good reading"
        if dev.fail_since_s is None:
            dev.fail_since_s = now_s
        elif now_s - dev.fail_since_s >= _DEAD_AFTER_S:
            dev.dead = f"gpu{dev.index}: NVML error: {exc} (for {_DEAD_AFTER_S:g} s)"
            return f"{dev.dead}; its energy stops at the last good reading"
        return f"gpu{dev.index}: NVML error: {exc}; reads skipped, energy over the gap interpolated"

    def _estimate_j(self, dev: _Device, now_s: float) -> float:
        """Plausible joules since the counter last moved, for a delta the counter got wrong.

        Instant power when the driver has it, else the device's recent mean power; never above
        the power limit.
        """
        power_w = dev.rate_w
        if dev.has_instant:
            try:
                power_w = self._call_power_w(dev, instant=True)
            except self._nvml_error:
                pass
        limit_w = dev.cap_w / _CAP_FACTOR
        return min(max(power_w or 0.0, 0.0), limit_w) * max(now_s - dev.last_change_s, 0.0)

    def _counter_delta_j(self, dev: _Device, raw: int, now_s: float) -> tuple[float, tuple[str, ...]]:
        """Joules since the last change of the counter, corrected for resets and implausible jumps."""
        delta_j = (raw - dev.last_raw_mj) / 1e3
        cap_j = dev.cap_w * (now_s - dev.window_start_s + _COUNTER_GRACE_S)
        if 0 <= delta_j <= cap_j:
            elapsed_s = now_s - dev.last_change_s
            if elapsed_s > 0:
                dev.rate_w = delta_j / elapsed_s
            return delta_j, ()
        if delta_j < 0 and raw / 1e3 <= cap_j:  # a reset: the counter restarted from 0 and counts since
            return raw / 1e3, (dev.reset_note,)
        # A jump the hardware cannot have drawn (or a backwards jump that is no reset): estimate.
        notes = (dev.reset_note, dev.cap_note) if delta_j < 0 else (dev.cap_note,)
        return min(self._estimate_j(dev, now_s), max(cap_j, 0.0)), notes

    def _stuck_note(self, dev: _Device, now_s: float) -> str | None:
        """A note when the counter has not moved for ``_STUCK_AFTER_S`` while instant power is > 0 W."""
        if dev.stuck_checked or not dev.has_instant or now_s - dev.last_change_s < _STUCK_AFTER_S:
            return None
        dev.stuck_checked = True  # one instant-power read per stuck stretch
        try:
            power_w = self._call_power_w(dev, instant=True)
        except self._nvml_error:
            return None
        if power_w <= 0.0:
            return None
        return (
            f"gpu{dev.index}: energy counter stopped updating for > {_STUCK_AFTER_S:g} s while instant power "
            "is above 0 W; energy is not counted while it is stuck"
        )

    def _read_device(self, dev: _Device) -> tuple[float, tuple[str, ...]]:
        """Update ``dev.energy_j``; returns the read time and any notes. Raises NVML errors."""
        if dev.method != "counter":
            power_w = self._call_power_w(dev)
            now_s = self.now_s()
            dev.energy_j = dev.integrator.add(now_s, power_w)
            return now_s, ()
        raw = self._call_counter(dev)
        now_s = self.now_s()
        notes: tuple[str, ...] = ()
        if raw != dev.last_raw_mj:
            delta_j, notes = self._counter_delta_j(dev, raw, now_s)
            dev.energy_j += delta_j
            dev.last_raw_mj = raw
            dev.last_change_s = now_s
            dev.stuck_checked = False
            # The next delta was accumulated after the previous read at the earliest.
            dev.window_start_s = dev.last_read_s
        else:
            note = self._stuck_note(dev, now_s)
            if note is not None:
                notes = (note,)
        return now_s, notes

    @property
    def wants_dither(self) -> bool:
        """True while a slow counter is shaped: the sampler then dithers its cadence (see sampler.py)."""
        return any(d.shaper.engaged for d in self._devices)

    def read_final(self) -> Reading:
        """The last reading: every device's curve is made final up to now (see :meth:`read`)."""
        return self.read(final=True)

    def _instant_or_none(self, dev: _Device) -> float | None:
        """Instant power in W for shaping a slow counter, or None (unsupported or failed: never raises)."""
        if not dev.has_instant or not dev.shaper.wants_power:
            return None
        try:
            return self._power_mw_once(dev, True) / 1e3
        except self._nvml_error:
            return None

    def _shaped(self, now_s: float, final: bool) -> Reading | None:
        """The newly final points of every device's curve, as one reading (None: nothing new)."""
        for dev in self._devices:
            if final or dev.dead is not None:
                dev.shaper.flush(now_s, tail=dev.dead is None)
        points = merge_curves([d.shaper for d in self._devices], self._emitted[0])
        if not points:
            return None
        named = [(t, {d.domain: v for d, v in zip(self._devices, values)}) for t, values in points]
        self._emitted = named[-1]
        return ShapedReading(time_s=named[-1][0], energy_j=named[-1][1], history=tuple(named[:-1]))

    def read(self, final: bool = False) -> Reading:
        """Cumulative joules per GPU since ``start()``; never decreasing.

        Per device: a counter that goes backwards to a small value is a reset; any other
        backwards or implausible forward jump (above the power limit x1.2) is replaced by an
        estimate (instant power, else recent mean power, x elapsed time); a lost GPU stops
        accruing while the others go on. Each adds a note to the reading (the meter turns it
        into an ``energy.degraded`` reason). A counter seen to update more slowly than the reads is
        shaped by instant power (:mod:`wattlog.sources.shaping`): the reading then lags by up to one
        counter period and carries the shaped points since the last one in ``history``; ``final``
        (:meth:`read_final`) makes every curve final up to now.

        Raises:
            SourceError: every device is lost. With ``transient = True`` (and ``notes``): a read
                failed even after a retry; the sampler skips this sample, so energy over the gap
                is interpolated between the good samples around it (counters lose nothing).
        """
        if self._nvml is None:
            raise SourceError("NVML source read before start() or after close()")
        notes: tuple[str, ...] = ()
        failed: list[str] = []
        energy_j: dict[str, float] = {}
        fed: list[tuple[_Device, float | None]] = []
        now_s = 0.0
        for dev in self._devices:
            if dev.dead is None:
                try:
                    now_s, dev_notes = self._read_device(dev)
                except self._nvml_error as exc:
                    note = self._read_failed(dev, exc, self.now_s())
                    if dev.dead is None:
                        failed.append(note)
                        dev_notes = ()
                    else:
                        dev_notes = (note,)
                else:
                    dev.fail_since_s = None
                    dev.last_read_s = now_s
                    fed.append((dev, self._instant_or_none(dev)))
                notes += dev_notes
            energy_j[dev.domain] = dev.energy_j
        if self._devices and all(d.dead is not None for d in self._devices):
            raise SourceError("; ".join(d.dead for d in self._devices if d.dead))
        if failed:
            error = SourceError("; ".join(failed))
            error.transient = True  # type: ignore[attr-defined]
            error.notes = (*notes, *failed)  # type: ignore[attr-defined]
            raise error
        if not self._devices:
            return Reading(time_s=self.now_s(), energy_j=energy_j, notes=notes)
        for dev, power_w in fed:  # one time per pass, so every device's curve has a point at it
            dev.shaper.add(now_s, dev.energy_j, power_w)
        shaped = self._shaped(now_s, final)
        if shaped is None:  # nothing final yet (a slow counter between updates): the last final point again
            return Reading(time_s=self._emitted[0], energy_j=dict(self._emitted[1]), notes=notes)
        return ShapedReading(time_s=shaped.time_s, energy_j=shaped.energy_j, notes=notes, history=shaped.history)

    # ------------------------------------------------------------------ provenance

    def provenance(self) -> dict[str, str]:
        """Facts about the measured GPUs (after ``start()``).

        Keys: ``gpu_model``, ``gpu_count``, ``gpu_method``, ``gpu_method_detail``, ``driver_version``,
        ``gpu_power_limit_w``, ``gpu_uuids``, ``gpu_nvml_indices``.
        """
        devs = self._devices

        def joined(values: list[str]) -> str:
            return ",".join(dict.fromkeys(values))

        details = []
        for d in devs:
            extra = "; MIG mode enabled, whole GPU measured" if d.mig_enabled else ""
            details.append(f"gpu{d.index}: {_METHOD_DETAIL.get(d.method, d.method)}{extra}")
        return {
            "gpu_model": joined([d.name for d in devs]),
            "gpu_count": str(len(devs)),
            "gpu_method": joined([d.method for d in devs]),
            "gpu_method_detail": "; ".join(details),
            "driver_version": self._driver_version,
            "gpu_power_limit_w": joined(
                [f"{d.power_limit_w:g}" if d.power_limit_w is not None else "unknown" for d in devs]
            ),
            "gpu_uuids": ",".join(d.uuid for d in devs),
            "gpu_nvml_indices": ",".join(str(d.index) for d in devs),
        }


def list_gpus() -> list[dict[str, Any]]:
    """Describe every NVML device for ``wattlog devices``.

    Returns:
        One dict per GPU: ``index``, ``name``, ``uuid``, ``counter`` (energy counter supported),
        ``instant_power`` (instant-power field supported), ``mig`` (MIG mode enabled),
        ``power_limit_w`` (None if unknown), ``method`` (what :class:`NvmlGpu` would use).

    Raises:
        SourceUnavailable: NVML cannot be used here; the message says why.
    """
    nvml = _import_nvml()
    _init_nvml(nvml)
    try:
        field_id = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            counter = _probe_counter(nvml, handle)
            instant = _probe_instant(nvml, handle, field_id)
            if counter:
                method = "counter"
            elif instant:
                method = "power"
            else:
                method = "power_avg" if _probe_power_usage(nvml, handle) else "none"
            gpus.append(
                {
                    "index": index,
                    "name": _text(nvml.nvmlDeviceGetName(handle)),
                    "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
                    "counter": counter,
                    "instant_power": instant,
                    "mig": _mig_enabled(nvml, handle),
                    "power_limit_w": _power_limit_w(nvml, handle),
                    "method": method,
                }
            )
        return gpus
    except nvml.NVMLError as exc:
        raise SourceUnavailable(f"NVML failed while listing GPUs ({exc})") from exc
    finally:
        _shutdown_nvml(nvml)
