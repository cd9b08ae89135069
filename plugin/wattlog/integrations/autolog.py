"""``wattlog.autolog()``: the energy integration in every Lightning and Hugging Face ``Trainer`` created afterwards.

MLflow-style: ``wattlog.autolog(**options)`` wraps ``__init__`` of ``lightning.pytorch.Trainer``,
``pytorch_lightning.Trainer`` and ``transformers.Trainer`` (each only when installed; subclasses such
as ``Seq2SeqTrainer`` included). A Lightning trainer gets an :class:`~wattlog.EnergyMonitor`, an HF
trainer an :class:`~wattlog.integrations.transformers.EnergyCallback`, unless it already has one.
``wattlog.autolog(disable=True)`` restores the original ``__init__``. The state lives on the classes
themselves (the wrapper keeps the original), not in this module. Logged keys: those of the callbacks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any, Callable

from wattlog.options import MonitorOptions

ORIGINAL = "__wattlog_original__"
TARGETS = (("lightning.pytorch", "lightning"), ("pytorch_lightning", "lightning"), ("transformers", "transformers"))
"""(module of a ``Trainer`` class, which integration it gets)."""


def autolog(disable: bool = False, **options: Any) -> list[str]:
    """Add energy logging to every Lightning / HF ``Trainer`` created from now on.

    Args:
        disable: True undoes an earlier ``autolog()``.
        **options: the callbacks' options (:class:`wattlog.options.MonitorOptions`); validated now.

    Returns:
        The patched (or, with ``disable=True``, restored) classes, as ``"module.Trainer"``.

    Raises:
        ConfigError: a bad option.
    """
    if not disable:
        MonitorOptions.from_kwargs(**options)  # fail now, not at the first Trainer
    done = []
    for module_name, kind in TARGETS:
        cls = _trainer_class(module_name)
        if cls is None:
            continue
        _restore(cls)
        if not disable:
            _patch(cls, _lightning_hook if kind == "lightning" else _transformers_hook, options)
        done.append(f"{module_name}.Trainer")
    return done


def _trainer_class(module_name: str) -> type | None:
    """The module's ``Trainer`` when the package is installed (imported only then), else None."""
    try:
        if importlib.util.find_spec(module_name.split(".")[0]) is None:
            return None
        return getattr(importlib.import_module(module_name), "Trainer", None)
    except ImportError:  # installed but broken (e.g. transformers without torch): nothing to patch
        return None


def _restore(cls: type) -> None:
    original = getattr(cls.__dict__.get("__init__"), ORIGINAL, None)
    if original is not None:
        cls.__init__ = original  # type: ignore[misc]


def _patch(cls: type, hook: Callable[..., Any], options: dict[str, Any]) -> None:
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        hook(original, self, args, kwargs, options)

    setattr(__init__, ORIGINAL, original)
    cls.__init__ = __init__  # type: ignore[misc]


def _lightning_hook(original: Callable[..., Any], trainer: Any, args: tuple, kwargs: dict, options: dict) -> None:
    """Add an EnergyMonitor to ``callbacks`` before Lightning sorts them (checkpoints stay last)."""
    from wattlog.integrations.lightning import EnergyMonitor

    callbacks = kwargs.get("callbacks")
    callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if not any(isinstance(cb, EnergyMonitor) for cb in callbacks):
        kwargs["callbacks"] = [*callbacks, EnergyMonitor(**options)]
    original(trainer, *args, **kwargs)


def _transformers_hook(original: Callable[..., Any], trainer: Any, args: tuple, kwargs: dict, options: dict) -> None:
    """Add an EnergyCallback after the Trainer's own callbacks (so its MLflowCallback opens the run first)."""
    from wattlog.integrations.transformers import EnergyCallback

    original(trainer, *args, **kwargs)
    if not any(isinstance(cb, EnergyCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(EnergyCallback(**options))
