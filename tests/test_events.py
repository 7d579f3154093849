"""Event delivery: in order, on one thread, listener failures contained."""

from __future__ import annotations

import logging
import threading

import pytest

from mutexowner.events import Event, EventDispatcher


def event(n: int, kind: str = "state") -> Event:
    return Event(kind=kind, key="job", identity="A", state="holding", time=float(n))


def test_inline_delivery_before_start() -> None:
    dispatcher = EventDispatcher("job")
    seen: list[float] = []
    dispatcher.add(lambda e: seen.append(e.time))
    dispatcher.emit(event(1))
    assert seen == [1.0]


def test_threaded_delivery_keeps_order_and_stop_drains_the_queue() -> None:
    dispatcher = EventDispatcher("job")
    seen: list[float] = []
    threads: set[str] = set()
    gate = threading.Event()

    def slow(e: Event) -> None:
        gate.wait(5)
        threads.add(threading.current_thread().name)
        seen.append(e.time)

    dispatcher.add(slow)
    dispatcher.start()
    for n in range(100):
        dispatcher.emit(event(n))  # never blocks the emitting thread
    gate.set()
    assert dispatcher.stop(timeout=5)
    assert seen == [float(n) for n in range(100)]
    assert threads == {"mutexowner-events-job"}


def test_a_failing_listener_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = EventDispatcher("job")
    seen: list[str] = []

    def broken(e: Event) -> None:
        raise RuntimeError("listener bug")

    dispatcher.add(broken)
    dispatcher.add(lambda e: seen.append(e.kind))
    with caplog.at_level(logging.ERROR, logger="mutexowner.events"):
        dispatcher.emit(event(1, "acquired"))
    assert seen == ["acquired"]
    assert "listener bug" in caplog.text and "acquired" in caplog.text


def test_add_and_remove_validate() -> None:
    dispatcher = EventDispatcher("job")
    with pytest.raises(TypeError, match="listener"):
        dispatcher.add("not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not added"):
        dispatcher.remove(print)


def test_stop_from_a_listener_does_not_deadlock() -> None:
    dispatcher = EventDispatcher("job")
    results: list[bool] = []
    done = threading.Event()

    def stopper(e: Event) -> None:
        results.append(dispatcher.stop(timeout=1))
        done.set()

    dispatcher.add(stopper)
    dispatcher.start()
    dispatcher.emit(event(1))
    assert done.wait(5)
    assert results == [False]
    assert dispatcher._thread is not None
    dispatcher._thread.join(5)
    assert not dispatcher._thread.is_alive()
