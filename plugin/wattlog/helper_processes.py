"""wattlog's own child processes (the MLflow delivery process, the chart process), kept out of what it bills.

The CPU and RAM estimates in ``process`` scope bill this process's tree. wattlog's helpers are in that
tree, yet they are the tool's work, not the user's: a chart drawn while the next stage runs (~1 s of
CPU) would triple a short ``test()`` stage's CPU energy. So every helper is a :class:`HelperProcess`:

- it lowers its own priority (``os.nice(10)`` in ``wattlog.sinks.deliver`` and ``wattlog.artifacts``), so
  it yields the CPU to training and data-loader workers;
- while it lives, the estimates skip its pid (:func:`live_pids`; not its own children, if it has any);
- when it is reaped, its CPU-seconds (read from the zombie's ``/proc`` entry through psutil just before the
  reap, under :data:`LOCK`) are added to :func:`reaped_cpu_s`, which the estimate subtracts from this
  process's reaped-children total.

Only Linux reports reaped children's CPU time (psutil's ``children_user``/``children_system`` are 0
elsewhere), so only there is anything added. Where the zombie cannot be read, the helper's last CPU
reading seen by :func:`note_cpu_s` stands in: at most the CPU since that reading is billed. A helper
reaped behind this class's back (Popen's garbage collection of an unclosed one) is billed like a child
of the user's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["LOCK", "NICE", "HelperProcess", "live_pids", "note_cpu_s", "reaped_cpu_s"]

NICE = 10
"""How much lower a helper's priority is than its parent's (each helper calls ``os.nice(NICE)`` itself)."""

_REAPED_IN_PARENT = sys.platform.startswith("linux")
"""Whether this process's reaped-children CPU total (psutil's ``children_user``) holds reaped helpers."""

LOCK = threading.RLock()
"""Held while a helper is reaped and while an estimate reads the process tree, so both see one state."""

_live: dict[int, float] = {}  # pid -> the last CPU-seconds an estimate read for it
_reaped_s = [0.0]


def live_pids() -> frozenset[int]:
    """The pids of the helpers not yet reaped."""
    with LOCK:
        return frozenset(_live)


def reaped_cpu_s() -> float:
    """CPU-seconds of every helper reaped so far in this process (user + system, with their children)."""
    with LOCK:
        return _reaped_s[0]


def note_cpu_s(pid: int, cpu_s: float) -> None:
    """Remember a live helper's CPU reading: the stand-in if its zombie cannot be read."""
    with LOCK:
        if pid in _live:
            _live[pid] = max(_live[pid], cpu_s)


def _zombie_cpu_s(pid: int) -> float | None:
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
    except Exception:  # ImportError, psutil.Error (ZombieProcess on macOS), OSError
        return None


def _exited(pid: int, timeout_s: float | None) -> bool | None:
    """Wait (at most ``timeout_s``) until ``pid`` has exited, without reaping it; None: cannot tell here."""
    if not hasattr(os, "waitid"):
        return None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    delay_s = 0.0005
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            return None  # already reaped elsewhere
        except OSError:
            return None
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(delay_s if deadline is None else min(delay_s, max(0.0, deadline - time.monotonic())))
        delay_s = min(2 * delay_s, 0.05)  # like Popen.wait's own polling


class HelperProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A ``subprocess.Popen`` of wattlog's own: skipped by the estimates, its CPU accounted at reap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with LOCK:  # registered before an estimate can see it in the process tree
            super().__init__(*args, **kwargs)
            _live[self.pid] = 0.0

    def poll(self) -> int | None:
        if self.returncode is None and self.pid in _live:
            exited = _exited(self.pid, 0.0)
            if exited:
                return self._reap()
            if exited is False:
                return None
            with LOCK:  # cannot tell without reaping: reap and account in one step
                return self._reaped(super().poll())
        return super().poll()

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self.pid in _live:
            exited = _exited(self.pid, timeout)
            if exited:
                return self._reap()
            if exited is False:
                raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
            deadline = None if timeout is None else time.monotonic() + timeout
            while (rc := self.poll()) is None:  # no os.waitid here: poll, so the reap is accounted
                if deadline is not None and time.monotonic() >= deadline:
                    raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
                time.sleep(0.01)
            return rc
        return super().wait(timeout)  # type: ignore[arg-type]

    def __del__(self, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "returncode", 0) is None:
            try:
                self.poll()  # an exited helper is accounted before Popen's own clean-up reaps it
            except Exception:
                pass
        super().__del__(*args, **kwargs)

    def _reap(self) -> int:
        with LOCK:
            cpu_s = _zombie_cpu_s(self.pid)
            rc = super().wait()
            self._account(cpu_s)
        return rc

    def _reaped(self, rc: int | None) -> int | None:
        if rc is not None:
            self._account(None)
        return rc

    def _account(self, cpu_s: float | None) -> None:
        seen_s = _live.pop(self.pid, None)
        if seen_s is not None and _REAPED_IN_PARENT:
            _reaped_s[0] += cpu_s if cpu_s is not None else seen_s
