"""The shared keepalive wheel on a fake loop: when items come due, discard, re-adding while firing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fonana_ws.transport.keepalive import Wheel, tick_for

pytestmark = pytest.mark.unit


class FakeLoop:
    """``time`` and ``call_at`` with a clock the test moves; timers run when it passes them."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], Any]) -> FakeTimer:
        timer = FakeTimer(when, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float, early: float = 0.0) -> None:
        """Move the clock; a timer may fire ``early`` seconds before its time, as real loops do."""
        self.now += seconds
        for timer in sorted(self.timers, key=lambda t: t.when):
            if not timer.cancelled and timer.when <= self.now + early:
                self.timers.remove(timer)
                saved, self.now = self.now, min(self.now, timer.when - early) if early else self.now
                timer.callback()
                self.now = saved

    @property
    def armed(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled]


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], Any]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Sock:
    def __init__(self, name: str, log: list[str], again: Callable[[Sock], None] | None = None) -> None:
        self.name = name
        self.log = log
        self.again = again

    def keepalive_due(self) -> None:
        self.log.append(self.name)
        if self.again is not None:
            self.again(self)


def test_items_come_due_in_their_tick_never_early() -> None:
    loop, log = FakeLoop(), []
    wheel = Wheel(loop, 0.5)  # type: ignore[arg-type]
    a, b, c = Sock("a", log), Sock("b", log), Sock("c", log)
    wheel.add(a, 1.2)
    wheel.add(b, 0.3)
    wheel.add(c, 1.0)
    assert len(wheel) == 3 and len(loop.armed) == 1  # one timer for all of them
    loop.advance(0.29)
    assert log == []
    loop.advance(0.21)  # 0.5: b's tick (0.3 rounded up)
    assert log == ["b"]
    loop.advance(0.5)  # 1.0: c
    assert log == ["b", "c"]
    loop.advance(0.19)
    assert log == ["b", "c"]
    loop.advance(0.31)  # 1.5: a (1.2 rounded up)
    assert log == ["b", "c", "a"]
    assert len(wheel) == 0 and not loop.armed


def test_discard_and_the_timer_follows_the_earliest() -> None:
    loop, log = FakeLoop(), []
    wheel = Wheel(loop, 0.5)  # type: ignore[arg-type]
    a, b = Sock("a", log), Sock("b", log)
    slot_a = wheel.add(a, 5)
    wheel.add(b, 1)
    assert len(loop.armed) == 1 and loop.armed[0].when == pytest.approx(101.0)
    wheel.discard(a, slot_a)
    wheel.discard(a, slot_a)  # twice is harmless
    loop.advance(10)
    assert log == ["b"]
    slot = wheel.add(a, 1)
    wheel.discard(a, slot)
    assert not loop.armed  # nothing left: no timer


def test_an_item_re_added_while_firing_waits_for_its_own_tick() -> None:
    loop, log = FakeLoop(), []
    wheel = Wheel(loop, 0.5)  # type: ignore[arg-type]
    slots: list[int] = []
    pinger = Sock("p", log, again=lambda s: slots.append(wheel.add(s, 2)))
    other = Sock("o", log)
    wheel.add(pinger, 0.5)
    wheel.add(other, 1.0)
    loop.advance(0.5)
    assert log == ["p"]  # re-added for 2 s later, not run again now
    assert loop.armed and min(t.when for t in loop.armed) == pytest.approx(101.0)  # other's tick first
    loop.advance(0.5)
    assert log == ["p", "o"]
    loop.advance(1.5)
    assert log == ["p", "o", "p"]


def test_a_timer_that_fires_a_little_early_still_runs_the_items() -> None:
    loop, log = FakeLoop(), []
    wheel = Wheel(loop, 0.5)  # type: ignore[arg-type]
    wheel.add(Sock("a", log), 0.5)
    loop.advance(0.5, early=0.001)
    assert log == ["a"] and not loop.armed


def test_one_failing_item_does_not_stop_the_others() -> None:
    loop, log = FakeLoop(), []
    wheel = Wheel(loop, 0.5)  # type: ignore[arg-type]

    def boom(_: Sock) -> None:
        raise RuntimeError("broken socket")

    wheel.add(Sock("bad", log, again=boom), 0.5)
    wheel.add(Sock("good", log), 0.5)
    loop.advance(0.5)
    assert sorted(log) == ["bad", "good"]


def test_tick_is_a_tenth_of_the_interval_at_most_half_a_second() -> None:
    assert tick_for(30) == 0.5
    assert tick_for(0.5) == pytest.approx(0.05)
    assert tick_for(0.01) == 0.01
