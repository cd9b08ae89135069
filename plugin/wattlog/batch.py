"""Samples in a batch, for the batches people use (framework-free: no torch import).

:func:`count_samples` finds the leading dimension of the first array-like (anything with a
non-empty ``shape``) in a breadth-first walk of the batch: tensors and arrays; sequences (lists,
tuples, named tuples); mappings (``dict``, ``UserDict``, Hugging Face ``BatchEncoding``);
dataclasses; and plain objects through their attributes. A batch with no array-like counts as 0
samples, and the caller warns once, naming ``batch_size_fn``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

_MAX_NODES = 1000


def _children(item: Any) -> list[Any]:
    if isinstance(item, (str, bytes, bytearray)):
        return []
    if isinstance(item, Mapping) or (hasattr(item, "keys") and hasattr(item, "__getitem__")):
        try:
            return [item[k] for k in item.keys()]
        except Exception:  # noqa: BLE001 - an odd mapping-like: no children
            return []
    if isinstance(item, (list, tuple)):
        return list(item)
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return [getattr(item, f.name) for f in dataclasses.fields(item)]
    attrs = getattr(item, "__dict__", None)
    if isinstance(attrs, dict):
        return [v for k, v in attrs.items() if not k.startswith("_")]
    return []


def count_samples(batch: Any) -> int:
    """Samples in ``batch``: the leading dimension of the first array-like found (0 if none).

    Args:
        batch: whatever the dataloader yields.

    Returns:
        The number of samples, or 0 when no array-like with a leading dimension is found.
    """
    queue = [batch]
    seen = 0
    while queue and seen < _MAX_NODES:
        item = queue.pop(0)
        seen += 1
        shape = getattr(item, "shape", None)
        if shape is not None and not isinstance(item, type):
            try:
                if len(shape) > 0:
                    return int(shape[0])
            except TypeError:
                pass
            continue
        queue.extend(_children(item))
    return 0


default_batch_size = count_samples
"""Alias kept for ``batch_size_fn`` configs that name ``wattlog.integrations.lightning.default_batch_size``."""
