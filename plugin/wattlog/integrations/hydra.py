"""Hydra integration: the ``energy`` structured config, ``instantiate_energy`` and sweep-aware MLflow runs.

A Hydra app gets energy logging with one defaults line and one call::

    # conf/app.yaml
    defaults:
      - energy: default        # or estimate | nvml | "off" (quote off: it is a YAML boolean)
      - _self_

    # app.py
    trainer = Trainer(logger=make_mlflow_logger(cfg), callbacks=[*instantiate_energy(cfg)])

The packaged options (``default``, ``nvml``, ``estimate``, ``off``) extend :class:`EnergyConfig`
through their defaults lists, so a bad value fails at composition, before training, with a
message naming the field (``energy.cpu``) and the allowed values.

Importing this module imports Hydra and OmegaConf only (no torch, lightning or mlflow): the
SearchPathPlugin imports it at every Hydra app start.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wattlog.errors import ConfigError
from wattlog.integrations.hydra_sweep import (
    DEFAULT_TRACKING_URI,
    SWEEP_CALLBACK_TARGET,
    SWEEP_FILE,
    EnergySweepCallback,
    overrides_as_params,
    read_sweep_file,
)

__all__ = [
    "SWEEP_FILE",
    "EnergyConfig",
    "EnergySweepCallback",
    "HostSource",
    "TargetConfig",
    "TargetMode",
    "energy_kwargs",
    "instantiate_energy",
    "job_overrides",
    "make_mlflow_logger",
    "mlflow_run_kwargs",
    "overrides_as_params",
    "register_configs",
    "sweep_info",
]

SCHEMA_GROUP = "wattlog_schema"
SCHEMA_NAME = "energy"
_GPUS_ALLOWED = "'auto', 'none', or a list of CUDA device ordinals such as [0, 1]"


class HostSource(Enum):
    """How CPU or RAM energy is measured."""

    auto = "auto"
    rapl = "rapl"
    estimate = "estimate"
    none = "none"


class TargetMode(Enum):
    """Whether the target metric is reached from below (``max``) or from above (``min``)."""

    max = "max"
    min = "min"


class Scope(Enum):
    """What the CPU/RAM estimates bill to the run."""

    process = "process"
    system = "system"


@dataclass
class TargetConfig:
    """``energy.target``: report ``energy/j_to_target`` when ``metric`` first reaches ``value``.

    ``metric: null`` (the default) means no target.
    """

    metric: Optional[str] = None
    value: Optional[float] = None
    mode: TargetMode = TargetMode.max


_SCHEMA_TYPES: dict[str, Any] = {
    "cpu": (HostSource, HostSource.auto), "ram": (HostSource, HostSource.auto), "cpu_scope": (Scope, Scope.process),
    "gpus": (Any, "auto"), "batch_size_fn": (Optional[str], None),
}
_FLAT_CARBON = {"country": "country", "region": "region", "carbon_intensity": "intensity_g_per_kwh", "pue": "pue"}


def _derive_schema() -> type:
    """``EnergyConfig``: one field per :class:`wattlog.options.MonitorOptions` field (plus ``_target_``).

    The carbon group is flattened into ``EnergyMonitor``'s flat argument names (``energy.country``,
    ``energy.region``, ``energy.carbon_intensity``, ``energy.pue``); choices become enums, so a bad
    value fails at composition with the allowed values.
    """
    import dataclasses

    from wattlog.options import CarbonOptions, MonitorOptions

    carbon_defaults = CarbonOptions()
    spec: list[tuple[str, Any, Any]] = [("_target_", str, field(default="wattlog.EnergyMonitor"))]
    for f in dataclasses.fields(MonitorOptions):
        if f.name == "carbon":
            for flat, grouped in _FLAT_CARBON.items():
                ctype = next(c.type for c in dataclasses.fields(CarbonOptions) if c.name == grouped)
                spec.append((flat, ctype, field(default=getattr(carbon_defaults, grouped))))
        elif f.name == "target":
            spec.append(("target", TargetConfig, field(default_factory=TargetConfig)))
        elif f.name in _SCHEMA_TYPES:
            ftype, default = _SCHEMA_TYPES[f.name]
            spec.append((f.name, ftype, field(default=default)))
        else:
            spec.append((f.name, f.type, field(default=f.default)))
    schema = dataclasses.make_dataclass("EnergyConfig", spec)
    schema.__doc__ = (
        "Schema of the ``energy`` node, derived from :class:`wattlog.options.MonitorOptions` (every "
        "``EnergyMonitor`` argument). ``enabled: false`` (the ``off`` option) is a no-op monitor, and "
        "makes :func:`instantiate_energy` return ``[]``.")
    schema.__module__ = __name__
    return schema


EnergyConfig = _derive_schema()


def register_configs() -> None:
    """Store :class:`EnergyConfig` in Hydra's ConfigStore as ``wattlog_schema/energy``.

    Idempotent. The packaged ``energy/*.yaml`` options list it first in their defaults list
    (``/wattlog_schema/energy@_here_``), so the schema validates them and every override.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=SCHEMA_GROUP, name=SCHEMA_NAME, node=EnergyConfig, provider="wattlog")


def _energy_node(cfg: Any) -> Any:
    """The ``energy`` node of an app config, or ``cfg`` itself when it already is one."""
    if cfg is None:
        return None
    if not isinstance(cfg, (Mapping, DictConfig)):
        raise ConfigError("energy", cfg, "a config mapping (the app's cfg or its energy node)")
    if "energy" in cfg:
        return cfg["energy"]
    if "_target_" in cfg or "enabled" in cfg:
        return cfg
    raise ConfigError(
        "energy", "<missing>", "a config with an `energy` node: add `- energy: default` to defaults"
    )


def _validated(node: Any) -> DictConfig:
    """Merge ``node`` onto the schema, turning OmegaConf errors into ConfigError."""
    schema = OmegaConf.structured(EnergyConfig)
    try:
        merged = OmegaConf.merge(schema, node)
        OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
        key = str(key)
        full = key if key.startswith("energy") else f"energy.{key}"
        raise ConfigError(full, getattr(exc, "value", None), _allowed_for(key, exc)) from exc
    assert isinstance(merged, DictConfig)
    return merged


def _allowed_for(key: str, exc: Exception) -> str:
    """Allowed values of a schema field, for error messages."""
    leaf = key.rsplit(".", 1)[-1]
    enum_type = {"cpu": HostSource, "ram": HostSource, "cpu_scope": Scope, "mode": TargetMode}.get(leaf)
    if enum_type is not None:
        return ", ".join(repr(m.name) for m in enum_type)
    if leaf == "gpus":
        return _GPUS_ALLOWED
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"a value of the schema's type ({first_line})"


def _check_gpus(value: Any) -> str | list[int]:
    """``energy.gpus`` as ``auto`` / ``none`` / list of non-negative ints (a bare int means ``[int]``)."""
    if isinstance(value, str) and value in ("auto", "none"):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return [value]
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        return list(value)
    raise ConfigError("energy.gpus", value, _GPUS_ALLOWED)


def _check_target(target: dict[str, Any]) -> dict[str, Any] | None:
    """``energy.target`` as the ``EnergyMonitor`` dict, or None when no metric is set."""
    if target.get("metric") is None:
        if target.get("value") is not None:
            raise ConfigError("energy.target.metric", None, "the name of a logged metric, e.g. 'val_acc'")
        return None
    if not str(target["metric"]).strip():
        allowed = "the name of a logged metric, e.g. 'val_acc'"
        raise ConfigError("energy.target.metric", target["metric"], allowed)
    value = target.get("value")
    if value is None or not math.isfinite(float(value)):
        raise ConfigError("energy.target.value", value, "the finite metric value to reach, e.g. 0.85")
    return {"metric": target["metric"], "value": float(value), "mode": target["mode"]}


def energy_kwargs(cfg: Any) -> dict[str, Any] | None:
    """Validated ``EnergyMonitor`` keyword arguments (with ``_target_``), or None when disabled.

    Args:
        cfg: the app's whole config (its ``energy`` node is read) or the energy node itself.

    Raises:
        ConfigError: a field has a bad value; the message names ``energy.<field>``.
    """
    node = _energy_node(cfg)
    if node is None:
        return None
    merged = _validated(node)
    kwargs = OmegaConf.to_container(merged, resolve=True, enum_to_str=True)
    assert isinstance(kwargs, dict)
    if not kwargs.pop("enabled"):
        return None
    kwargs["gpus"] = _check_gpus(kwargs["gpus"])
    kwargs["target"] = _check_target(kwargs["target"])
    for name in ("country", "region", "spool_dir"):  # null means "not set"; an empty string is a mistake
        if kwargs.get(name) is not None and not str(kwargs[name]).strip():
            raise ConfigError(f"energy.{name}", kwargs[name], "null (unset) or a non-empty string")
    path = kwargs.get("batch_size_fn")
    if path is not None:
        kwargs["batch_size_fn"] = _import_callable(path, "energy.batch_size_fn")
    return kwargs


def _import_callable(path: str, field: str) -> Any:
    """The callable at dotted ``path``; ConfigError naming ``field`` otherwise (no stderr noise, unlike Hydra)."""
    from wattlog.options import import_callable

    return import_callable(path, field)


def instantiate_energy(cfg: Any) -> list[Any]:
    """Build the energy callbacks an app passes to ``Trainer(callbacks=...)``.

    The contract: always a list, so ``callbacks=[*instantiate_energy(cfg), ...]`` works in every
    case. ``[]`` for ``energy=off`` (``enabled: false``) or ``energy: null``; otherwise
    ``[EnergyMonitor(...)]`` built from ``_target_`` (default ``wattlog.EnergyMonitor``).

    Args:
        cfg: the app's whole config (its ``energy`` node is read) or the energy node itself.

    Returns:
        The callbacks: empty when energy is off.

    Raises:
        ConfigError: bad configuration (field, value and allowed values in the message).
    """
    register_configs()
    kwargs = energy_kwargs(cfg)
    if kwargs is None:
        return []
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = kwargs.pop("_target_")
    try:
        factory = instantiate({"_target_": target, "_partial_": True})
    except InstantiationException as exc:
        allowed = "an importable callback class, e.g. 'wattlog.EnergyMonitor'"
        raise ConfigError("energy._target_", target, allowed) from exc
    try:
        return [factory(**kwargs)]
    except ConfigError as exc:  # name the field as the user wrote it: energy.<field>
        field = exc.field if exc.field.startswith("energy.") else f"energy.{exc.field}"
        raise ConfigError(field, exc.value, exc.allowed) from None


# ---------------------------------------------------------------- sweep-aware MLflow runs of a job


def _hydra_config() -> DictConfig | None:
    """The running job's ``hydra`` node, or None outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get()


def _in_energy_sweep(hc: DictConfig) -> bool:
    from wattlog.integrations.sweep_context import in_energy_sweep

    return in_energy_sweep(hc)


def _sweep_dir(hc: DictConfig) -> Path:
    from wattlog.integrations.sweep_context import sweep_dir_of

    return sweep_dir_of(hc)


def sweep_info() -> dict[str, Any] | None:
    """The energy sweep this job belongs to, read from ``<hydra.sweep.dir>/.wattlog/sweep.json``.

    The file is written by :class:`EnergySweepCallback` on the launching machine and found from
    the job's own Hydra config, so it works for jobs in other processes (joblib) or on other hosts
    sharing the sweep dir (submitit). It holds no credentials (its ``tracking_uri`` is redacted). None
    outside a multirun, without the callback, or when the file is absent (the parent run could not
    be opened).
    """
    hc = _hydra_config()
    if hc is None or not _in_energy_sweep(hc):
        return None
    return read_sweep_file(_sweep_dir(hc) / SWEEP_FILE)


def job_overrides() -> list[str]:
    """The running job's task overrides (``hydra.overrides.task``), e.g. ``["model.lr=0.1"]``; not redacted."""
    hc = _hydra_config()
    if hc is None:
        return []
    return [str(o) for o in hc.overrides.task]


def _cfg_get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, DictConfig):
        return OmegaConf.select(cfg, key, default=None)
    return _dict_select(cfg, key)


def _dict_select(cfg: Mapping, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def mlflow_run_kwargs(
    cfg: Any = None,
    *,
    experiment_name: str | None = None,
    run_name: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments of a job's ``MLFlowLogger``, linking it to its energy sweep.

    A convenience: any ``MLFlowLogger`` joins the sweep through its ``EnergyMonitor``; this one also
    gets a short run name and the sweep's experiment. Outside a sweep, and for the tracking URI inside
    one: the explicit argument, then ``cfg.mlflow.{experiment_name,tracking_uri,run_name}``, then
    ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_TRACKING_URI``, then ``Default`` / ``sqlite:///mlflow.db``.
    Inside a sweep run with :class:`EnergySweepCallback`, the sweep's experiment wins (children must
    share the parent's experiment to nest under it in the UI), and so does the sweep's tracking URI
    when it holds no credentials (a credentialed one is not stored in the sweep file: the job's own
    config or environment gives it).

    Returns:
        ``{"experiment_name", "tracking_uri", "run_name", "tags"}``, usable as
        ``MLFlowLogger(**kwargs)``. In a sweep the tags are those of
        :func:`wattlog.integrations.sweep_context.sweep_link_tags` (``mlflow.parentRunId``,
        ``energy.sweep_id``, ``energy.sweep_job``, ``energy.overrides``) and the run name the job's
        differing override values (``8 0.01``); outside, ``energy.overrides`` when Hydra has overrides.
    """
    from wattlog.integrations.sweep_context import T_OVERRIDES, current_sweep, redacted_overrides_json
    from wattlog.integrations.sweep_context import run_name as short_run_name
    from wattlog.integrations.sweep_context import sweep_link_tags

    experiment_name = (
        experiment_name
        or _cfg_get(cfg, "mlflow.experiment_name")
        or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        or "Default"
    )
    tracking_uri = tracking_uri or _cfg_get(cfg, "mlflow.tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    run_name = run_name or _cfg_get(cfg, "mlflow.run_name")
    tags: dict[str, str] = {}
    overrides = job_overrides()
    if overrides:
        tags[T_OVERRIDES] = redacted_overrides_json(overrides)
    info = current_sweep()
    if info is not None:
        if info.get("tracking_uri") and not info.get("tracking_uri_redacted", True):
            tracking_uri = info["tracking_uri"]
        experiment_name = info["experiment_name"]
        tags.update(sweep_link_tags())
        if run_name is None:
            run_name = short_run_name(overrides, info.get("overrides") or [], info.get("job_num"))
    return {
        "experiment_name": experiment_name,
        "tracking_uri": tracking_uri or DEFAULT_TRACKING_URI,
        "run_name": run_name,
        "tags": tags,
    }


def make_mlflow_logger(
    cfg: Any = None,
    *,
    experiment_name: str | None = None,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    **logger_kwargs: Any,
) -> Any:
    """A Lightning ``MLFlowLogger`` for this job: a child of the energy sweep's parent run when in one.

    A convenience, not a requirement: an ``EnergyMonitor`` links any ``MLFlowLogger`` to the sweep.
    Logs the job's overrides as params under ``override.`` (``train.max_epochs=2`` -> param
    ``override.train.max_epochs``), redacted. Arguments as :func:`mlflow_run_kwargs`; ``logger_kwargs``
    go to ``MLFlowLogger`` (``tags`` are merged with the sweep's tags, which win).
    """
    try:
        from lightning.pytorch.loggers import MLFlowLogger
    except ImportError:  # pragma: no cover - the pytorch_lightning package only
        from pytorch_lightning.loggers import MLFlowLogger

    from wattlog.integrations.sweep_context import override_params

    kwargs = mlflow_run_kwargs(
        cfg, experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri
    )
    user_tags = dict(logger_kwargs.pop("tags", None) or {})
    kwargs["tags"] = {**user_tags, **(kwargs.get("tags") or {})}  # the sweep's own tags win
    logger = MLFlowLogger(**kwargs, **logger_kwargs)
    params = override_params(job_overrides())
    if params:
        logger.log_hyperparams(params)
    return logger
