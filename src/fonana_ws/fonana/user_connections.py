"""Each user's authenticated connections, counted across every process (``WS_MAX_CONNECTIONS_PER_USER``).

The count lives where the broker lives, so that all processes of one deployment see the same number:
in memory (one process), in Redis (one sorted set per user; on a cluster hash-tagged per user, the sweep's
index split into INDEX_SHARDS keys) or in PostgreSQL (one row per connection).
Every entry carries an expiry that its process pushes forward every TTL/3, so the entries of a process
that died without a word (SIGKILL, OOM, a lost host) stop counting after TTL and heal by themselves.

When Redis or PostgreSQL cannot be reached, ``acquire`` admits the connection (fail-open) within
``op_timeout`` and one warning is logged per outage: a broker outage must not lock every user out, and
the limit is a guard against runaway clients, not a security boundary. After a failure the backend is
not asked again for RETRY_INTERVAL, so a hung backend delays at most one connect per interval.
Connections admitted during an outage are still recorded here and written to the backend by the first
refresh once it is back, so the count is right again within about a second.

Online status (protocol §7.3) is this count above 0, so there is one registry of connections, not two:
``admit`` also says whether the user just came online (0 -> 1 anywhere, and not within ``grace`` of
their last connection closing: a reload is no change), ``release`` whether their last connection
anywhere just went, and the backend keeps when that was (``lastSeen``). Each refresh also sweeps the
expired entries of dead processes, atomically (one Lua script; one PostgreSQL function under per-user
locks), so that exactly one surviving process learns that a user of a dead process went offline
(``on_offline``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
import zlib
from typing import Any

import asyncpg
from redis import asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from fonana_ws.broker.base import describe, mask_url, within
from fonana_ws.broker.postgres_backend import plain_dsn
from fonana_ws.broker.redis_cluster_backend import startup_nodes
from fonana_ws.config import Settings

log = logging.getLogger("fonana_ws.limits")

#: Seconds between attempts while the backend is down: acquires in between admit without asking.
RETRY_INTERVAL = 1.0
#: Seconds a user's ``lastSeen`` is kept after their last connection closed (30 days).
LAST_SEEN_TTL = 30 * 24 * 3600.0
#: Dead-process users one sweep handles; the rest wait for the next refresh (TTL/3 later).
SWEEP_BATCH = 1000

#: (backend clock in epoch seconds, user -> (live connections, lastSeen epoch seconds or None)).
Lookup = tuple[float, dict[str, tuple[int, float | None]]]


class UserConnections:
    """The per-user connection count shared by all processes; ``for_settings`` picks the backend.

    ``conn_id`` needs to be unique within this process only: the shared backends prefix it with a
    per-process id. ``acquire`` on a ``conn_id`` already held returns True without counting it twice.
    """

    limit: int
    #: Seconds after a user's last connection closed within which a new one is no "came online".
    grace: float = 0.0
    #: Told the users whose last connections were entries of dead processes, swept by this process.
    on_offline: Any = None
    #: Set when the process begins to shut down: releases from then on are left to ``stop``.
    closing: bool = False

    async def start(self) -> None:
        """Connect and start refreshing; does not fail when the backend is down (see the module doc)."""

    async def stop(self) -> None:
        """Stop refreshing and let go of every connection this process holds: their entries expire
        ``grace`` seconds later, so that a survivor's sweep announces the users who did not come back
        (a rolling restart whose clients reconnect elsewhere within the grace is no change)."""

    async def acquire(self, user_id: str, conn_id: str) -> bool:
        """Record the connection and return True if the user's count stays within the limit, else False."""
        return (await self.admit(user_id, conn_id))[0]

    async def admit(self, user_id: str, conn_id: str) -> tuple[bool, bool]:
        """``acquire``, and whether the user came online with it (False while the backend is down)."""
        raise NotImplementedError

    async def release(self, user_id: str, conn_id: str) -> bool:
        """Forget the connection; True if it was the user's last one anywhere. Never raises (on failure
        its entry expires after TTL and a sweep reports the user)."""
        raise NotImplementedError

    async def lookup(self, user_ids: list[str]) -> Lookup:
        """The users' live connections and lastSeen, in one round trip; raises when unreachable."""
        raise NotImplementedError

    async def count(self, user_id: str) -> int:
        """The user's live connections across all processes; raises when the backend is unreachable."""
        raise NotImplementedError


class MemoryUserConnections(UserConnections):
    """One process: the count is a set of connection ids per user."""

    #: lastSeen entries kept (the oldest go first): a bound on one process's memory.
    MAX_LAST_SEEN = 100_000

    def __init__(self, limit: int, *, grace: float = 0.0) -> None:
        self.limit = limit
        self.grace = grace
        self._users: dict[str, set[str]] = {}
        #: user -> epoch seconds their last connection closed, oldest first.
        self._last_seen: dict[str, float] = {}

    async def stop(self) -> None:
        self._users.clear()

    async def admit(self, user_id: str, conn_id: str) -> tuple[bool, bool]:
        held = self._users.get(user_id, set())
        if conn_id not in held and len(held) >= self.limit:
            return False, False
        first = not held
        self._users.setdefault(user_id, held).add(conn_id)
        seen = self._last_seen.get(user_id)
        return True, first and (seen is None or time.time() - seen >= self.grace)

    async def release(self, user_id: str, conn_id: str) -> bool:
        held = self._users.get(user_id)
        if held is None or conn_id not in held:
            return False
        held.discard(conn_id)
        if held:
            return False
        del self._users[user_id]
        self._last_seen.pop(user_id, None)  # re-added last: the dict stays oldest first
        self._last_seen[user_id] = time.time()
        if len(self._last_seen) > self.MAX_LAST_SEEN:
            del self._last_seen[next(iter(self._last_seen))]
        return True

    async def lookup(self, user_ids: list[str]) -> Lookup:
        return time.time(), {u: (len(self._users.get(u, ())), self._last_seen.get(u)) for u in user_ids}

    async def count(self, user_id: str) -> int:
        return len(self._users.get(user_id, ()))


