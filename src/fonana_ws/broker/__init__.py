"""The pub/sub broker: broadcaster's ``Broadcast`` over the backend the URL selects."""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlparse

from broadcaster import Broadcast
from broadcaster._backends.base import BroadcastBackend

from .base import BrokerUnavailable, PayloadTooLarge, backend_is_up, mask_url

__all__ = ["Broker", "BrokerUnavailable", "PayloadTooLarge", "create_backend", "mask_url"]

log = logging.getLogger("fonana_ws.broker")


def create_backend(url: str) -> BroadcastBackend:
    """broadcaster's memory backend, or ours for Redis and PostgreSQL (broadcaster's are unreliable)."""
    scheme = urlparse(url).scheme.split("+")[0]
    if scheme == "memory":
        from broadcaster._backends.memory import MemoryBackend

        return MemoryBackend(url)
    if scheme in ("redis", "rediss"):
        from .redis_backend import RedisBackend

        return RedisBackend(url)
    if scheme in ("postgres", "postgresql"):
        from .postgres_backend import PostgresBackend

        return PostgresBackend(url)
    raise ValueError(f"BROADCAST_URL: unsupported broker scheme {scheme!r}")


class Broker:
    """One process's link to the broker; the hub makes one subscription per broker channel."""

    def __init__(self, url: str, backend: BroadcastBackend | None = None) -> None:
        self.url = url
        self.backend = backend or create_backend(url)
        self.broadcast = Broadcast(backend=self.backend)
        self.kind = urlparse(url).scheme.split("+")[0]

    @property
    def is_up(self) -> bool:
        return backend_is_up(self.backend)

    async def connect(self) -> None:
        await self.broadcast.connect()

    async def disconnect(self) -> None:
        try:
            await self.broadcast.disconnect()
        except Exception as exc:  # the listener died with the connection; nothing left to save
            log.debug("broker disconnect: %s", exc)

    async def publish(self, channel: str, message: str) -> None:
        """Publish to a broker channel; raise ``BrokerUnavailable`` when it cannot be done now."""
        if not self.is_up:
            raise BrokerUnavailable("broker is down")
        await self.broadcast.publish(channel, message)

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Any]:
        return self.broadcast.subscribe(channel)
