"""``fanout.deadlines``: many deadlines, one timer (token lifetime §7.6, subscriptions' ends §7.7)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fonana_ws.fanout.deadlines import Deadlines

pytestmark = pytest.mark.unit


class Timer:
    def __init__(self, clock: Clock, when: float, callback: Callable[[], object]) -> None:
        self.clock, self.when, self.callback, self.cancelled = clock, when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        timer = Timer(self, when, callback)
        self.timers.append(timer)
        return timer

    @property
    def armed(self) -> list[Timer]:
        return [t for t in self.timers if not t.cancelled and t.callback is not None]

    def advance(self, to: float) -> None:
        self.now = to
        while True:
            due = [t for t in self.armed if t.when <= to]
            if not due:
                return
            for timer in due:
                timer.cancelled = True
                timer.callback()


def make() -> tuple[Clock, Deadlines[str], list[list[str]]]:
    clock = Clock()
    fired: list[list[str]] = []
    return clock, Deadlines(clock, fired.append), fired


def test_one_timer_for_many_deadlines_in_their_order() -> None:
    clock, deadlines, fired = make()
    for i, when in enumerate([5.0, 1.0, 3.0, 1.0, 10_000.0]):
        deadlines.set(f"c{i}", when)
    assert len(clock.armed) == 1 and clock.armed[0].when == 1.0
    clock.advance(1.0)
    assert fired == [["c1", "c3"]]
    clock.advance(4.0)
    assert fired[-1] == ["c2"] and len(deadlines) == 2
    clock.advance(5.0)
    assert fired[-1] == ["c0"] and "c4" in deadlines and len(clock.armed) == 1


def test_a_moved_deadline_fires_at_its_new_time_only() -> None:
    clock, deadlines, fired = make()
    deadlines.set("a", 2.0)
    deadlines.set("a", 8.0)  # a refresh
    deadlines.set("b", 1.0)  # earlier than the armed timer: re-armed
    assert [t.when for t in clock.armed] == [1.0]
    clock.advance(5.0)
    assert fired == [["b"]]
    assert deadlines.when("a") == 8.0
    clock.advance(8.0)
    assert fired == [["b"], ["a"]] and len(deadlines) == 0 and not clock.armed


def test_discarded_items_never_fire_and_the_last_one_disarms() -> None:
    clock, deadlines, fired = make()
    deadlines.set("a", 1.0)
    deadlines.set("b", 2.0)
    deadlines.discard("a")
    deadlines.discard("missing")
    clock.advance(1.5)
    assert fired == []
    deadlines.discard("b")
    assert not clock.armed
    clock.advance(3.0)
    assert fired == []


def test_the_heap_stays_within_twice_the_items_however_often_they_move() -> None:
    clock, deadlines, _ = make()
    for i in range(10_000):
        deadlines.set("same", float(i))
    assert len(deadlines) == 1 and len(deadlines._heap) <= 2 * 1 + 65