class SharedUserConnections(UserConnections):
    """What the Redis and PostgreSQL backends share: the local record, the refresh loop, fail-open.

    A subclass implements ``_prepare`` (before first use and after each outage), ``_acquire``,
    ``_release`` (True when it was the user's last), ``_refresh`` (push the expiry of the given members
    forward, writing back any that are missing, and sweep: returns the users whose last entries expired;
    also the health probe), ``_drop`` (release many), ``_count``, ``_lookup`` and ``_close``. Each is bounded
    by ``op_timeout``, except ``_refresh`` (``max(op_timeout, ttl / 3)``: it is on no connect's path).
    """

    backend_name = ""

    def __init__(self, limit: int, *, ttl: float, op_timeout: float, grace: float = 0.0) -> None:
        if ttl <= 0 or op_timeout <= 0:
            raise ValueError("ttl and op_timeout must be positive")
        self.limit = limit
        self.grace = grace
        self.ttl = ttl
        self.op_timeout = op_timeout
        self.process_id = uuid.uuid4().hex
        self.safe_url = ""
        #: This process's connections: user -> conn ids. The refresh writes exactly these.
        self._mine: dict[str, set[str]] = {}
        self._refresher: asyncio.Task[None] | None = None
        # Releases made while a refresh is in flight (None when none is): that refresh, sent on another
        # connection, may write them back after their release, so they are released again after it.
        self._late: list[tuple[str, str]] | None = None
        self._prepared = False
        self._down_since: float | None = None
        self._retry_at = 0.0

    @property
    def is_up(self) -> bool:
        """False from a failed backend operation until the next one that succeeds."""
        return self._down_since is None

    def _member(self, conn_id: str) -> str:
        return f"{self.process_id}:{conn_id}"

    async def start(self) -> None:
        if self._refresher is not None:
            return
        await self._call(self._refresh, [])  # prepares, and logs a warning if the backend is down
        self._refresher = asyncio.create_task(
            self._refresh_loop(), name=f"fonana-ws {self.backend_name} conns"
        )

    async def stop(self) -> None:
        task, self._refresher = self._refresher, None
        late = self._late
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        mine = [(user, self._member(c)) for user, conns in self._mine.items() for c in conns]
        self._mine.clear()
        if late and self._reachable():
            await self._call(self._drop, late)
        if mine and self._reachable():
            await self._call(self._fade, mine)
        self._prepared = False
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.op_timeout):
                await self._close()

    async def admit(self, user_id: str, conn_id: str) -> tuple[bool, bool]:
        result = None  # fail-open: see the module doc
        # Cancelled while asking (shutdown), the entry may be written and not ours to refresh: it
        # expires after TTL.
        if self._reachable():
            result = await self._call(self._acquire, user_id, self._member(conn_id))
        if result == 0:
            return False, False
        self._mine.setdefault(user_id, set()).add(conn_id)
        return True, result == 2

    async def release(self, user_id: str, conn_id: str) -> bool:
        if self.closing:
            return False  # the process is shutting down: ``stop`` fades the entry instead
        conns = self._mine.get(user_id)
        if conns is None or conn_id not in conns:
            return False
        conns.discard(conn_id)
        if not conns:
            del self._mine[user_id]
        member = self._member(conn_id)
        if self._late is not None:
            self._late.append((user_id, member))
        if self._reachable():
            return bool(await self._call(self._release, user_id, member))
        return False

    async def count(self, user_id: str) -> int:
        async with within(self.op_timeout, f"{self.backend_name} count"):
            await self._ensure_prepared()
            return await self._count(user_id)

    async def lookup(self, user_ids: list[str]) -> Lookup:
        async with within(self.op_timeout, f"{self.backend_name} lookup"):
            await self._ensure_prepared()
            return await self._lookup(list(dict.fromkeys(user_ids)))

    def _reachable(self) -> bool:
        """False for RETRY_INTERVAL after a failure: while down, connects are not slowed by retries."""
        return self._down_since is None or time.monotonic() >= self._retry_at

    async def _ensure_prepared(self) -> None:
        if not self._prepared:
            await self._prepare()
            self._prepared = True

    async def _call(self, op: Any, *args: Any, seconds: float | None = None) -> Any:
        """``op(*args)`` within ``seconds`` (default ``op_timeout``); None when the backend fails."""
        try:
            async with within(seconds or self.op_timeout, self.backend_name):
                await self._ensure_prepared()
                result = await op(*args)
        except Exception as exc:
            self._mark_down(exc)
            return None
        self._mark_up()
        return result

    def _mark_down(self, reason: BaseException) -> None:
        self._prepared = False  # the backend may come back without our table or scripts
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "per-user connection limit not enforced: %s unreachable (%s, %s); admitting connections "
                "until it is back",
                self.backend_name,
                describe(reason),
                self.safe_url,
            )

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.info(
                "per-user connection limit enforced again: %s back after %.1f s",
                self.backend_name,
                time.monotonic() - self._down_since,
            )
            self._down_since = None

    async def _refresh_loop(self) -> None:
        while True:
            interval = self.ttl / 3
            await asyncio.sleep(interval if self.is_up else min(interval, RETRY_INTERVAL))
            members = [(user, self._member(c)) for user, conns in self._mine.items() for c in conns]
            self._late = []
            try:
                # Not on a connect's path: thousands of members may take longer than one acquire, and
                # entries last TTL, so TTL/3 late is still in time.
                gone = await self._call(self._refresh, members, seconds=max(self.op_timeout, self.ttl / 3))
            finally:
                late, self._late = self._late, None
            if late and self._reachable():
                await self._call(self._drop, late)
            if gone and self.on_offline is not None:
                try:
                    self.on_offline(list(gone))
                except Exception:  # the refresh must go on whatever the listener does
                    log.exception("on_offline failed")

    async def sweep(self) -> list[str]:
        """Refresh and sweep now (tests and the bench); returns the users found gone, as ``on_offline``."""
        members = [(user, self._member(c)) for user, conns in self._mine.items() for c in conns]
        return list(await self._call(self._refresh, members) or [])

    async def _prepare(self) -> None:
        """Make the backend ready (tables, scripts); called again after every outage."""

    async def _acquire(self, user_id: str, member: str) -> int:
        """0: over the limit; 1: recorded; 2: recorded, and the user came online with it."""
        raise NotImplementedError

    async def _release(self, user_id: str, member: str) -> bool:
        raise NotImplementedError

    async def _refresh(self, members: list[tuple[str, str]]) -> list[str]:
        raise NotImplementedError

    async def _lookup(self, user_ids: list[str]) -> Lookup:
        raise NotImplementedError

    async def _drop(self, members: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    async def _fade(self, members: list[tuple[str, str]]) -> None:
        """Make the members expire ``grace`` seconds from now (at shutdown), for the sweep to find."""
        raise NotImplementedError

    async def _count(self, user_id: str) -> int:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


# Scores are expiry times in milliseconds of Redis's own clock (TIME), so that processes whose clocks
# disagree still agree on what has expired. A member is live while its score is above now.
LUA_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# A user's sorted set expires after 2 TTL, not TTL: its dead entries must still be there for the sweep
# (every TTL/3) to see that they went, or their user would never be announced offline.
# KEYS: user's set, the index, user's lastSeen; ARGV: member, limit, ttl ms, grace ms, user.
# Returns 0 over the limit, 1 recorded, 2 recorded and the user came online (see the module doc).
_LUA_ACQUIRE = (
    LUA_NOW
    + """
local ttl = tonumber(ARGV[3])
local removed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
local held = redis.call('ZCARD', KEYS[1])
if not mine and held >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
redis.call('ZADD', KEYS[2], 'GT', now + ttl, ARGV[5])
if mine or held > 0 or removed > 0 then
    return 1
end
local seen = redis.call('GET', KEYS[3])
if seen and now - tonumber(seen) < tonumber(ARGV[4]) then
    return 1
end
return 2
"""
)
# KEYS: user's set, the index, user's lastSeen; ARGV: member, lastSeen ttl ms, user.
# Returns 1 when this was the user's last live entry (lastSeen written), else 0.
_LUA_RELEASE = (
    LUA_NOW
    + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
    return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) > 0 then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], now, 'PX', ARGV[2])
