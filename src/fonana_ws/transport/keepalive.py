"""One timer for every socket's keepalive, instead of one ``TimerHandle`` per socket.

Each socket waits for one thing at a time: its next ping, or the pong to the last one. A timer per
socket is ~500 B (the handle, the loop's timer, a bound method, a context copy) for what is one moment
in the next minute; here a socket is one entry in the set of the tick it is due in, and one timer stands
for the earliest tick. A tick is a fraction of the interval (at most 0.5 s): a ping or a verdict comes up
to one tick late, never early. ``fanout.deadlines.Deadlines`` is the same idea for exact deadlines (token
expiry): a heap entry and a dict entry per item; pings tolerate a tick's lateness, so a set per tick will
do, at a third of the memory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from typing import Protocol

log = logging.getLogger("fonana_ws.connection")


class Due(Protocol):
    """A socket with a keepalive: ``keepalive_due`` runs once the moment it asked for has come."""

    def keepalive_due(self) -> None: ...


class Wheel:
    """Sockets grouped by the tick their next keepalive step is due in."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop = loop
        self.tick = tick
        self._slots: dict[int, set[Due]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = 0
        self._firing = False

    def __len__(self) -> int:
        return sum(len(s) for s in self._slots.values())

    def add(self, item: Due, delay: float) -> int:
        """Due ``delay`` seconds from now (rounded up to a tick); returns the slot to ``discard`` it with."""
        slot = math.ceil((self.loop.time() + delay) / self.tick)
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
        members.add(item)
        if not self._firing and (self._timer is None or slot < self._timer_slot):
            self._arm(slot)
        return slot

    def discard(self, item: Due, slot: int) -> None:
        members = self._slots.get(slot)
        if members is not None:
            members.discard(item)
            if not members:
                del self._slots[slot]
                if not self._slots and self._timer is not None:
                    self._timer.cancel()
                    self._timer = None

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self.loop.call_at(slot * self.tick, self._fire)

    def _fire(self) -> None:
        self._timer = None
        # A timer may fire a little early (the loop's clock resolution): a hundredth of a tick counts as due.
        now = self.loop.time() / self.tick + 0.01
        self._firing = True
        try:
            for slot in sorted(s for s in self._slots if s <= now):
                for item in self._slots.pop(slot):
                    try:
                        item.keepalive_due()  # may add it again: its slot waits for the next timer
                    except Exception:  # one broken socket must not leave the others unpinged
                        log.exception("keepalive of %r failed", item)
        finally:
            self._firing = False
            if self._slots:
                self._arm(min(self._slots))


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, Wheel]] = (
    weakref.WeakKeyDictionary()
)


def tick_for(interval: float) -> float:
    """A tenth of the interval, at most half a second: pings stay within 10 % of their schedule."""
    return min(0.5, max(0.01, interval / 10))


def wheel_of(loop: asyncio.AbstractEventLoop, interval: float) -> Wheel:
    """The loop's wheel for sockets pinged every ``interval`` seconds (one per tick size and loop)."""
    tick = tick_for(interval)
    wheels = _wheels.get(loop)
    if wheels is None:
        wheels = _wheels[loop] = {}
    wheel = wheels.get(tick)
    if wheel is None:
        wheel = wheels[tick] = Wheel(loop, tick)
    return wheel
