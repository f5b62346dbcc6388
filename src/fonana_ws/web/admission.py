"""Who may open a socket, and how fast a socket may talk: the limits of protocol §7.5.

The rate arithmetic is the ``limits`` library's. Upgrades per client address (``WS_CONNECT_RATE``) are
counted in Redis when the broker is Redis, so that the limit holds for the whole family of processes
(on the memory and PostgreSQL brokers each process counts its own). Inbound frames are per connection,
so they are counted in this process's memory.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage as AsyncMemoryStorage
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from fonana_ws.config import Settings

log = logging.getLogger("fonana_ws.limits")

#: Frames dropped for the rate past which a connection is closed with 4029.
DROPS_BEFORE_CLOSE = parse("100/1 minute")


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No list, or no ``Origin`` (not a browser), passes; ``https://*.d`` matches one subdomain of d."""
    if not allowed or origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    for pattern in allowed:
        if pattern == origin:
            return True
        if "://*." in pattern:
            scheme, _, rest = pattern.partition("://*.")
            o_scheme, sep, o_host = origin.partition("://")
            label, dot, domain = o_host.partition(".")
            if sep and o_scheme == scheme and dot and label and domain == rest and "." not in label:
                return True
    return False


class LazyMemoryStorage(MemoryStorage):
    """``limits``' memory storage without its expiry thread.

    That thread wakes every 10 ms while counters change and walks every key: with one key per connection,
    5,000 connections cost it 500,000 dict visits a second under the GIL. A fixed window's counter is
    expired when it is next read anyway, and the connection clears its own key when it closes.
    """

    def _MemoryStorage__schedule_expiry(self) -> None:  # noqa: N802 - the name-mangled private hook
        return None

    def sweep(self) -> None:
        """Drop the expired counters (the walk the thread would have made), on the caller's thread."""
        self._MemoryStorage__expire_events()  # type: ignore[attr-defined]


class RateLimits:
    """The rate limits of one process: connects per address, frames (and dropped frames) per connection."""

    def __init__(self, settings: Settings) -> None:
        self.connect_item: RateLimitItem | None = (
            parse(settings.connect_rate) if settings.connect_rate else None
        )
        self._connect_storage: Any = None
        self._connect: MovingWindowRateLimiter | None = None
        if self.connect_item is not None:
            if settings.broker_kind == "redis":
                url = "async+" + settings.broadcast_url
                self._connect_storage = RedisStorage(
                    url, implementation="redispy", key_prefix="fonana-ws:rate", socket_timeout=1
                )
            else:
                self._connect_storage = AsyncMemoryStorage()
            self._connect = MovingWindowRateLimiter(self._connect_storage)
        self.frame_item = parse(settings.client_rate)
        self._local = LazyMemoryStorage()
        self._frames = FixedWindowRateLimiter(self._local)
        self._next_sweep = 0.0
        self._down_logged = 0.0

    async def connect_allowed(self, address: str) -> bool:
        """One upgrade from ``address``; False when it is over ``WS_CONNECT_RATE``.

        When the shared storage cannot be reached the upgrade is let through (and said so in the log,
        at most once a minute): a Redis outage must not lock every user out.
        """
        if self._connect is None or self.connect_item is None:
            return True
        try:
            return await self._connect.hit(self.connect_item, "connect", address)
        except Exception as exc:
            now = time.monotonic()
            if now - self._down_logged > 60:
                self._down_logged = now
                log.warning("connect rate not checked (storage unavailable): %s", exc)
            return True

    def frame_allowed(self, conn_id: int) -> bool:
        """One inbound frame of connection ``conn_id``; False when it is over ``WS_CLIENT_RATE``."""
        now = time.monotonic()
        if now >= self._next_sweep:
            # An idle connection's counter (~265 bytes) is dropped once its window is over: one walk of
            # the counters per minute at most (~1 ms for 5,000), not every 10 ms as limits' thread does.
            self._next_sweep = now + max(60.0, self.frame_item.get_expiry())
            self._local.sweep()
        return self._frames.hit(self.frame_item, "frames", str(conn_id))

    def drop_allowed(self, conn_id: int) -> bool:
        """One frame dropped for the rate; False past 100 in a minute: the connection is closed (4029)."""
        return self._frames.hit(DROPS_BEFORE_CLOSE, "drops", str(conn_id))

    def forget(self, conn_id: int) -> None:
        """The connection closed: its counters go with it."""
        self._frames.clear(self.frame_item, "frames", str(conn_id))
        self._frames.clear(DROPS_BEFORE_CLOSE, "drops", str(conn_id))

    async def close(self) -> None:
        storage = self._connect_storage
        if storage is not None and hasattr(storage, "storage"):
            try:
                await storage.storage.aclose()
            except Exception:  # the connection was never made or is already gone
                pass
