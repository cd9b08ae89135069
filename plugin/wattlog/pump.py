"""Pump: moves a session's records from the meter to the ledger and the sink, off the training thread.

One daemon thread per measuring stage. Every ``interval_s`` it takes this rank's new records, passes
them through ``exchange`` (under DDP one collective that gathers every rank's records, run on this
thread: none runs on the training thread), and accounts what comes back. Ranks leave together: each
round's payload carries this rank's stop request, and every rank leaves after the first round in which
any rank asked to stop, so no rank waits in a collective its peers never enter.

An exception in the thread (strict mode, a broken sink) is kept and raised on the training thread by
:meth:`Pump.check` or :meth:`Pump.stop`, so it is never lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Round = tuple[list[Any], bool]
"""One rank's payload: its new records and whether it asks to stop."""


class Pump:
    """Drain ``take()`` into ``account()`` every ``interval_s``, through ``exchange``.

    Args:
        take: this rank's new records (called on the pump thread).
        account: records of every rank, as ``exchange`` returned them (called on the pump thread).
        exchange: every rank's :data:`Round`, in rank order, for this rank's round (identity in one process).
        interval_s: the time between two rounds.
        on_error: called on the pump thread once it has kept an exception (for :meth:`check` to raise).
    """

    def __init__(self, take: Callable[[], list[Any]], account: Callable[[list[Any]], None],
                 exchange: Callable[[Round], list[Round]] | None = None, interval_s: float = 0.25,
                 on_error: Callable[[], None] | None = None) -> None:
        self._take = take
        self._on_error = on_error
        self._account = account
        self._exchange = exchange or (lambda payload: [payload])
        self.interval_s = interval_s
        self._stop = threading.Event()
        self.error: BaseException | None = None  # raised by the thread, not yet by check() (hot paths read it)
        self._thread = threading.Thread(target=self._run, name="wattlog-pump", daemon=True)

    def start(self) -> Pump:
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise (once) what the pump thread raised."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def stop(self, timeout_s: float) -> bool:
        """Ask to stop, wait up to ``timeout_s`` for the last round; False if the thread is still in one.

        Raises:
            what the pump thread raised.
        """
        self._stop.set()
        self._thread.join(timeout_s)
        self.check()
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                stopping = self._stop.wait(self.interval_s)
                rounds = self._exchange((self._take(), stopping))
                self._account([record for records, _ in rounds for record in records])
                if any(asked for _, asked in rounds):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by check()/stop()
            self.error = exc
            if self._on_error is not None:
                self._on_error()
