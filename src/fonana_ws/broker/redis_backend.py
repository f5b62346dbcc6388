"""Redis pub/sub backend for broadcaster that survives broker restarts and concurrent subscribers.

broadcaster 0.3.1's own Redis backend delivers nothing with redis-py 8, loses subscribers when the
same channel is subscribed concurrently and dies silently when the connection drops. This one keeps
one PubSub connection for all channels, and reconnects with backoff,
re-subscribing every channel still in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from broadcaster import BroadcastBackend, Event
from redis import asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from fonana_ws.broker.base import (
    BrokerUnavailable,
    KeyedLocks,
    PayloadTooLarge,
    Supervised,
    describe,
    mask_url,
    within,
)

logger = logging.getLogger("fonana_ws.broker")

# Errors that mean "Redis is unreachable right now", as opposed to a bug or a bad argument.
_DOWN_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError)
_PING = "fonana-ws-health"  # idle PINGs: their replies prove the connection is alive
# PUBLISH each (channel, message) pair of ARGV. EVAL rather than EVALSHA: the script is short, and EVAL
# never needs a second round trip (NOSCRIPT) after a server restart.
_PUBLISH_ALL = "for i = 1, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end return #ARGV / 2"


def _refused(exc: redis_errors.ResponseError) -> bool:
    """True for the errors of a command Redis would not run at all (permission, unknown command)."""
    text = str(exc)
    return (
        isinstance(exc, redis_errors.NoPermissionError)
        or text.startswith("NOPERM")
        or "unknown command" in text
    )


def _text(value: bytes | str) -> str:
    # Other publishers may send non-UTF-8 bytes; a bad byte must not break the reader.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class RedisBackend(Supervised, BroadcastBackend):
    """broadcaster backend on Redis PUBLISH/SUBSCRIBE with reconnects and a health flag (``is_up``).

    ``connect()`` does not fail when Redis is down: it waits up to ``op_timeout`` for the first
    connection, then keeps retrying in the background while ``is_up`` stays False.
    """

    def __init__(
        self,
        url: str,
        *,
        op_timeout: float = 2.0,
        health_interval: float = 1.0,
        max_backoff: float = 5.0,
        max_payload: int = 64 * 1024 * 1024,
    ) -> None:
        if urlsplit(url).scheme.lower() not in ("redis", "rediss"):
            raise ValueError(f"not a Redis URL: {mask_url(url)}")
        self._url = url
        self.safe_url = mask_url(url)
        self._op_timeout = op_timeout
        self._health_interval = health_interval
        self._max_backoff = max_backoff
        self._max_payload = max_payload
        #: Channels in use; the hub's registry (fanout/subscriptions.py) counts their subscribers.
        self._wanted: set[str] = set()
        self._locks = KeyedLocks()
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._up = asyncio.Event()
        self._down_since: float | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._publisher: aioredis.Redis | None = None
        # State of the current connection; reset by each session.
        self._pubsub: PubSub | None = None
        self._live: set[str] = set()
        self._confirms: dict[str, tuple[str, asyncio.Future[None]]] = {}
        self._kicked: BaseException | None = None
        self._session_was_up = False
        self._scripting = True  # False once Redis refused EVAL: publish_many uses MULTI/EXEC then

    @property
    def is_up(self) -> bool:
        """True while connected with every channel in use subscribed."""
        return self._up.is_set()

    def _client_options(self) -> dict[str, Any]:
        # No redis-py retry handling at all: even with 0 retries it reconnects once (and re-subscribes
        # its own way) before raising. A failure must reach our loop, which does both itself.
        return {
            "socket_connect_timeout": self._op_timeout,
            "socket_timeout": self._op_timeout,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0, supported_errors=()),
            # RESP2 unless the URL asks otherwise: pub/sub replies are plain arrays, and pre-6 servers work.
            "protocol": 2,
        }

    async def connect(self) -> None:
        if self._supervisor is not None:
            return
        self._events = asyncio.Queue()
        # One retry lets a publish survive a pooled connection that died with a restarted server.
        options = {**self._client_options(), "retry": Retry(NoBackoff(), 1)}
        self._publisher = aioredis.Redis.from_url(self._url, **options)
        await self._start("fonana-ws redis broker")

    async def disconnect(self) -> None:
        await self._stop()
        if self._publisher is not None:
            await self._publisher.aclose()
            self._publisher = None
        self._wanted.clear()
        self._events.put_nowait(None)

    async def subscribe(self, channel: str) -> None:
        """Mark the channel in use and SUBSCRIBE unless it already is; never raises when down.

        Idempotent: the process's one subscription registry counts subscribers, so a backend sees each
        channel subscribed once and unsubscribed once (broadcaster's own backends behave the same).
        """
        async with self._locks.hold(channel):
            self._wanted.add(channel)
            if channel not in self._live:
                await self._change("subscribe", channel)

    async def unsubscribe(self, channel: str) -> None:
        """The channel is no longer in use: UNSUBSCRIBE."""
        async with self._locks.hold(channel):
            self._wanted.discard(channel)
            if channel in self._live:
                await self._change("unsubscribe", channel)

    def _check_size(self, message: Any) -> None:
        if isinstance(message, str):
            # A character is at most 4 bytes in UTF-8: most messages need no encoding to be measured.
            size = len(message) if len(message) * 4 <= self._max_payload else len(message.encode())
        else:
            size = len(message) if isinstance(message, bytes | bytearray | memoryview) else 0
        if size > self._max_payload:
            raise PayloadTooLarge(f"{size} bytes is over the {self._max_payload} byte limit")

    async def publish(self, channel: str, message: Any) -> None:
        """PUBLISH, or raise BrokerUnavailable within ``op_timeout`` rather than drop the message."""
        self._check_size(message)
        if not self.is_up or self._publisher is None:
            raise BrokerUnavailable("Redis is unreachable")
        try:
            async with within(self._op_timeout, "Redis PUBLISH"):
                await self._publisher.publish(channel, message)
        except _DOWN_ERRORS as exc:
            raise BrokerUnavailable(f"Redis publish failed: {describe(exc)}") from exc

    async def publish_many(self, items: Sequence[tuple[str, Any]]) -> None:
        """Every PUBLISH in one Lua script: one command and one round trip, all or none.

        Redis runs a script as one command, alone: a command that never arrived whole (connection lost,
        or a timeout, which closes the connection) publishes nothing, and BrokerUnavailable is raised
        within ``op_timeout``. Only a connection lost after the command was sent but before its reply
        leaves the outcome unknown; the copies of one event share an id and ``multi``, so a retry of it
        still reaches each connection once. A Redis that refuses the script (an ACL without EVAL, a
        renamed command) gets a MULTI/EXEC transaction instead, as atomic: redis-py parses one reply
        per command there, about 5 times slower for 10,000 targets.
        """
        for _, message in items:
            self._check_size(message)
        if not self.is_up or self._publisher is None:
            raise BrokerUnavailable("Redis is unreachable")
        publisher = self._publisher
        try:
            async with within(self._op_timeout, f"Redis PUBLISH of {len(items)} messages"):
                if self._scripting:
                    try:
                        await publisher.eval(_PUBLISH_ALL, 0, *(part for item in items for part in item))
                        return
                    except redis_errors.ResponseError as exc:
                        if not _refused(exc):
                            raise
                        # Refused before it ran: nothing was published.
                        self._scripting = False
                        logger.warning("Redis refused EVAL (%s): publishing with MULTI/EXEC", describe(exc))
                async with publisher.pipeline(transaction=True) as pipe:
                    for channel, message in items:
                        pipe.publish(channel, message)
                    await pipe.execute()
        except _DOWN_ERRORS as exc:
            raise BrokerUnavailable(f"Redis publish failed: {describe(exc)}") from exc

    async def next_published(self) -> Event:
        """The next message, in order; waits through outages and raises only after disconnect()."""
        event = await self._events.get()
        if event is None:
            self._events.put_nowait(None)  # wake any other waiter too
            raise BrokerUnavailable("backend disconnected")
        return event

    async def _change(self, kind: str, channel: str) -> None:
        """SUBSCRIBE/UNSUBSCRIBE on the live connection, if any; a failure ends that connection."""
        pubsub = self._pubsub
        if pubsub is None:
            return  # down: _wanted is the record, the next session applies it
        try:
            await self._send_and_confirm(pubsub, kind, channel)
        except _DOWN_ERRORS as exc:
            if self._pubsub is pubsub:
                self._lost(exc)
        else:
            if kind == "subscribe":
                self._live.add(channel)
            else:
                self._live.discard(channel)

    async def _send_and_confirm(self, pubsub: PubSub, kind: str, channel: str) -> None:
        """Send the command and wait until the reader sees Redis confirm it."""
        if pubsub.connection is None or not pubsub.connection.is_connected:
            # Sending now would let redis-py reconnect behind our back.
            raise redis_errors.ConnectionError("not connected")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirms[channel] = (kind, waiter)
        try:
            async with within(self._op_timeout, f"Redis {kind.upper()}"):
                if kind == "subscribe":
                    await pubsub.subscribe(channel)
                else:
                    await pubsub.unsubscribe(channel)
                await waiter
        finally:
            if self._confirms.get(channel, (kind, None))[1] is waiter:
                del self._confirms[channel]

    def _lost(self, reason: BaseException) -> None:
        """Mark the broker down now and make the reader end this session."""
        self._mark_down(reason)
        self._kicked = reason

    async def _session(self) -> None:
        """One connection's life: connect, re-subscribe, read until the connection fails."""
        client = aioredis.Redis.from_url(self._url, **self._client_options())
        pubsub = client.pubsub()
        reader: asyncio.Task[None] | None = None
        self._kicked = None
        self._session_was_up = False
        try:
            async with within(self._op_timeout, "connecting to Redis"):
                await pubsub.connect()
                assert self._publisher is not None
                await self._publisher.ping()
            self._live.clear()
            self._pubsub = pubsub
            reader = asyncio.create_task(self._read(pubsub))
            await self._resubscribe(pubsub)
            self._mark_up()
            self._session_was_up = True
            await reader
        finally:
            self._up.clear()
            self._pubsub = None
            self._live.clear()
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _resubscribe(self, pubsub: PubSub) -> None:
        async def one(channel: str) -> None:
            async with self._locks.hold(channel):
                if channel in self._wanted and channel not in self._live:
                    await self._send_and_confirm(pubsub, "subscribe", channel)
                    self._live.add(channel)

        # Concurrently, so that thousands of channels cost one round trip rather than thousands.
        results = await asyncio.gather(*(one(ch) for ch in list(self._wanted)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _read(self, pubsub: PubSub) -> None:
        """Deliver messages in order; PING when idle, so a silent dead peer is noticed too."""
        loop = asyncio.get_running_loop()
        last_seen = loop.time()
        try:
            while True:
                if self._kicked is not None:
                    raise self._kicked
                if pubsub.connection is None or not pubsub.connection.is_connected:
                    raise redis_errors.ConnectionError("connection closed")
                message = await pubsub.get_message(timeout=self._health_interval)
                now = loop.time()
                if message is not None:
                    last_seen = now
                    self._dispatch(message)
                elif now - last_seen > 3 * self._health_interval:
                    raise redis_errors.TimeoutError(f"no reply from Redis for {now - last_seen:.1f} s")
                elif now - last_seen >= self._health_interval:
                    await pubsub.ping(_PING)
        except BaseException as exc:
            for _, waiter in self._confirms.values():
                if not waiter.done():
                    waiter.set_exception(redis_errors.ConnectionError(f"connection lost: {describe(exc)}"))
            raise

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message":
            channel = _text(message["channel"])
            # A message can still arrive just after the last subscriber left.
            if channel in self._wanted:
                self._events.put_nowait(Event(channel=channel, message=_text(message["data"])))
        elif kind in ("subscribe", "unsubscribe"):
            confirm = self._confirms.get(_text(message["channel"]))
            if confirm is not None and confirm[0] == kind and not confirm[1].done():
                confirm[1].set_result(None)
