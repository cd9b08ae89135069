"""wattlog: per-step energy, power and CO2e of ML training, logged into MLflow.

Importing this package is cheap: it imports no torch, lightning, mlflow or hydra and touches
no hardware. ``EnergyMonitor`` is loaded on first attribute access.
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
]

if TYPE_CHECKING:  # pragma: no cover
    from wattlog.integrations.lightning import EnergyMonitor


def __getattr__(name: str) -> Any:
    if name == "EnergyMonitor":
        from wattlog.integrations.lightning import EnergyMonitor

        return EnergyMonitor
    raise AttributeError(f"module 'wattlog' has no attribute {name!r}")
