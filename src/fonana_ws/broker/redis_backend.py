"""Redis pub/sub backend for broadcaster that survives broker restarts and concurrent subscribers.

broadcaster 0.3.1's own Redis backend delivers nothing with redis-py 8, loses subscribers when the
same channel is subscribed concurrently and dies silently when the connection drops. This one keeps
one PubSub connection for all channels, and reconnects with backoff,
re-subscribing every channel still in use.

History (protocol §7.8): per channel key K, a hash ``fonana-ws:history:{K}:meta`` (``epoch``, ``offset``)
and a stream ``fonana-ws:history:{K}:events`` whose entry ids are ``N-0`` for offset N (so XRANGE by
offset is direct), each entry with fields ``e`` (the event text) and ``t`` (Redis's clock, ms). One Lua
script allocates, appends, trims (MAXLEN size, entries older than ttl) and PUBLISHes; both keys expire
after ttl idle. A Redis that lost them (restarted empty, FLUSH, expiry) has no ``meta``: a new epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
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
from fonana_ws.broker.history import HistoryLimits, Position, Replay, Target

logger = logging.getLogger("fonana_ws.broker")

# Errors that mean "Redis is unreachable right now", as opposed to a bug or a bad argument.
_DOWN_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError)
_PING = "fonana-ws-health"  # idle PINGs: their replies prove the connection is alive
# PUBLISH each (channel, message) pair of ARGV. EVAL rather than EVALSHA: the script is short, and EVAL
# never needs a second round trip (NOSCRIPT) after a server restart.
_PUBLISH_ALL = "for i = 1, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end return #ARGV / 2"

# The key's meta hash, made with the given epoch when missing (its stream is stale then: dropped).
_HISTORY_META = """
local function meta_of(meta, stream, epoch, ttl_ms)
  local found = redis.call('HMGET', meta, 'epoch', 'offset')
  if found[1] then return found[1], tonumber(found[2]) end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', meta, ttl_ms)
  return epoch, 0
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
# ARGV: size, ttl_ms, then per target channel, envelope, event, epoch; a target with event '' is a plain
# PUBLISH, each other one takes the next two KEYS (meta, stream). Returns each target's offset (0: none).
# The offset is inserted as with_offset() does, before the closing braces.
_PUBLISH_TARGETS = (
    _HISTORY_META
    + """
local size, ttl_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, k, offsets = now_ms(), 1, {}
for i = 3, #ARGV, 4 do
  local channel, envelope, event = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if event == '' then
    redis.call('PUBLISH', channel, envelope)
    offsets[#offsets + 1] = 0
  else
    local meta, stream = KEYS[k], KEYS[k + 1]
    k = k + 2
    meta_of(meta, stream, ARGV[i + 3], ttl_ms)
    local n = redis.call('HINCRBY', meta, 'offset', 1)
    local tail = ',"offset":' .. n
    local stored = string.sub(event, 1, -2) .. tail .. '}'
    redis.call('XADD', stream, 'MAXLEN', size, n .. '-0', 'e', stored, 't', now)
    while true do
      local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
      if not first or tonumber(first[2][4]) >= now - ttl_ms then break end
      redis.call('XDEL', stream, first[1])
    end
    redis.call('PEXPIRE', meta, ttl_ms)
    redis.call('PEXPIRE', stream, ttl_ms)
    redis.call('PUBLISH', channel, string.sub(envelope, 1, -3) .. tail .. '}}')
    offsets[#offsets + 1] = n
  end
end
return offsets
"""
)
# KEYS: meta, stream; ARGV: epoch if new, ttl_ms. Returns {epoch, offset}.
_HISTORY_POSITION = (
    _HISTORY_META
    + """
local epoch, offset = meta_of(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]))
return {epoch, offset}
"""
)
# KEYS: meta, stream; ARGV: epoch if new, ttl_ms, after, asked epoch. Returns {epoch, offset, complete,
# event texts...}: complete is 1 when every event after ``after`` is still kept and younger than ttl.
_HISTORY_SINCE = (
    _HISTORY_META
    + """
local ttl_ms, after = tonumber(ARGV[2]), tonumber(ARGV[3])
local epoch, offset = meta_of(KEYS[1], KEYS[2], ARGV[1], ttl_ms)
local reply = {epoch, offset, 0}
if epoch ~= ARGV[4] or after > offset or after < 0 then return reply end
if after == offset then reply[3] = 1 return reply end
local entries = redis.call('XRANGE', KEYS[2], (after + 1) .. '-0', '+')
if #entries ~= offset - after or entries[1][1] ~= (after + 1) .. '-0' then return reply end
if tonumber(entries[1][2][4]) < now_ms() - ttl_ms then return reply end
for _, entry in ipairs(entries) do reply[#reply + 1] = entry[2][2] end
reply[3] = 1
return reply
"""
)


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


