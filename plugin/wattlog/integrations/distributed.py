"""wattlog's own DDP collectives: a gloo group with a timeout, so a dead rank never hangs training.

Implements :class:`wattlog.session.Collectives` with ``torch.distributed``. On a timeout or error
(a rank died or stalled) it stops collecting for the rest of the run, reports once, and from then on
returns only this rank's object: rank 0 logs its own measurements, tagged ``energy.partial``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable


class TorchCollectives:
    """Gather objects across the ranks of an initialised process group.

    Args:
        rank, world_size: this process's global rank and the job's size.
        timeout_s: timeout of the dedicated gloo group's collectives.
        on_partial: called once with the reason when collecting stops.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float, on_partial: Callable[[str, Any], None]) -> None:
        self.rank = rank
        self.world_size = world_size
        self.partial: str | None = None
        self._on_partial = on_partial
        self._group: Any = None
        self._ready = False
        import torch.distributed as dist

        self._dist = dist
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            self._ready = True
            try:
                self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            except Exception as exc:  # noqa: BLE001 - gloo missing: fall back to the default group
                self._group = None
                on_partial(f"cannot create a gloo group for wattlog's collectives ({exc}); using the default group, "
                           "whose timeout is the strategy's", exc)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object in rank order; only this rank's once collecting has stopped."""
        if self.world_size <= 1 or self.partial is not None or not self._ready:
            return [obj]
        out: list[Any] = [None] * self._dist.get_world_size()
        try:
            self._dist.all_gather_object(out, obj, group=self._group)
        except Exception as exc:  # noqa: BLE001 - DistBackendError / RuntimeError: timeout, peer gone
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            self.stop(f"a wattlog collective failed on rank {self.rank} ({type(exc).__name__}: {first}); from here "
                      "on rank 0 logs its own measurements only", exc)
            return [obj]
        return out

    def stop(self, reason: str, exc: BaseException | None = None) -> None:
        """Stop collecting (a failure, or a rank's exception) and report ``reason`` once."""
        if self.partial is None:
            self.partial = reason
            self._on_partial(reason, exc)
