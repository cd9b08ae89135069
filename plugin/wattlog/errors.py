"""The wattlog error hierarchy and the strict-mode switch. No third-party imports.

Failure policy (see DESIGN.md): a measurement or sink failure during training degrades
that part and warns once; with ``WATTLOG_STRICT=1`` it raises instead. Bad configuration
always raises :class:`ConfigError` before training starts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable


class WattlogError(Exception):
    """Base class of every error wattlog raises."""


class ConfigError(WattlogError, ValueError):
    """Bad configuration: the message names the field, the bad value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: Iterable[object] | str) -> None:
        allowed_text = allowed if isinstance(allowed, str) else ", ".join(repr(a) for a in allowed)
        super().__init__(f"{field}={value!r} is not valid; allowed: {allowed_text}")
        self.field = field
        self.value = value
        self.allowed = allowed_text


class SourceUnavailable(WattlogError):
    """An energy source cannot be opened on this machine; the message says why and how to fix it."""


class SourceError(WattlogError):
    """An energy source failed while measuring (for example a GPU fell off the bus)."""


class SinkError(WattlogError):
    """Writing points to a tracker failed."""


class NoRunError(WattlogError):
    """There is no MLflow run to log into."""


class WattlogWarning(UserWarning):
    """Warnings about degraded measurements or delayed delivery."""


def strict_mode() -> bool:
    """True when ``WATTLOG_STRICT`` is set to a true value (1, true, yes, on)."""
    return os.environ.get("WATTLOG_STRICT", "").strip().lower() in {"1", "true", "yes", "on"}


def degrade(reason: str, exc: BaseException | None = None, *, error: type[WattlogError] = SourceError) -> None:
    """Apply the failure policy: raise in strict mode, else warn with ``reason``.

    Callers are responsible for warning only once per reason.
    """
    if strict_mode():
        if exc is not None and isinstance(exc, WattlogError):
            raise exc
        raise error(reason) from exc
    warnings.warn(f"wattlog: {reason}", WattlogWarning, stacklevel=3)
