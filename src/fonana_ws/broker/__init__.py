"""The pub/sub broker: broadcaster's ``Broadcast`` over the backend the URL selects."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from urllib.parse import urlparse

from broadcaster import Broadcast, BroadcastBackend

from fonana_ws.broker.base import BrokerUnavailable, PayloadTooLarge, backend_is_up, mask_url
from fonana_ws.broker.history import HistoryLimits, Position, Replay, Target

__all__ = ["Broker", "BrokerUnavailable", "PayloadTooLarge", "create_backend", "mask_url"]

log = logging.getLogger("fonana_ws.broker")


def create_backend(url: str) -> BroadcastBackend:
    """Ours for every scheme: broadcaster's Redis and PostgreSQL backends are unreliable, its memory one
    private (``broadcaster._backends``); ours use broadcaster's public ``BroadcastBackend`` only."""
    if urlparse(url).scheme.lower() == "redis+cluster":
        from fonana_ws.broker.redis_cluster_backend import RedisClusterBackend

        return RedisClusterBackend(url)
    scheme = urlparse(url).scheme.split("+")[0]
    if scheme == "memory":
        from fonana_ws.broker.memory_backend import MemoryBackend

        return MemoryBackend(url)
    if scheme in ("redis", "rediss"):
        from fonana_ws.broker.redis_backend import RedisBackend

        return RedisBackend(url)
    if scheme in ("postgres", "postgresql"):
        from fonana_ws.broker.postgres_backend import PostgresBackend

        return PostgresBackend(url)
    raise ValueError(f"BROADCAST_URL: unsupported broker scheme {scheme!r}")


class FanoutBroadcast(Broadcast):
    """broadcaster's ``Broadcast``, handing every message to one callback instead of a queue per subscriber.

    ``Broadcast.subscribe`` makes an ``asyncio.Queue`` per subscriber, which someone must drain with a task:
    ~5 KB and a task switch per broker channel, and the hub holds one per channel key and per connected
    user. The hub already knows who wants what; it only needs each message once, in order.
    """

    def __init__(self, backend: BroadcastBackend, on_message: Callable[[str, str], None]) -> None:
        super().__init__(backend=backend)
        self.on_message = on_message

    async def _listener(self) -> None:
        while True:
            event = await self._backend.next_published()
            try:
                self.on_message(event.channel, event.message)
            except Exception:  # one bad message must not end delivery for everyone
                log.exception("delivery of a message on %s failed", event.channel)


def _drop(channel: str, message: str) -> None:
    """Until someone listens, messages have nowhere to go."""


class Broker:
    """One process's link to the broker: publish, and (un)subscribe broker channels for the hub."""

    def __init__(self, url: str, backend: BroadcastBackend | None = None) -> None:
        self.url = url
        self.backend = backend or create_backend(url)
        self.broadcast = FanoutBroadcast(self.backend, _drop)
        self.kind = urlparse(url).scheme.split("+")[0]
        # A backend without history keeps nothing: one epoch per Broker, never matching an older one.
        self._no_history_epoch = uuid.uuid4().hex[:12]

    @property
    def is_up(self) -> bool:
        return backend_is_up(self.backend)

    def listen(self, on_message: Callable[[str, str], None]) -> None:
        """Where every message of every subscribed channel goes: ``on_message(channel, message)``."""
        self.broadcast.on_message = on_message

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

    async def publish_many(self, items: Sequence[tuple[str, str]]) -> None:
        """Publish each ``(channel, message)`` in one broker round trip: all of them, or none.

        Raises ``BrokerUnavailable`` (nothing was published), or ``PayloadTooLarge`` / ``ValueError``
        for a message the backend cannot carry (checked before anything is sent).
        """
        if not items:
            return
        if not self.is_up:
            raise BrokerUnavailable("broker is down")
        if len(items) == 1:
            channel, message = items[0]
            await self.backend.publish(channel, message)
            return
        many = getattr(self.backend, "publish_many", None)
        if many is not None:
            await many(items)
            return
        # A backend without a batch (another BroadcastBackend handed in): one publish each.
        for channel, message in items:
            await self.backend.publish(channel, message)

    async def publish_targets(self, targets: Sequence[Target], limits: HistoryLimits) -> list[int | None]:
        """Publish every target in one broker round trip, all or none, like ``publish_many``; return
        each target's offset (None for a target without history).

        A target with ``key`` (and ``limits.enabled``) gets the key's next offset, stored and published
        in one atomic step of the backend (``broker.history``); the others are published as they are.
        A backend without history (another ``BroadcastBackend`` handed in) publishes them all as they are.
        """
        if not targets:
            return []
        if not self.is_up:
            raise BrokerUnavailable("broker is down")
        publish = getattr(self.backend, "publish_targets", None)
        if publish is None:
            await self.publish_many([(t.channel, t.envelope) for t in targets])
            return [None] * len(targets)
        return await publish(targets, limits)

    async def history_position(self, key: str, limits: HistoryLimits) -> Position:
        """The key's epoch and last offset (0 when nothing was published yet under this epoch)."""
        position = getattr(self.backend, "history_position", None)
        if position is None:
            return Position(self._no_history_epoch, 0)
        return await position(key, limits)

    async def history_since(self, key: str, offset: int, epoch: str, limits: HistoryLimits) -> Replay:
        """The key's events after ``offset`` in order, or ``events=None`` when they cannot all be given."""
        since = getattr(self.backend, "history_since", None)
        if since is None:
            return Replay(self._no_history_epoch, 0, None)
        return await since(key, offset, epoch, limits)

    async def subscribe(self, channel: str) -> None:
        await self.backend.subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        await self.backend.unsubscribe(channel)
