"""Samples in a batch, for the batches people use (framework-free: no torch import).

:func:`count_samples` finds the leading dimension of the first array-like (anything with a
non-empty ``shape``) in a breadth-first walk of the batch: tensors and arrays; sequences (lists,
tuples, named tuples); mappings (``dict``, ``UserDict``, Hugging Face ``BatchEncoding``);
dataclasses; and plain objects through their attributes. A batch with no array-like counts as 0
samples, and the caller warns once, naming ``batch_size_fn``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any

_MAX_NODES = 1000


def _children_paths(item: Any) -> list[tuple[Any, tuple[str, Any]]]:
    """``(child, how to reach it from item)``: values of mappings, items of sequences, fields of
    dataclasses, public attributes of plain objects."""
    if isinstance(item, (str, bytes, bytearray)):
        return []
    if isinstance(item, Mapping) or (hasattr(item, "keys") and hasattr(item, "__getitem__")):
        try:
            return [(item[k], ("key", k)) for k in item.keys()]
        except Exception:  # noqa: BLE001 - an odd mapping-like: no children
            return []
    if isinstance(item, (list, tuple)):
        return [(v, ("key", i)) for i, v in enumerate(item)]
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return [(getattr(item, f.name), ("attr", f.name)) for f in dataclasses.fields(item)]
    attrs = getattr(item, "__dict__", None)
    if isinstance(attrs, dict):
        return [(v, ("attr", k)) for k, v in attrs.items() if not k.startswith("_")]
    return []


def _leading_dim(item: Any) -> int | None:
    shape = getattr(item, "shape", None)
    if shape is None or isinstance(item, type):
        return None
    try:
        return int(shape[0]) if len(shape) > 0 else -1
    except TypeError:
        return -1


def _walk(batch: Any) -> tuple[int, tuple[tuple[str, Any], ...] | None]:
    """Breadth-first: the first array-like's leading dimension and its path (``(0, None)`` if none)."""
    queue: list[tuple[Any, tuple[tuple[str, Any], ...]]] = [(batch, ())]
    seen = 0
    while queue and seen < _MAX_NODES:
        item, path = queue.pop(0)
        seen += 1
        n = _leading_dim(item)
        if n is not None:
            if n >= 0:
                return n, path
            continue  # a shape without a leading dimension: a leaf, not counted
        queue.extend((child, path + (step,)) for child, step in _children_paths(item))
    return 0, None


def count_samples(batch: Any) -> int:
    """Samples in ``batch``: the leading dimension of the first array-like found (0 if none).

    Args:
        batch: whatever the dataloader yields.

    Returns:
        The number of samples, or 0 when no array-like with a leading dimension is found.
    """
    return _walk(batch)[0]


class SampleCounter:
    """:func:`count_samples` for one loop: it remembers where the first batch of each type held its
    array-like, and of which type that was, and reads later batches there first (a lookup or two and
    ``shape[0]``: well under a microsecond, instead of a walk; not ``len()``, which is Python code on a
    torch tensor), walking again whenever that place holds something else. (A mapping whose keys come
    in another order than in the first batch is still read at the first batch's key: the entries of
    one batch share their leading dimension in practice.)"""

    def __init__(self) -> None:
        self._paths: dict[type, tuple[Callable[[Any], Any] | None, type]] = {}

    def __getstate__(self) -> dict[str, Any]:  # pickled with its callback (ddp_spawn): remembers nothing
        return {"_paths": {}}

    def __call__(self, batch: Any) -> int:
        known = self._paths.get(type(batch))
        if known is not None:
            get, leaf_type = known
            try:
                item = batch if get is None else get(batch)
                if type(item) is leaf_type:
                    n = item.shape[0]
                    if type(n) is int and n >= 0:
                        return n
            except Exception:  # noqa: BLE001 - this batch is shaped otherwise: walk it
                pass
        n, found = _walk(batch)
        if found is not None and len(self._paths) < 16:
            self._paths[type(batch)] = (_getter(found), type(_follow(batch, found)))
        return n


def _follow(item: Any, path: tuple[tuple[str, Any], ...]) -> Any:
    for how, where in path:
        item = item[where] if how == "key" else getattr(item, where)
    return item


def _getter(path: tuple[tuple[str, Any], ...]) -> Callable[[Any], Any] | None:
    """``path`` as one call: None for the batch itself, a C ``itemgetter``/``attrgetter`` for one step."""
    if not path:
        return None
    if len(path) == 1:
        how, where = path[0]
        return operator.itemgetter(where) if how == "key" else operator.attrgetter(where)
    return lambda batch: _follow(batch, path)


default_batch_size = count_samples
"""Alias kept for ``batch_size_fn`` configs that name ``wattlog.integrations.lightning.default_batch_size``."""
