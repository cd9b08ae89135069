"""StageFinisher: a stage's chart and its sink's close off the caller's thread; the next stage of the
same destination takes the sink over instead of waiting."""

from __future__ import annotations

import threading

from wattlog.finisher import StageFinisher
from wattlog.sinks.base import LoggerSink, MultiSink


class Sink:
    def __init__(self, destination=("memory", "run-1")) -> None:
        self.destination = destination
        self.log: list[str] = []
        self.closings = 0


def test_charts_land_in_stage_order_and_the_adopted_sink_is_closed_once_by_the_last_stage():
    finisher, held = StageFinisher(), threading.Event()
    first = Sink()

    def draw_first(sink):
        held.wait(30)
        sink.log.append("fit chart")

    def close(sink):
        sink.log.append("closed")
        sink.closings += 1

    finisher.finish(first, draw_first, close, background=True)
    other = LoggerSink([], on_error=None)
    adopted = finisher.adopt(MultiSink([Sink(), other]))  # returns at once: the first chart is held
    assert isinstance(adopted, MultiSink) and adopted.sinks == [first, other]
    finisher.finish(first, lambda sink: sink.log.append("test chart"), close, background=True)
    held.set()
    finisher.wait()
    assert first.log == ["fit chart", "test chart", "closed"] and first.closings == 1


def test_a_sink_elsewhere_waits_until_the_last_one_is_closed():
    finisher, held = StageFinisher(), threading.Event()
    first, elsewhere = Sink(), Sink(("memory", "run-2"))
    finisher.finish(first, lambda sink: held.wait(30), lambda sink: sink.log.append("closed"), background=True)
    threading.Timer(0.2, held.set).start()
    assert finisher.adopt(elsewhere) is elsewhere
    assert first.log == ["closed"]  # adopt() waited for it


def test_a_sink_without_a_destination_is_never_shared():
    finisher = StageFinisher()
    first, plain = Sink(), object()
    finisher.finish(first, None, lambda sink: sink.log.append("closed"), background=False)
    assert first.log == ["closed"]
    assert finisher.adopt(plain) is plain
    finisher.finish(None, None, lambda sink: None, background=True)  # no sink: nothing to do
    finisher.wait()


def test_a_stage_that_took_the_sink_over_and_could_not_start_hands_it_back():
    finisher, held = StageFinisher(), threading.Event()
    first = Sink()
    finisher.finish(first, lambda sink: held.wait(30), lambda sink: sink.log.append("closed"), background=True)
    assert finisher.adopt(Sink()) is first and finisher.adopted(first)
    held.set()
    finisher._job.thread.join()  # its stage went past closing: adopted, so it left the sink open
    assert first.log == []
    finisher.release(first)  # the next stage's start failed
    assert first.log == ["closed"] and not finisher.adopted(first)
    finisher.release(first)  # once
    assert first.log == ["closed"]
