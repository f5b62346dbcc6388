"""The one-process broker: an in-memory queue behind broadcaster's public ``BroadcastBackend``.

broadcaster ships a memory backend too, but only under its private ``_backends`` path, and its
``unsubscribe`` raises for a channel not subscribed; this one is idempotent like the Redis and
PostgreSQL backends (the hub's registry counts subscribers) and publishes a batch in one step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from broadcaster import BroadcastBackend, Event


class MemoryBackend(BroadcastBackend):
    def __init__(self, url: str = "memory://") -> None:
        self._subscribed: set[str] = set()
        self._published: asyncio.Queue[Event] = asyncio.Queue()

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

    async def next_published(self) -> Event:
        while True:
            event = await self._published.get()
            if event.channel in self._subscribed:
                return event
