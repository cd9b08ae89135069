"""wattlog: per-step energy, power and CO2e of ML training, logged into MLflow.

Importing this package is cheap: it imports no torch, lightning, mlflow or hydra and touches
no hardware. ``EnergyMonitor``, ``track`` and ``autolog`` are loaded on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wattlog.errors import ConfigError, SourceError, SourceUnavailable, WattlogError
from wattlog.meter import EnergyMeter, Segment

__version__ = "0.1.0.dev0"
__all__ = [
    "ConfigError",
    "EnergyMeter",
    "EnergyMonitor",
    "Segment",
    "SourceError",
    "SourceUnavailable",
    "WattlogError",
    "__version__",
    "autolog",
    "track",
]

if TYPE_CHECKING:  # pragma: no cover
    from wattlog.integrations.autolog import autolog
    from wattlog.integrations.lightning import EnergyMonitor
    from wattlog.integrations.track import track


def __getattr__(name: str) -> Any:
    if name == "EnergyMonitor":
        from wattlog.integrations.lightning import EnergyMonitor

        return EnergyMonitor
    if name == "track":
        from wattlog.integrations.track import track

        return track
    if name == "autolog":
        from wattlog.integrations.autolog import autolog

        return autolog
    raise AttributeError(f"module 'wattlog' has no attribute {name!r}")