return 1
"""
)
# KEYS: user's set, the index; ARGV: ttl in ms, user, then the members to keep alive (added back if missing).
_LUA_REFRESH = (
    LUA_NOW
    + """
local ttl = tonumber(ARGV[1])
for i = 3, #ARGV do
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
redis.call('ZADD', KEYS[2], 'GT', now + ttl, ARGV[2])
return 1
"""
)
# The index scores each user by their latest entry's expiry, so the users whose entries all expired are
# the index's lowest. KEYS: the index; ARGV: set prefix, lastSeen prefix, lastSeen ttl ms, batch.
# Returns the users whose last entries this call removed: one script runs at a time, so each such user
# is returned to exactly one process.
_LUA_SWEEP = (
    LUA_NOW
    + """
local gone = {}
for _, user in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))) do
    local key = ARGV[1] .. user
    local removed = redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    if #last == 0 then
        redis.call('ZREM', KEYS[1], user)
        if removed > 0 then
            redis.call('SET', ARGV[2] .. user, now, 'PX', ARGV[3])
            gone[#gone + 1] = user
        end
    else
        redis.call('ZADD', KEYS[1], last[2], user)
    end
end
return gone
"""
)
# KEYS: user's set, the index; ARGV: grace ms, user, members. The index score becomes the set's latest
# expiry (lowered, unlike elsewhere), so that the sweep looks at the user once the faded entries expire.
_LUA_FADE = (
    LUA_NOW
    + """
for i = 3, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #last > 0 then
    redis.call('ZADD', KEYS[2], last[2], ARGV[2])
end
return 1
"""
)
_LUA_COUNT = LUA_NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')"
# KEYS: pairs of (user's set, user's lastSeen). Returns {now, count1, seen1 or false, ...}.
_LUA_LOOKUP = (
    LUA_NOW
    + """
local out = {now}
for i = 1, #KEYS, 2 do
    out[#out + 1] = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf')
    out[#out + 1] = redis.call('GET', KEYS[i + 1])
end
return out
"""
)


def redis_client(url: str, *, op_timeout: float, pool_size: int) -> aioredis.Redis:
    """A client for the shared state (connections, presence): every wait bounded by ``op_timeout``.

    A blocking pool caps the connections a connect storm opens (a wait counts against op_timeout); one
    retry lets a command survive a pooled connection that died with a restarted server.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=op_timeout,
        socket_connect_timeout=op_timeout,
        socket_timeout=op_timeout,
        retry=Retry(NoBackoff(), 1),
        protocol=2,
    )
    return aioredis.Redis(connection_pool=pool)


class RedisUserConnections(SharedUserConnections):
    """One sorted set per user, ``<key_prefix>:<user>``, of ``<process>:<conn>`` scored by expiry time.

    ``acquire`` and ``release`` are one Lua script each (drop expired, count, add or remove): atomic, one
    round trip. The refresh is one pipeline of one script per user, and the sweep in the same round trip.
    Each key also expires after 2 TTL, so the sets of users nobody holds any more vanish. Beside them:
    ``<key_prefix>-index``, users scored by their latest expiry (what the sweep looks at), and
    ``<key_prefix>-seen:<user>``, lastSeen in milliseconds, kept LAST_SEEN_TTL.
    """

    backend_name = "Redis"

    def __init__(
        self,
        url: str,
        limit: int,
        *,
        ttl: float = 60.0,
        op_timeout: float = 1.0,
        grace: float = 0.0,
        key_prefix: str = "fonana-ws:conns",
        pool_size: int = 16,
    ) -> None:
        super().__init__(limit, ttl=ttl, op_timeout=op_timeout, grace=grace)
        self.safe_url = mask_url(url)
        self.key_prefix = key_prefix
        self.index_key = f"{key_prefix}-index"
        self.seen_prefix = f"{key_prefix}-seen:"
        self._ttl_ms = max(1, int(ttl * 1000))
        self._grace_ms = int(grace * 1000)
        self._seen_ms = int(LAST_SEEN_TTL * 1000)
        self._client = redis_client(url, op_timeout=op_timeout, pool_size=pool_size)
        self._acquire_script = self._client.register_script(_LUA_ACQUIRE)
        self._release_script = self._client.register_script(_LUA_RELEASE)
        self._refresh_script = self._client.register_script(_LUA_REFRESH)
        self._sweep_script = self._client.register_script(_LUA_SWEEP)
        self._count_script = self._client.register_script(_LUA_COUNT)
        self._fade_script = self._client.register_script(_LUA_FADE)
        self._lookup_script = self._client.register_script(_LUA_LOOKUP)

    def key(self, user_id: str) -> str:
        return f"{self.key_prefix}:{user_id}"

    def _user_keys(self, user_id: str) -> list[str]:
        return [self.key(user_id), self.index_key, self.seen_prefix + user_id]

    async def _acquire(self, user_id: str, member: str) -> int:
        args = [member, self.limit, self._ttl_ms, self._grace_ms, user_id]
        return int(await self._acquire_script(keys=self._user_keys(user_id), args=args))

    async def _release(self, user_id: str, member: str) -> bool:
        args = [member, self._seen_ms, user_id]
        return bool(await self._release_script(keys=self._user_keys(user_id), args=args))

    async def _refresh(self, members: list[tuple[str, str]]) -> list[str]:
        by_user: dict[str, list[str]] = {}
        for user, member in members:
            by_user.setdefault(user, []).append(member)
        async with self._client.pipeline(transaction=False) as pipe:
            for user, held in by_user.items():
                keys = [self.key(user), self.index_key]
                await self._refresh_script(keys=keys, args=[self._ttl_ms, user, *held], client=pipe)
            sweep_args = [self.key_prefix + ":", self.seen_prefix, self._seen_ms, SWEEP_BATCH]
            await self._sweep_script(keys=[self.index_key], args=sweep_args, client=pipe)
            results = await pipe.execute()
        return [u.decode() if isinstance(u, bytes) else str(u) for u in results[-1]]

    async def _drop(self, members: list[tuple[str, str]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for user, member in members:
                pipe.zrem(self.key(user), member)
            await pipe.execute()

    async def _fade(self, members: list[tuple[str, str]]) -> None:
        by_user: dict[str, list[str]] = {}
        for user, member in members:
            by_user.setdefault(user, []).append(member)
        async with self._client.pipeline(transaction=False) as pipe:
            for user, held in by_user.items():
                keys = [self.key(user), self.index_key]
                await self._fade_script(keys=keys, args=[self._grace_ms, user, *held], client=pipe)
            await pipe.execute()

    async def _count(self, user_id: str) -> int:
        return int(await self._count_script(keys=[self.key(user_id)]))

    async def _lookup(self, user_ids: list[str]) -> Lookup:
        keys = [k for u in user_ids for k in (self.key(u), self.seen_prefix + u)]
        out = await self._lookup_script(keys=keys)
        now, found = int(out[0]) / 1000, {}
        for i, user in enumerate(user_ids):
            seen = out[2 + 2 * i]
            found[user] = (int(out[1 + 2 * i]), int(seen) / 1000 if seen else None)
        return now, found

    async def _close(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()


#: Index shards on a cluster: the sweep's index is split over this many keys (each its own slot, so the
#: shards spread over the primaries), a member's shard fixed by a stable hash of it.
INDEX_SHARDS = 16


def index_shard(prefix: str, member: str) -> str:
    """The index shard of ``member``: ``<prefix>:{i}``, i from CRC32 (the same in every process)."""
    return f"{prefix}:{{{zlib.crc32(member.encode()) % INDEX_SHARDS}}}"


def cluster_client(url: str, *, op_timeout: float, pool_size: int) -> RedisCluster:
    """A Redis Cluster client for the shared state, from a ``redis+cluster://`` URL's startup nodes."""
    nodes, auth = startup_nodes(url)
    return RedisCluster(
        startup_nodes=nodes,
        max_connections=max(pool_size, 8),
        socket_connect_timeout=op_timeout,
        socket_timeout=op_timeout,
        protocol=2,
        **auth,
    )


Call = tuple[str, list[str], list[Any]]


async def eval_many(client: RedisCluster, calls: list[Call]) -> list[Any]:
    """EVALSHA each (script, keys, args) in one cluster pipeline (split by node; each call's keys share
    one slot), then EVAL the ones a node did not know (NOSCRIPT: it ran nothing then)."""

    async def send(indexes: list[int], full: bool) -> list[Any]:
        pipe = client.pipeline()
        for i in indexes:
            script, keys, args = calls[i]
            # execute_command: the pipeline's own eval/evalsha methods refuse on a cluster, but a
            # script whose keys share one slot is routed by them like any other command.
            pipe.execute_command(
                "EVAL" if full else "EVALSHA", script if full else _sha1(script), len(keys), *keys, *args
            )
        return list(await pipe.execute(raise_on_error=False))

    if not calls:
        return []
    replies = await send(list(range(len(calls))), False)
    missing = [i for i, r in enumerate(replies) if isinstance(r, redis_errors.NoScriptError)]
    if missing:
        for i, reply in zip(missing, await send(missing, True), strict=True):
            replies[i] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


# The cluster's scripts: the same as above, but each touches the keys of one user only ({U} hash tag);
# the index shards are written by separate commands. A user's index score only ever rises except by the
# fade (ZADD GT now + ttl on every acquire and refresh), and the sweep removes a user from a shard only
# while their score there is still expired: so an acquire racing a sweep either raised the score first
# (the removal is skipped) or lands after it (and adds the user back).
# KEYS: user's set, user's lastSeen; ARGV: member, limit, ttl ms, grace ms.
_CLUSTER_ACQUIRE = (
    LUA_NOW
    + """
local ttl = tonumber(ARGV[3])
local removed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
local held = redis.call('ZCARD', KEYS[1])
if not mine and held >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
if mine or held > 0 or removed > 0 then
    return 1
end
local seen = redis.call('GET', KEYS[2])
if seen and now - tonumber(seen) < tonumber(ARGV[4]) then
    return 1
end
return 2
"""
)
# KEYS: user's set, user's lastSeen; ARGV: member, lastSeen ttl ms. The index entry stays for the sweep.
_CLUSTER_RELEASE = (
    LUA_NOW
    + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
    return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) > 0 then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], now, 'PX', ARGV[2])
return 1
"""
)
# KEYS: user's set; ARGV: ttl ms, members.
_CLUSTER_REFRESH = (
    LUA_NOW
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return 1
"""
)
# KEYS: an index shard; ARGV: ttl ms, users. Their scores become at least now + ttl.
_CLUSTER_INDEX_RAISE = (
    LUA_NOW
    + """
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], 'GT', now + tonumber(ARGV[1]), ARGV[i])
end
return 1
"""
)
# KEYS: an index shard; ARGV: batch. The members whose score has expired.
CLUSTER_DUE = (
    LUA_NOW + "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))"
)
# KEYS: user's set, user's lastSeen; ARGV: lastSeen ttl ms. Returns {1 if this call removed the user's
# last entries (lastSeen written), latest expiry or -1}: one script at a time per slot, so one sweeper.
_CLUSTER_SWEEP_USER = (
    LUA_NOW
    + """
local removed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #last > 0 then
    return {0, last[2]}
end
if removed > 0 then
    redis.call('SET', KEYS[2], now, 'PX', ARGV[1])
    return {1, -1}
end
return {0, -1}
"""
)
# KEYS: an index shard; ARGV: pairs (member, score or -1). A score is set with GT (never lowered here);
# -1 removes the member only while its score is still expired (a concurrent writer raised it otherwise).
CLUSTER_INDEX_SWEPT = (
    LUA_NOW
    + """
for i = 1, #ARGV, 2 do
    local score = tonumber(ARGV[i + 1])
    if score >= 0 then
        redis.call('ZADD', KEYS[1], 'GT', score, ARGV[i])
    else
        local at = redis.call('ZSCORE', KEYS[1], ARGV[i])
        if at and tonumber(at) <= now then
            redis.call('ZREM', KEYS[1], ARGV[i])
        end
    end
end
return 1
"""
)
# KEYS: user's set; ARGV: grace ms, members. Returns the set's latest expiry or -1.
_CLUSTER_FADE = (
    LUA_NOW
    + """
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #last > 0 then
    return last[2]
end
return -1
"""
)


def by_shard(prefix: str, members: Any) -> dict[str, list[str]]:
    """Members grouped by their index shard."""
    out: dict[str, list[str]] = {}
    for member in members:
        out.setdefault(index_shard(prefix, member), []).append(member)
    return out


class ClusterUserConnections(SharedUserConnections):
    """RedisUserConnections on a Redis Cluster: ``<key_prefix>:{U}`` and ``<key_prefix>-seen:{U}`` share
    user U's slot, so each of U's scripts runs on one node; the index is INDEX_SHARDS keys
    ``<key_prefix>-index:{i}``, written after (or beside) the user's script, and the sweep walks them all:
    due users of every shard, one script per due user, then the shards' scores set or removed."""

    backend_name = "Redis Cluster"

    def __init__(
        self,
        url: str,
        limit: int,
        *,
        ttl: float = 60.0,
        op_timeout: float = 1.0,
        grace: float = 0.0,
        key_prefix: str = "fonana-ws:user-connections",
        pool_size: int = 8,
    ) -> None:
        super().__init__(limit, ttl=ttl, op_timeout=op_timeout, grace=grace)
        self.safe_url = mask_url(url)
        self.key_prefix = key_prefix
        self.index_prefix = f"{key_prefix}-index"
        self._ttl_ms = max(1, int(ttl * 1000))
        self._grace_ms = int(grace * 1000)
        self._seen_ms = int(LAST_SEEN_TTL * 1000)
        self._client = cluster_client(url, op_timeout=op_timeout, pool_size=pool_size)

    async def _prepare(self) -> None:
        await self._client.initialize()

    def _keys(self, user_id: str) -> list[str]:
        return [f"{self.key_prefix}:{{{user_id}}}", f"{self.key_prefix}-seen:{{{user_id}}}"]

    def _raise(self, users: Any) -> list[Call]:
        shards = by_shard(self.index_prefix, users)
        return [(_CLUSTER_INDEX_RAISE, [shard], [self._ttl_ms, *us]) for shard, us in shards.items()]

    async def _acquire(self, user_id: str, member: str) -> int:
        calls: list[Call] = [
            (_CLUSTER_ACQUIRE, self._keys(user_id), [member, self.limit, self._ttl_ms, self._grace_ms]),
            *self._raise([user_id]),
        ]
        return int((await eval_many(self._client, calls))[0])

    async def _release(self, user_id: str, member: str) -> bool:
        calls: list[Call] = [(_CLUSTER_RELEASE, self._keys(user_id), [member, self._seen_ms])]
        return bool((await eval_many(self._client, calls))[0])

    async def _refresh(self, members: list[tuple[str, str]]) -> list[str]:
        by_user: dict[str, list[str]] = {}
        for user, member in members:
            by_user.setdefault(user, []).append(member)
        calls: list[Call] = [
            (_CLUSTER_REFRESH, self._keys(u)[:1], [self._ttl_ms, *held]) for u, held in by_user.items()
        ]
        await eval_many(self._client, calls + self._raise(by_user))
        return await self._sweep()

    async def _sweep(self) -> list[str]:
        shards = [f"{self.index_prefix}:{{{i}}}" for i in range(INDEX_SHARDS)]
        due_lists = await eval_many(self._client, [(CLUSTER_DUE, [s], [SWEEP_BATCH]) for s in shards])
        due = [_str(u) for users in due_lists for u in users][:SWEEP_BATCH]
        if not due:
            return []
        swept = await eval_many(
            self._client, [(_CLUSTER_SWEEP_USER, self._keys(u), [self._seen_ms]) for u in due]
        )
        gone = [u for u, (g, _) in zip(due, swept, strict=True) if int(g)]
        scores = dict(zip(due, (s for _, s in swept), strict=True))
        updates = [
            (CLUSTER_INDEX_SWEPT, [shard], [x for u in us for x in (u, _str(scores[u]))])
            for shard, us in by_shard(self.index_prefix, due).items()
        ]
        await eval_many(self._client, updates)
        return gone

    async def _drop(self, members: list[tuple[str, str]]) -> None:
        pipe = self._client.pipeline()
        for user, member in members:
            pipe.zrem(self._keys(user)[0], member)
        await pipe.execute()

    async def _fade(self, members: list[tuple[str, str]]) -> None:
        by_user: dict[str, list[str]] = {}
        for user, member in members:
            by_user.setdefault(user, []).append(member)
        users = list(by_user)
        calls: list[Call] = [(_CLUSTER_FADE, self._keys(u)[:1], [self._grace_ms, *by_user[u]]) for u in users]
        latest = await eval_many(self._client, calls)
        pipe = self._client.pipeline()
        for user, score in zip(users, latest, strict=True):
            if float(score) >= 0:  # lowered, unlike elsewhere: the sweep looks once the faded entries expire
                pipe.zadd(index_shard(self.index_prefix, user), {user: float(score)})
        if len(pipe):
            await pipe.execute()

    async def _count(self, user_id: str) -> int:
        return int((await eval_many(self._client, [(_LUA_COUNT, self._keys(user_id)[:1], [])]))[0])

    async def _lookup(self, user_ids: list[str]) -> Lookup:
        replies = await eval_many(self._client, [(_LUA_LOOKUP, self._keys(u), []) for u in user_ids])
        now, found = time.time(), {}
        for user, out in zip(user_ids, replies, strict=True):
            now = int(out[0]) / 1000
            seen = out[2] if len(out) > 2 else None  # a Lua false ends the reply
            found[user] = (int(out[1]), int(seen) / 1000 if seen else None)
        return now, found

    async def _close(self) -> None:
        await self._client.aclose()


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_PG_LOCK_SPACE = 0x66777363  # first key of our two-key advisory locks ("fwsc"): apart from other users'
_PG_CREATE = f"""
CREATE SCHEMA IF NOT EXISTS fonana_ws;
CREATE UNLOGGED TABLE IF NOT EXISTS fonana_ws.user_connections (
    user_id text NOT NULL,
    member text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, member)
);
-- UNLOGGED too: after a crash a user's lastSeen is null until their next disconnect, which §7.3 allows.
CREATE UNLOGGED TABLE IF NOT EXISTS fonana_ws.user_last_seen (
    user_id text PRIMARY KEY,
    last_seen timestamptz NOT NULL
);
-- 0: over the limit; 1: recorded; 2: recorded, and the user came online (none live, none just expired,
-- not within p_grace of the last close).
CREATE OR REPLACE FUNCTION fonana_ws.user_status_acquire(
    p_user text, p_member text, p_limit integer, p_ttl double precision, p_grace double precision
) RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    held integer;
    removed integer;
    mine boolean;
    seen timestamptz;
BEGIN
    -- One user's acquires, releases and sweeps take turns; a VOLATILE function's next statement sees
    -- what they committed.
    PERFORM pg_advisory_xact_lock({_PG_LOCK_SPACE}, hashtext(p_user));
    DELETE FROM fonana_ws.user_connections WHERE user_id = p_user AND expires_at <= now();
    GET DIAGNOSTICS removed = ROW_COUNT;
    SELECT count(*) FILTER (WHERE member <> p_member), coalesce(bool_or(member = p_member), false)
        INTO held, mine FROM fonana_ws.user_connections WHERE user_id = p_user;
    IF NOT mine AND held >= p_limit THEN
        RETURN 0;
    END IF;
    INSERT INTO fonana_ws.user_connections (user_id, member, expires_at)
        VALUES (p_user, p_member, now() + make_interval(secs => p_ttl))
        ON CONFLICT (user_id, member) DO UPDATE SET expires_at = EXCLUDED.expires_at;
    IF mine OR held > 0 OR removed > 0 THEN
        RETURN 1;
    END IF;
    SELECT last_seen INTO seen FROM fonana_ws.user_last_seen WHERE user_id = p_user;
    IF seen IS NOT NULL AND now() - seen < make_interval(secs => p_grace) THEN
        RETURN 1;
    END IF;
    RETURN 2;
END
$$;
-- True when p_member was the user's last live row (lastSeen written).
CREATE OR REPLACE FUNCTION fonana_ws.user_status_release(p_user text, p_member text)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({_PG_LOCK_SPACE}, hashtext(p_user));
    DELETE FROM fonana_ws.user_connections WHERE user_id = p_user AND member = p_member;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM fonana_ws.user_connections WHERE user_id = p_user AND expires_at <= now();
    IF EXISTS (SELECT 1 FROM fonana_ws.user_connections WHERE user_id = p_user) THEN
        RETURN false;
    END IF;
    INSERT INTO fonana_ws.user_last_seen (user_id, last_seen) VALUES (p_user, now())
        ON CONFLICT (user_id) DO UPDATE SET last_seen = EXCLUDED.last_seen;
    RETURN true;
END
$$;
-- The users whose last rows (of dead processes) this call deleted: under each user's lock, so a user is
-- returned to one sweeping process only. Users in id order, so that two sweeps never deadlock.
CREATE OR REPLACE FUNCTION fonana_ws.user_status_sweep(p_batch integer)
RETURNS SETOF text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    u text;
    removed integer;
BEGIN
    FOR u IN SELECT DISTINCT user_id FROM fonana_ws.user_connections WHERE expires_at <= now()
             ORDER BY user_id LIMIT p_batch LOOP
        PERFORM pg_advisory_xact_lock({_PG_LOCK_SPACE}, hashtext(u));
        DELETE FROM fonana_ws.user_connections WHERE user_id = u AND expires_at <= now();
        GET DIAGNOSTICS removed = ROW_COUNT;
        IF removed > 0 AND NOT EXISTS (SELECT 1 FROM fonana_ws.user_connections WHERE user_id = u) THEN
            INSERT INTO fonana_ws.user_last_seen (user_id, last_seen) VALUES (u, now())
                ON CONFLICT (user_id) DO UPDATE SET last_seen = EXCLUDED.last_seen;
            RETURN NEXT u;
        END IF;
    END LOOP;
END
$$;
"""
# Made last, so its presence means all is there.
_PG_EXISTS = "SELECT to_regprocedure('fonana_ws.user_status_sweep(integer)')"
_PG_REFRESH = """
INSERT INTO fonana_ws.user_connections (user_id, member, expires_at)
SELECT u, m, now() + make_interval(secs => $3) FROM unnest($1::text[], $2::text[]) AS x(u, m)
ON CONFLICT (user_id, member) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""
_PG_SWEEP = "SELECT fonana_ws.user_status_sweep($1)"
_PG_DROP = """
DELETE FROM fonana_ws.user_connections
WHERE (user_id, member) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
_PG_FADE = """
UPDATE fonana_ws.user_connections SET expires_at = now() + make_interval(secs => $3)
WHERE (user_id, member) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
_PG_LOOKUP = """
SELECT extract(epoch FROM now())::float8, u,
    (SELECT count(*) FROM fonana_ws.user_connections c WHERE c.user_id = u AND c.expires_at > now()),
    (SELECT extract(epoch FROM s.last_seen)::float8 FROM fonana_ws.user_last_seen s WHERE s.user_id = u)
FROM unnest($1::text[]) AS x(u)
"""


async def keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query (UNLISTEN, RESET ALL...) on every return to the pool.

    It is a second round trip per operation, and our statements leave no session state behind: the
    advisory locks are transaction-scoped, and asyncpg still rolls back an unfinished transaction.
    """


class PostgresUserConnections(SharedUserConnections):
    """Rows ``(user_id, member, expires_at)`` in ``fonana_ws.user_connections``, made on first use.

    ``acquire`` and ``release`` are one call each of ``fonana_ws.user_status_acquire`` / ``_release``,
    which serialize one user's changes with an advisory lock: atomic, one round trip. lastSeen is in
    ``fonana_ws.user_last_seen``. The table is UNLOGGED: its rows are
    rewritten every TTL/3 anyway, so they need no WAL, and after a crash or a failover (which empty
    it) the live processes write their rows back within TTL/3.
    """

    backend_name = "PostgreSQL"

    def __init__(
        self,
        url: str,
        limit: int,
        *,
        ttl: float = 60.0,
        op_timeout: float = 1.0,
        grace: float = 0.0,
        pool_size: int = 4,
    ) -> None:
        super().__init__(limit, ttl=ttl, op_timeout=op_timeout, grace=grace)
        self.safe_url = mask_url(url)
        self._dsn = plain_dsn(url)
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def _prepare(self) -> None:
        if self._pool is None:
            # min_size=0: creating the pool connects nowhere, so it cannot fail while PostgreSQL is down.
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=self._pool_size,
                timeout=self.op_timeout,
                reset=keep_session,
            )
        async with self._pool.acquire() as conn:
            if await conn.fetchval(_PG_EXISTS) is not None:
                return
            for attempt in range(2):
                try:
                    async with conn.transaction():
                        await conn.execute(
                            "SELECT pg_advisory_xact_lock(hashtext('fonana_ws.user_connections'))"
                        )
                        await conn.execute(_PG_CREATE)
                    return
                except asyncpg.exceptions.UniqueViolationError:
                    # CREATE SCHEMA IF NOT EXISTS racing the broker's own (it takes another lock).
                    if attempt:
                        raise

    def _pool_now(self) -> asyncpg.Pool:
        assert self._pool is not None, "prepared first"
        return self._pool

    async def _acquire(self, user_id: str, member: str) -> int:
        return int(
            await self._pool_now().fetchval(
                "SELECT fonana_ws.user_status_acquire($1, $2, $3, $4, $5)",
                user_id,
                member,
                self.limit,
                self.ttl,
                self.grace,
            )
        )

    async def _release(self, user_id: str, member: str) -> bool:
        return bool(
            await self._pool_now().fetchval("SELECT fonana_ws.user_status_release($1, $2)", user_id, member)
        )

    async def _refresh(self, members: list[tuple[str, str]]) -> list[str]:
        pool = self._pool_now()
        if members:
            members.sort()  # rows in key order: concurrent writers lock them in the same order
            users, held = [u for u, _ in members], [m for _, m in members]
            await pool.execute(_PG_REFRESH, users, held, self.ttl)
        return [r[0] for r in await pool.fetch(_PG_SWEEP, SWEEP_BATCH)]

    async def _lookup(self, user_ids: list[str]) -> Lookup:
        rows = await self._pool_now().fetch(_PG_LOOKUP, user_ids)
        if not rows:
            return time.time(), {}
        return float(rows[0][0]), {r[1]: (int(r[2]), r[3]) for r in rows}

    async def _drop(self, members: list[tuple[str, str]]) -> None:
        await self._pool_now().execute(_PG_DROP, [u for u, _ in members], [m for _, m in members])

    async def _fade(self, members: list[tuple[str, str]]) -> None:
        members.sort()
        users, held = [u for u, _ in members], [m for _, m in members]
        await self._pool_now().execute(_PG_FADE, users, held, self.grace)

    async def _count(self, user_id: str) -> int:
        return int(
            await self._pool_now().fetchval(
                "SELECT count(*) FROM fonana_ws.user_connections WHERE user_id = $1 AND expires_at > now()",
                user_id,
            )
        )

    async def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await pool.close()
            except BaseException:
                pool.terminate()
                raise


def for_settings(settings: Settings, **options: Any) -> UserConnections:
    """The count on the broker ``settings.broadcast_url`` selects; ``options`` go to its constructor."""
    limit = settings.max_connections_per_user
    kind = settings.broker_kind
    grace = settings.offline_grace
    if kind == "redis":
        options.setdefault("ttl", settings.presence_ttl)
        return RedisUserConnections(settings.broadcast_url, limit, grace=grace, **options)
    if kind == "postgresql":
        options.setdefault("ttl", settings.presence_ttl)
        return PostgresUserConnections(settings.broadcast_url, limit, grace=grace, **options)
    if kind == "redis+cluster":
        options.setdefault("ttl", settings.presence_ttl)
        return ClusterUserConnections(settings.broadcast_url, limit, grace=grace, **options)
    if kind == "memory":
        return MemoryUserConnections(limit, grace=grace)
    raise ValueError(f"BROADCAST_URL: unsupported broker scheme {kind!r}")
