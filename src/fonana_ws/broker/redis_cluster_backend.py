"""Redis Cluster backend: sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis >= 7.0) with per-key history.

URL: ``redis+cluster://[user:password@]host:port[,host:port...][/]``; the hosts are startup nodes, the
rest of the topology is asked of them. A broker channel C lives in C's slot; so does its history,
``fonana-ws:history:{C}:meta`` / ``:events`` (hash tag ``{C}``), so each history script and the
SPUBLISH it does stay in one slot. Subscriptions are spread over the primaries: one pub/sub connection
per primary that owns a subscribed channel's slot.

One session holds one view of the topology. Anything that says the view is stale (a connection lost,
MOVED on SSUBSCRIBE, Redis unsubscribing us because the slot moved) ends the session: the broker is
reported down, the supervisor (``base.Supervised``) starts a new session, which asks the cluster for
its topology again and re-subscribes every channel on its owner now (after a failover: the promoted
replica). A publish spans shards as one script per slot: all or none per slot, not across slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from broadcaster import BroadcastBackend, Event
from redis import asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

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
from fonana_ws.broker.redis_backend import (
    _HISTORY_META,
    _HISTORY_POSITION,
    _HISTORY_SINCE,
    _SHAS,
    _run,
    _sha,
    _text,
    _ttl_ms,
)
from fonana_ws.protocol.envelope import key_channel

logger = logging.getLogger("fonana_ws.broker")

SCHEME = "redis+cluster"
_DOWN_ERRORS = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterError,
    redis_errors.RedisClusterException,
    redis_errors.MovedError,
    redis_errors.TryAgainError,
    OSError,
    TimeoutError,
)
_PING = "fonana-ws-health"

# KEYS per target: channel, meta, stream (all in the channel's slot). ARGV: size, ttl_ms, then per target
# envelope, event ('' for a plain SPUBLISH), epoch. Returns each target's offset (0: none).
_PUBLISH_SLOT = (
    _HISTORY_META
    + """