_SHAS = {script: _sha(script) for script in (_PUBLISH_TARGETS, _HISTORY_POSITION, _HISTORY_SINCE)}


async def _run(client: aioredis.Redis, script: str, numkeys: int, *args: Any) -> Any:
    """EVALSHA, then EVAL once Redis answers NOSCRIPT (it ran nothing then: a restart emptied its cache).

    The history scripts are long enough that sending and hashing them on every call (EVAL) measured
    ~20 % slower per single-target publish than EVALSHA.
    """
    try:
        return await client.evalsha(_SHAS[script], numkeys, *args)
    except redis_errors.NoScriptError:
        return await client.eval(script, numkeys, *args)


def history_keys(key: str) -> tuple[str, str]:
    """The Redis keys of a channel key's history: (meta hash, event stream), in one cluster slot."""
    return f"fonana-ws:history:{{{key}}}:meta", f"fonana-ws:history:{{{key}}}:events"


def _ttl_ms(limits: HistoryLimits) -> int:
    return max(1, round(limits.ttl * 1000))


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
        self._no_history_epoch = uuid.uuid4().hex[:12]  # without scripts: nothing kept, no old epoch holds
        # history_position calls waiting for this loop turn's pipeline, and the pipelines under way.
        self._positions: list[tuple[str, int, asyncio.Future[Position]]] = []
        self._flushes: set[asyncio.Future[None]] = set()
        #: Pipelines sent for history_position (a test counts round trips with it).
        self.position_round_trips = 0

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

    async def publish_targets(self, targets: Sequence[Target], limits: HistoryLimits) -> list[int | None]:
        """Publish every target in one Lua script, all or none (see publish_many); return the offsets.

        A target with history gets the key's next offset, is appended to its stream, trimmed and
        PUBLISHed in the same script, so two processes publishing to one key never reuse or skip an
        offset. A Redis that refuses scripts gets the targets published without history (as a
        hand-written PUBLISH would be: live delivery only, no offset), with a warning.
        """
        history = limits.enabled
        for t in targets:
            if history and t.key:
                if not (t.envelope.endswith("}}") and t.event.endswith("}")):
                    raise ValueError(f"target for {t.key!r}: envelope must end with }}}} and event with }}")
            self._check_size(t.envelope)
        if not self.is_up or self._publisher is None:
            raise BrokerUnavailable("Redis is unreachable")
        if not (history and self._scripting and any(t.key for t in targets)):
            await self.publish_many([(t.channel, t.envelope) for t in targets])
            return [None] * len(targets)
        keys: list[str] = []
        args: list[str | int] = [limits.size, _ttl_ms(limits)]
        for t in targets:
            if t.key:
                keys.extend(history_keys(t.key))
                args.extend((t.channel, t.envelope, t.event, uuid.uuid4().hex[:12]))
            else:
                args.extend((t.channel, t.envelope, "", ""))
        publisher = self._publisher
        try:
            async with within(self._op_timeout, f"Redis publish of {len(targets)} targets"):
                offsets = await _run(publisher, _PUBLISH_TARGETS, len(keys), *keys, *args)
        except redis_errors.ResponseError as exc:
            if not _refused(exc):
                raise
            self._scripting = False
            logger.warning("Redis refused EVAL (%s): publishing without history", describe(exc))
            await self.publish_many([(t.channel, t.envelope) for t in targets])
            return [None] * len(targets)
        except _DOWN_ERRORS as exc:
            raise BrokerUnavailable(f"Redis publish failed: {describe(exc)}") from exc
        return [int(n) or None for n in offsets]

    async def _history_call(self, script: str, key: str, *args: str | int) -> list[Any] | None:
        """The script's reply, or None when this Redis refuses scripts (it has no history then)."""
        if not self.is_up or self._publisher is None:
            raise BrokerUnavailable("Redis is unreachable")
        if not self._scripting:
            return None
        try:
            async with within(self._op_timeout, "Redis history"):
                return await _run(self._publisher, script, 2, *history_keys(key), *args)
        except redis_errors.ResponseError as exc:
            if not _refused(exc):
                raise
            self._scripting = False
            logger.warning("Redis refused EVALSHA (%s): no history", describe(exc))
            return None
        except _DOWN_ERRORS as exc:
            raise BrokerUnavailable(f"Redis history failed: {describe(exc)}") from exc

    async def history_position(self, key: str, limits: HistoryLimits) -> Position:
        """The key's epoch and last offset; makes the epoch (offset 0) when the key has none.

        Every join asks this once per key: concurrent calls (2,000 joins after a restart) are sent
        together, one pipeline per event-loop turn, rather than one round trip each.
        """
        if not self.is_up or self._publisher is None:
            raise BrokerUnavailable("Redis is unreachable")
        if not self._scripting:
            return Position(self._no_history_epoch, 0)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Position] = loop.create_future()
        self._positions.append((key, _ttl_ms(limits), waiter))
        if len(self._positions) == 1:
            loop.call_soon(self._flush_positions)
        return await waiter

    def _flush_positions(self) -> None:
        batch, self._positions = self._positions, []
        task = asyncio.ensure_future(self._positions_of(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _positions_of(self, batch: list[tuple[str, int, asyncio.Future[Position]]]) -> None:
        """Answer every waiter of the batch from one pipeline (two after a NOSCRIPT)."""
        try:
            replies = await self._position_pipeline(batch)
        except BaseException as exc:
            for _, _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, waiter), reply in zip(batch, replies, strict=True):
            if waiter.done():
                continue
            if isinstance(reply, BaseException):
                waiter.set_exception(reply)
            elif reply is None:
                waiter.set_result(Position(self._no_history_epoch, 0))
            else:
                waiter.set_result(Position(_text(reply[0]), int(reply[1])))

    async def _position_pipeline(self, batch: list[tuple[str, int, asyncio.Future[Position]]]) -> list[Any]:
        publisher = self._publisher
        if publisher is None:
            raise BrokerUnavailable("Redis is unreachable")

        async def send(items: list[int], script: bool) -> list[Any]:
            self.position_round_trips += 1
            async with publisher.pipeline(transaction=False) as pipe:
                for i in items:
                    key, ttl_ms, _ = batch[i]
                    args = (*history_keys(key), uuid.uuid4().hex[:12], ttl_ms)
                    if script:
                        pipe.eval(_HISTORY_POSITION, 2, *args)
                    else:
                        pipe.evalsha(_SHAS[_HISTORY_POSITION], 2, *args)
                return list(await pipe.execute(raise_on_error=False))

        try:
            async with within(self._op_timeout, f"Redis history of {len(batch)} keys"):
                replies = await send(list(range(len(batch))), script=False)
                missing = [i for i, r in enumerate(replies) if isinstance(r, redis_errors.NoScriptError)]
                if missing:  # a restart emptied the script cache: EVAL those, once
                    for i, reply in zip(missing, await send(missing, script=True), strict=True):
                        replies[i] = reply
        except _DOWN_ERRORS as exc:
            raise BrokerUnavailable(f"Redis history failed: {describe(exc)}") from exc
        for i, reply in enumerate(replies):
            if isinstance(reply, redis_errors.ResponseError) and _refused(reply):
                if self._scripting:
                    logger.warning("Redis refused EVALSHA (%s): no history", describe(reply))
                self._scripting = False
                replies[i] = None
        return replies

    async def history_since(self, key: str, offset: int, epoch: str, limits: HistoryLimits) -> Replay:
        """The key's events after ``offset`` as stored, read in one script (one consistent moment)."""
        reply = await self._history_call(
            _HISTORY_SINCE, key, uuid.uuid4().hex[:12], _ttl_ms(limits), offset, epoch
        )
        if reply is None:
            return Replay(self._no_history_epoch, 0, None)
        now_epoch, last, complete = _text(reply[0]), int(reply[1]), int(reply[2])
        return Replay(now_epoch, last, [_text(e) for e in reply[3:]] if complete else None)

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
