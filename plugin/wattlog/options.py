"""Every monitor option in one dataclass, validated once; the Hydra schema is derived from it.

``EnergyMonitor(**kwargs)``, ``wattlog.track(**kwargs)`` and the Hydra ``energy`` group all build a
:class:`MonitorOptions` with :meth:`MonitorOptions.from_kwargs`. Bad values raise
:class:`~wattlog.errors.ConfigError` naming the field, the value and what is allowed, before any
hardware is touched. No third-party imports (plain dataclasses: Hydra reads them as structured configs).
"""

# No ``from __future__ import annotations``: OmegaConf reads these annotations as real types.
import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from wattlog.errors import ConfigError

CPU_RAM_CHOICES = ("auto", "rapl", "estimate", "none")
SCOPES = ("process", "system")
MODES = ("max", "min")
_GPUS_ALLOWED = "'auto', 'none', or a non-empty list of distinct CUDA device indices >= 0, e.g. [0, 1]"


@dataclass
class CarbonOptions:
    """Where the energy is drawn: for ``energy/emissions_g``.

    Attributes:
        country: ISO3 country (``FRA``), or None for the world average.
        region: US state, Canadian province or Nordic zone within ``country``.
        intensity_g_per_kwh: gCO2e/kWh; overrides the lookup.
        pue: data-centre power usage effectiveness (>= 1).
    """

    country: Optional[str] = None
    region: Optional[str] = None
    intensity_g_per_kwh: Optional[float] = None
    pue: float = 1.0


@dataclass
class TargetOptions:
    """Log ``energy/j_to_target``: the energy spent until ``metric`` first reached ``value``.

    ``metric: None`` (the default) means no target.
    """

    metric: Optional[str] = None
    value: Optional[float] = None
    mode: str = "max"