local size, ttl_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, offsets = now_ms(), {}
for t = 0, #KEYS / 3 - 1 do
  local channel, meta, stream = KEYS[3 * t + 1], KEYS[3 * t + 2], KEYS[3 * t + 3]
  local envelope, event = ARGV[3 * t + 3], ARGV[3 * t + 4]
  if event == '' then
    redis.call('SPUBLISH', channel, envelope)
    offsets[#offsets + 1] = 0
  else
    meta_of(meta, stream, ARGV[3 * t + 5], ttl_ms)
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
    redis.call('SPUBLISH', channel, string.sub(envelope, 1, -3) .. tail .. '}}')
    offsets[#offsets + 1] = n
  end
end
return offsets
"""
)
_SHAS[_PUBLISH_SLOT] = _sha(_PUBLISH_SLOT)


def cluster_history_keys(channel: str) -> tuple[str, str]:
    """The history keys of a broker channel, in the channel's own slot."""
    return f"fonana-ws:history:{{{channel}}}:meta", f"fonana-ws:history:{{{channel}}}:events"


def startup_nodes(url: str) -> tuple[list[ClusterNode], dict[str, Any]]:
    """The URL's host:port list, and the credentials to pass to every node."""
    parts = urlsplit(url)
    if parts.scheme.lower() != SCHEME:
        raise ValueError(f"not a {SCHEME}:// URL: {mask_url(url)}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    auth: dict[str, Any] = {}
    if userinfo:
        user, _, password = userinfo.partition(":")
        auth = {"username": unquote(user) or None, "password": unquote(password) or None}
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{SCHEME}:// wants host:port[,host:port...], got {item!r}")
        nodes.append(ClusterNode(host, int(port)))
    return nodes, auth


class _Link:
    """The sharded pub/sub connection to one primary."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pubsub: PubSub = client.pubsub()
        self.reader: asyncio.Task[None] | None = None


class RedisClusterBackend(Supervised, BroadcastBackend):
    """broadcaster backend on a Redis Cluster's sharded pub/sub, with a health flag (``is_up``)."""

    def __init__(
        self,
        url: str,
        *,
        op_timeout: float = 2.0,
        health_interval: float = 1.0,
        max_backoff: float = 2.0,
        max_payload: int = 64 * 1024 * 1024,
    ) -> None:
        self._nodes, self._auth = startup_nodes(url)
        self.safe_url = mask_url(url)
        self._op_timeout = op_timeout
        self._health_interval = health_interval
        self._max_backoff = max_backoff
        self._max_payload = max_payload
        self._wanted: set[str] = set()
        self._locks = KeyedLocks()
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._up = asyncio.Event()
        self._down_since: float | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._session_was_up = False
        # State of the current session.
        self._cluster: RedisCluster | None = None
        self._links: dict[str, _Link] = {}
        self._live: set[str] = set()
        self._confirms: dict[str, tuple[str, asyncio.Future[None]]] = {}
        self._ended: asyncio.Future[None] | None = None

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    def _options(self) -> dict[str, Any]:
        return {
            "socket_connect_timeout": self._op_timeout,
            "socket_timeout": self._op_timeout,
            "socket_keepalive": True,
            "protocol": 2,
            **self._auth,
        }

    async def connect(self) -> None:
        if self._supervisor is not None:
            return
        self._events = asyncio.Queue()
        await self._start("fonana-ws redis cluster broker")

    async def disconnect(self) -> None:
        await self._stop()
        self._wanted.clear()
        self._events.put_nowait(None)

    async def subscribe(self, channel: str) -> None:
        async with self._locks.hold(channel):
            self._wanted.add(channel)
            if channel not in self._live:
                await self._change("ssubscribe", channel)

    async def unsubscribe(self, channel: str) -> None:
        async with self._locks.hold(channel):
            self._wanted.discard(channel)
            if channel in self._live:
                await self._change("sunsubscribe", channel)

    def _check_size(self, message: Any) -> None:
        size = len(message.encode()) if isinstance(message, str) else len(message)
        if size > self._max_payload:
            raise PayloadTooLarge(f"{size} bytes is over the {self._max_payload} byte limit")

    def _client(self) -> RedisCluster:
        if not self.is_up or self._cluster is None:
            raise BrokerUnavailable("Redis Cluster is unreachable")
        return self._cluster

    async def publish(self, channel: str, message: Any) -> None:
        await self.publish_many([(channel, message)])

    async def publish_many(self, items: Sequence[tuple[str, Any]]) -> None:
        """One script per slot, the slots concurrently: all or none per slot."""
        await self.publish_targets(
            [Target(channel, message) for channel, message in items], HistoryLimits(0, 0)
        )

    async def publish_targets(self, targets: Sequence[Target], limits: HistoryLimits) -> list[int | None]:
        history = limits.enabled
        for t in targets:
            if history and t.key and not (t.envelope.endswith("}}") and t.event.endswith("}")):
                raise ValueError(f"target for {t.key!r}: envelope must end with }}}} and event with }}")
            self._check_size(t.envelope)
        cluster = self._client()
        by_slot: dict[int, list[int]] = defaultdict(list)
        for i, t in enumerate(targets):
            by_slot[key_slot(t.channel.encode())].append(i)
        offsets: list[int | None] = [None] * len(targets)

        async def one_slot(indexes: list[int]) -> None:
            keys: list[str] = []
            args: list[str | int] = [max(limits.size, 1), _ttl_ms(limits) if history else 1]
            for i in indexes:
                t = targets[i]
                kept = history and t.key is not None
                keys.extend((t.channel, *cluster_history_keys(t.channel)))
                args.extend((t.envelope, t.event if kept else "", uuid.uuid4().hex[:12]))
            reply = await _run(cluster, _PUBLISH_SLOT, len(keys), *keys, *args)
            for i, n in zip(indexes, reply, strict=True):
                offsets[i] = int(n) or None

        try:
            async with within(self._op_timeout, f"Redis Cluster publish of {len(targets)} targets"):
                await asyncio.gather(*(one_slot(ix) for ix in by_slot.values()))
        except _DOWN_ERRORS as exc:
            raise BrokerUnavailable(f"Redis Cluster publish failed: {describe(exc)}") from exc
        return offsets

    async def _history(self, script: str, key: str, *args: str | int) -> list[Any]:
        cluster = self._client()
        try:
            async with within(self._op_timeout, "Redis Cluster history"):
                return await _run(cluster, script, 2, *cluster_history_keys(key_channel(key)), *args)
        except _DOWN_ERRORS as exc:
            raise BrokerUnavailable(f"Redis Cluster history failed: {describe(exc)}") from exc

    async def history_position(self, key: str, limits: HistoryLimits) -> Position:
        reply = await self._history(_HISTORY_POSITION, key, uuid.uuid4().hex[:12], _ttl_ms(limits))
        return Position(_text(reply[0]), int(reply[1]))

    async def history_since(self, key: str, offset: int, epoch: str, limits: HistoryLimits) -> Replay:
        reply = await self._history(
            _HISTORY_SINCE, key, uuid.uuid4().hex[:12], _ttl_ms(limits), offset, epoch
        )
        now_epoch, last, complete = _text(reply[0]), int(reply[1]), int(reply[2])
        return Replay(now_epoch, last, [_text(e) for e in reply[3:]] if complete else None)

    async def next_published(self) -> Event:
        event = await self._events.get()
        if event is None:
            self._events.put_nowait(None)
            raise BrokerUnavailable("backend disconnected")
        return event

    # --- subscriptions -------------------------------------------------------------------------------

    def _end(self, reason: BaseException) -> None:
        """The session's view of the cluster is no longer right: down now, a new session follows."""
        self._mark_down(reason)
        if self._ended is not None and not self._ended.done():
            self._ended.set_exception(reason)

    async def _link_for(self, channel: str) -> _Link:
        cluster = self._cluster
        if cluster is None:
            raise redis_errors.ConnectionError("no session")
        node = cluster.nodes_manager.get_node_from_slot(key_slot(channel.encode()))
        link = self._links.get(node.name)
        if link is None:
            link = _Link(
                aioredis.Redis(host=node.host, port=node.port, retry=Retry(NoBackoff(), 0), **self._options())
            )
            self._links[node.name] = link
            async with within(self._op_timeout, f"connecting to {node.name}"):
                await link.pubsub.connect()
                info = await link.client.execute_command("CLUSTER INFO")
            # redis-py parses the reply into a dict; be safe with the raw text too.
            state = info.get("cluster_state") if isinstance(info, dict) else _text(info)
            if state != "ok" and "cluster_state:ok" not in str(state):
                raise redis_errors.ClusterDownError(f"{node.name}: cluster state is not ok")
            link.reader = asyncio.create_task(self._read(node.name, link))
        return link

    async def _change(self, kind: str, channel: str) -> None:
        if self._cluster is None or not self.is_up:
            return  # down: _wanted is the record, the next session applies it
        try:
            await self._send_and_confirm(kind, channel)
        except (*_DOWN_ERRORS, redis_errors.ResponseError) as exc:
            self._end(exc)
        else:
            (self._live.add if kind == "ssubscribe" else self._live.discard)(channel)

    async def _send_and_confirm(self, kind: str, channel: str) -> None:
        link = await self._link_for(channel)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirms[channel] = (kind, waiter)
        try:
            async with within(self._op_timeout, f"Redis {kind.upper()}"):
                if kind == "ssubscribe":
                    await link.pubsub.ssubscribe(channel)
                else:
                    await link.pubsub.sunsubscribe(channel)
                await waiter
        finally:
            if self._confirms.get(channel, (kind, None))[1] is waiter:
                del self._confirms[channel]

    async def _session(self) -> None:
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(n.host, n.port) for n in self._nodes],  # fresh: no closed pools
            require_full_coverage=True,
            retry=Retry(NoBackoff(), 1),
            **self._options(),
        )
        self._session_was_up = False
        self._ended = asyncio.get_running_loop().create_future()
        try:
            async with within(2 * self._op_timeout, "asking the Redis Cluster for its topology"):
                await cluster.initialize()
            self._cluster = cluster
            self._live.clear()
            channels = list(self._wanted)

            async def one(channel: str) -> None:
                async with self._locks.hold(channel):
                    if channel in self._wanted and channel not in self._live:
                        await self._send_and_confirm("ssubscribe", channel)
                        self._live.add(channel)

            async with within(4 * self._op_timeout, f"re-subscribing {len(channels)} channels"):
                results = await asyncio.gather(*(one(ch) for ch in channels), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            if not self._links:  # nothing subscribed yet: still prove the cluster answers
                await self._link_for("fonana-ws:health")
            self._mark_up()
            self._session_was_up = True
            await self._ended
        finally:
            self._up.clear()
            self._cluster = None
            self._live.clear()
            links, self._links = self._links, {}
            for link in links.values():
                if link.reader is not None:
                    link.reader.cancel()
                    with contextlib.suppress(BaseException):
                        await link.reader
                with contextlib.suppress(Exception):
                    await link.pubsub.aclose()
                with contextlib.suppress(Exception):
                    await link.client.aclose()
            with contextlib.suppress(Exception):
                await cluster.aclose()

    async def _read(self, name: str, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        last_seen = loop.time()
        pubsub = link.pubsub
        try:
            while True:
                if pubsub.connection is None or not pubsub.connection.is_connected:
                    raise redis_errors.ConnectionError(f"{name}: connection closed")
                if not pubsub.subscribed:
                    await asyncio.sleep(self._health_interval)
                    last_seen = loop.time()
                    continue
                message = await pubsub.get_message(timeout=self._health_interval)
                now = loop.time()
                if message is not None:
                    last_seen = now
                    self._dispatch(name, message)
                elif now - last_seen > 3 * self._health_interval:
                    raise redis_errors.TimeoutError(f"{name}: no reply for {now - last_seen:.1f} s")
                elif now - last_seen >= self._health_interval:
                    await pubsub.ping(_PING)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            for _, waiter in self._confirms.values():
                if not waiter.done():
                    waiter.set_exception(redis_errors.ConnectionError(f"{name}: {describe(exc)}"))
            self._end(exc)

    def _dispatch(self, name: str, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "smessage":
            channel = _text(message["channel"])
            if channel in self._wanted:
                self._events.put_nowait(Event(channel=channel, message=_text(message["data"])))
        elif kind in ("ssubscribe", "sunsubscribe"):
            channel = _text(message["channel"])
            confirm = self._confirms.get(channel)
            if confirm is not None and confirm[0] == kind and not confirm[1].done():
                confirm[1].set_result(None)
            elif kind == "sunsubscribe" and channel in self._wanted:
                # Unasked: the slot moved away from this node (failover, resharding).
                self._end(redis_errors.ConnectionError(f"{name} dropped {channel}: its slot moved"))
