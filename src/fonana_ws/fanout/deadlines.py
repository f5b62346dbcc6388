"""Many items, each with its own deadline, and one timer for all of them.

Every connection's token expires at its own time (protocol §7.6), so the deadlines are in no order that
a queue keeps; a heap does. One ``loop.call_at`` stands for the earliest deadline, however many items
wait: 10,000 connections are 10,000 heap entries, not 10,000 timers. A changed or discarded deadline
leaves its old entry in the heap (skipped when it comes up); the heap is rebuilt when such entries
outnumber the live ones, so it never holds more than about twice the items.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T", bound=Hashable)


class Handle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What ``Deadlines`` needs of the event loop (``asyncio.AbstractEventLoop`` is one; tests fake it)."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Handle: ...


class Deadlines(Generic[T]):
    """``set(item, when)`` in the clock's time; ``on_due(items)`` once their deadlines passed."""

    def __init__(self, clock: Clock, on_due: Callable[[list[T]], None]) -> None:
        self.clock = clock
        self.on_due = on_due
        self._heap: list[tuple[float, int, T]] = []
        #: item -> (when, sequence) of its live heap entry.
        self._live: dict[T, tuple[float, int]] = {}
        self._seq = itertools.count()
        self._timer: Handle | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, item: T) -> bool:
        return item in self._live

    def when(self, item: T) -> float | None:
        entry = self._live.get(item)
        return entry[0] if entry is not None else None

    def set(self, item: T, when: float) -> None:
        seq = next(self._seq)
        self._live[item] = (when, seq)
        heapq.heappush(self._heap, (when, seq, item))
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [(w, s, i) for i, (w, s) in self._live.items()]
            heapq.heapify(self._heap)
        self._arm()

    def discard(self, item: T) -> None:
        self._live.pop(item, None)
        if not self._live and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._heap.clear()

    def clear(self) -> None:
        self._live.clear()
        self._heap.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        while self._heap and self._live.get(self._heap[0][2]) != self._heap[0][:2]:
            heapq.heappop(self._heap)  # a stale entry
        if not self._heap:
            return
        first = self._heap[0][0]
        if self._timer is not None:
            if self._timer_at <= first:
                return
            self._timer.cancel()
        self._timer_at = first
        self._timer = self.clock.call_at(first, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self.clock.time()
        due: list[T] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, seq, item = heapq.heappop(heap)
            if self._live.get(item) == (when, seq):
                del self._live[item]
                due.append(item)
        self._arm()
        if due:
            self.on_due(due)
