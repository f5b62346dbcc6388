"""The one-process broker: an in-memory queue behind broadcaster's public ``BroadcastBackend``.

broadcaster ships a memory backend too, but only under its private ``_backends`` path, and its
``unsubscribe`` raises for a channel not subscribed; this one is idempotent like the Redis and
PostgreSQL backends (the hub's registry counts subscribers) and publishes a batch in one step.

History (protocol §7.8) lives in this process too: a bounded deque per channel key, dropped once the key
has been idle past its ttl, so a restart of the process is a new epoch for every key.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from broadcaster import BroadcastBackend, Event

from fonana_ws.broker.history import HistoryLimits, Position, Replay, Target, with_offset


def new_epoch() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class _Ring:
    """One key's history: its epoch, last offset, and (offset, monotonic time, event text) of the kept."""

    epoch: str = field(default_factory=new_epoch)
    offset: int = 0
    touched: float = field(default_factory=time.monotonic)
    events: deque[tuple[int, float, str]] = field(default_factory=deque)


class MemoryBackend(BroadcastBackend):
    def __init__(self, url: str = "memory://") -> None:
        self._subscribed: set[str] = set()
        self._published: asyncio.Queue[Event] = asyncio.Queue()
        # Least recently touched first, so that idle keys are dropped from the front in O(1) each.
        self._rings: OrderedDict[str, _Ring] = OrderedDict()

    async def connect(self) -> None:
        self._published = asyncio.Queue()

    async def disconnect(self) -> None:
        self._subscribed.clear()

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def publish(self, channel: str, message: Any) -> None:
        self._published.put_nowait(Event(channel=channel, message=message))

    async def publish_many(self, items: Sequence[tuple[str, Any]]) -> None:
        """All or nothing trivially: a queue in this process cannot fail half way."""
        for channel, message in items:
            self._published.put_nowait(Event(channel=channel, message=message))

    def _ring(self, key: str, limits: HistoryLimits, now: float) -> _Ring:
        """The key's ring, made anew when missing or idle past ttl; drops other idle keys on the way."""
        while self._rings:
            oldest_key, oldest = next(iter(self._rings.items()))
            if now - oldest.touched <= limits.ttl:
                break
            del self._rings[oldest_key]
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = _Ring(touched=now)
        return ring

    async def publish_targets(self, targets: Sequence[Target], limits: HistoryLimits) -> list[int | None]:
        """Each target's offset (None without history); one step, so all or nothing trivially."""
        for t in targets:
            if t.key and limits.enabled and not (t.envelope.endswith("}}") and t.event.endswith("}")):
                raise ValueError(f"target for {t.key!r}: envelope must end with }}}} and event with }}")
        offsets: list[int | None] = []
        now = time.monotonic()
        for t in targets:
            if not (t.key and limits.enabled):
                self._published.put_nowait(Event(channel=t.channel, message=t.envelope))
                offsets.append(None)
                continue
            ring = self._ring(t.key, limits, now)
            ring.offset += 1
            ring.touched = now
            self._rings.move_to_end(t.key)
            ring.events.append((ring.offset, now, with_offset(t.event, ring.offset, "}")))
            while len(ring.events) > limits.size or now - ring.events[0][1] > limits.ttl:
                ring.events.popleft()
            message = with_offset(t.envelope, ring.offset, "}}")
            self._published.put_nowait(Event(channel=t.channel, message=message))
            offsets.append(ring.offset)
        return offsets

    async def history_position(self, key: str, limits: HistoryLimits) -> Position:
        ring = self._ring(key, limits, time.monotonic())
        return Position(ring.epoch, ring.offset)

    async def history_since(self, key: str, offset: int, epoch: str, limits: HistoryLimits) -> Replay:
        now = time.monotonic()
        ring = self._ring(key, limits, now)
        if epoch != ring.epoch or offset > ring.offset or offset < 0:
            return Replay(ring.epoch, ring.offset, None)
        wanted = [(n, at, text) for n, at, text in ring.events if n > offset]
        complete = len(wanted) == ring.offset - offset and all(now - at <= limits.ttl for _, at, _ in wanted)
        return Replay(ring.epoch, ring.offset, [text for _, _, text in wanted] if complete else None)

    async def next_published(self) -> Event:
        while True:
            event = await self._published.get()
            if event.channel in self._subscribed:
                return event