@dataclass
class MonitorOptions:
    """Every option of the energy monitor (see the README's option table).

    Attributes:
        enabled: False makes the monitor a no-op (the Hydra ``energy=off`` preset).
        gpus: ``"auto"`` (the GPUs this process trains on), ``"none"``, or CUDA device indices.
        cpu, ram: ``"auto"`` (RAPL, else estimate), ``"rapl"``, ``"estimate"`` or ``"none"``.
        cpu_scope: what the CPU/RAM estimates bill to the run: ``"process"`` (this process tree,
            dataloader workers included) or ``"system"`` (the whole machine).
        carbon: see :class:`CarbonOptions`.
        log_every_n_steps: a point every n train steps (None: the trainer's own setting).
        sample_interval_s: the sampler's cadence.
        sync_cuda: synchronise CUDA at logging boundaries for exact windows.
        per_device: also log ``energy/gpu{i}_power_w``.
        target: see :class:`TargetOptions`.
        idle_baseline_s: measure idle power this long before fit (``energy/dynamic_j``).
        progress_bar: show live power and energy in the progress bar.
        batch_size_fn: ``batch -> samples``; default
            :func:`wattlog.batch.count_samples`.
        require_gpu_counter: fail unless every GPU has NVML's energy counter.
        require_mlflow: fail (instead of warning) when there is no MLflow run to log into.
        spool_dir: where points are spooled (default ``$WATTLOG_SPOOL_DIR`` or
            ``<default_root_dir>/.wattlog/spool``).
        artifacts: log ``energy/trace.csv`` and ``energy/power.png``.
        powercap_root: the powercap sysfs root (tests use a fake tree).
        collective_timeout_s: timeout of wattlog's own DDP collectives.
        delivery_timeout_s: how long the end of a stage waits for MLflow to receive what was
            logged; the rest stays in the spool for ``wattlog sync``.
    """

    enabled: bool = True
    gpus: Any = "auto"
    cpu: str = "auto"
    ram: str = "auto"
    cpu_scope: str = "process"
    carbon: CarbonOptions = field(default_factory=CarbonOptions)
    log_every_n_steps: Optional[int] = None
    sample_interval_s: float = 0.02
    sync_cuda: bool = False
    per_device: bool = False
    target: TargetOptions = field(default_factory=TargetOptions)
    idle_baseline_s: float = 0.0
    progress_bar: bool = True
    batch_size_fn: Any = None
    require_gpu_counter: bool = False
    require_mlflow: bool = False
    spool_dir: Optional[str] = None
    artifacts: bool = True
    powercap_root: str = "/sys/class/powercap"
    collective_timeout_s: float = 120.0
    delivery_timeout_s: float = 30.0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "MonitorOptions":
        """Options from keyword arguments, validated.

        Accepts the grouped form (``carbon={...}``, ``target={...}``) and the flat carbon
        arguments ``country``, ``region``, ``carbon_intensity`` and ``pue``; ``target`` may also be a
        ``(metric, value[, mode])`` tuple.

        Raises:
            ConfigError: an unknown argument or a bad value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        carbon = _as_dict(kwargs.pop("carbon", None), "carbon")
        for flat, grouped in (("country", "country"), ("region", "region"),
                              ("carbon_intensity", "intensity_g_per_kwh"), ("pue", "pue")):
            if flat in kwargs:
                carbon[grouped] = kwargs.pop(flat)
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(unknown[0], kwargs[unknown[0]], "one of " + ", ".join(sorted(names)))
        carbon_fields = {f.name for f in dataclasses.fields(CarbonOptions)}
        if set(carbon) - carbon_fields:
            bad = sorted(set(carbon) - carbon_fields)[0]
            raise ConfigError(f"carbon.{bad}", carbon[bad], ", ".join(sorted(carbon_fields)))
        options = cls(**kwargs, carbon=CarbonOptions(**carbon))
        options.target = _target(kwargs.get("target"))
        options.validate()
        return options

    def validate(self) -> None:
        """Raise ConfigError for the first bad field; normalise enum-like and list-like values."""
        self.gpus = _gpus(self.gpus)
        for name in ("cpu", "ram"):
            setattr(self, name, _choice(name, getattr(self, name), CPU_RAM_CHOICES))
        self.cpu_scope = _choice("cpu_scope", self.cpu_scope, SCOPES)
        c = self.carbon
        for name in ("country", "region"):
            value = getattr(c, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ConfigError(name, value, "None or a non-empty string")
        _number("carbon_intensity", c.intensity_g_per_kwh, 0.0, allow_none=True)
        _number("pue", c.pue, 1.0, 10.0)
        c.pue = float(c.pue)
        if self.log_every_n_steps is not None and not (
            isinstance(self.log_every_n_steps, int) and not isinstance(self.log_every_n_steps, bool)
            and self.log_every_n_steps >= 1
        ):
            raise ConfigError("log_every_n_steps", self.log_every_n_steps, "None or an integer >= 1")
        for name, low, high in (("sample_interval_s", 0.001, 10.0), ("idle_baseline_s", 0.0, 3600.0),
                                ("collective_timeout_s", 1.0, 86400.0), ("delivery_timeout_s", 0.0, 86400.0)):
            _number(name, getattr(self, name), low, high)
            setattr(self, name, float(getattr(self, name)))
        for name in ("enabled", "sync_cuda", "per_device", "progress_bar", "require_gpu_counter",
                     "require_mlflow", "artifacts"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "True or False")
        for name, value in (("spool_dir", self.spool_dir), ("powercap_root", self.powercap_root)):
            if value is None and name == "spool_dir":
                continue
            if not (isinstance(value, (str, os.PathLike)) and os.fspath(value)):
                raise ConfigError(name, value, ("None or " if name == "spool_dir" else "") + "a non-empty path")
        self.batch_size_fn = _callable(self.batch_size_fn)

    def count_samples(self) -> Callable[[Any], int]:
        """The batch-size function in effect."""
        if self.batch_size_fn is not None:
            return self.batch_size_fn
        from wattlog.batch import SampleCounter

        return SampleCounter()


def _as_dict(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "items"):
        return dict(value.items())
    raise ConfigError(name, value, "None or a mapping")


def _enum_name(value: Any) -> Any:
    return getattr(value, "name", value) if type(value).__module__ != "builtins" else value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    value = _enum_name(value)
    if value not in allowed:
        raise ConfigError(name, value, allowed)
    return value


def _gpus(value: Any) -> Any:
    if isinstance(value, str):
        if value in ("auto", "none"):
            return value
        raise ConfigError("gpus", value, _GPUS_ALLOWED)
    if not isinstance(value, (bytes, bytearray)) and hasattr(value, "__iter__"):  # list, tuple, ListConfig
        items = list(value)
        if items and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items) and len(
            set(items)
        ) == len(items):
            return items
    raise ConfigError("gpus", value, _GPUS_ALLOWED)


def _number(name: str, value: Any, low: float, high: float = math.inf, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low <= value <= high):
        raise ConfigError(name, value, f"a number in [{low:g}, {high:g}]" + (" or None" if allow_none else ""))


def _target(target: Any) -> TargetOptions:
    if target is None:
        return TargetOptions()
    if isinstance(target, TargetOptions):
        target = dataclasses.asdict(target)
    if isinstance(target, (list, tuple)) and len(target) in (2, 3):
        target = dict(zip(("metric", "value", "mode"), target))
    if not hasattr(target, "items"):
        raise ConfigError("target", target, "None or {'metric': name, 'value': number, 'mode': 'max'|'min'}")
    target = dict(target.items())
    unknown = set(target) - {"metric", "value", "mode"}
    if unknown:
        raise ConfigError(f"target.{sorted(unknown)[0]}", target[sorted(unknown)[0]], "metric, value, mode")
    mode = _choice("target.mode", target.get("mode", "max"), MODES)
    metric, value = target.get("metric"), target.get("value")
    if metric is None and value is None:
        return TargetOptions(mode=mode)
    if "metric" not in target or "value" not in target:
        raise ConfigError("target", target, "None or {'metric': name, 'value': number, 'mode': 'max'|'min'}")
    if not (isinstance(metric, str) and metric.strip()):
        raise ConfigError("target.metric", metric, "the name of a logged metric, e.g. 'val_acc'")
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ConfigError("target.value", value, "a finite number")
    return TargetOptions(metric, float(value), mode)


def _callable(fn: Any) -> Any:
    if fn is None or callable(fn):
        return fn
    raise ConfigError("batch_size_fn", fn, "None or a callable(batch) -> int (Hydra configs give its dotted path)")


def import_callable(path: str, field_name: str) -> Any:
    """The callable at dotted ``path`` (``pkg.module.fn``); ConfigError naming ``field_name`` otherwise."""
    import importlib

    allowed = "the dotted path of a callable batch -> int, e.g. 'mypkg.data.batch_size'"
    parts = str(path).split(".")
    if len(parts) == 1:
        import builtins

        obj = getattr(builtins, parts[0], None) if parts[0] else None
        if callable(obj):
            return obj
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        except Exception as exc:  # noqa: BLE001 - the user's module failed to import: say which
            raise ConfigError(field_name, path, f"{allowed} (importing it raised {type(exc).__name__}: {exc})") from exc
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        if callable(obj):
            return obj
        break
    raise ConfigError(field_name, path, allowed)
