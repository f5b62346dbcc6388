"""Each user's authenticated connections, counted across every process (``WS_MAX_CONNECTIONS_PER_USER``).

The count lives where the broker lives, so that all processes of one deployment see the same number:
in memory (one process), in Redis (one sorted set per user) or in PostgreSQL (one row per connection).
Every entry carries an expiry that its process pushes forward every TTL/3, so the entries of a process
that died without a word (SIGKILL, OOM, a lost host) stop counting after TTL and heal by themselves.

When Redis or PostgreSQL cannot be reached, ``acquire`` admits the connection (fail-open) within
``op_timeout`` and one warning is logged per outage: a broker outage must not lock every user out, and
the limit is a guard against runaway clients, not a security boundary. After a failure the backend is
not asked again for RETRY_INTERVAL, so a hung backend delays at most one connect per interval.
Connections admitted during an outage are still recorded here and written to the backend by the first
refresh once it is back, so the count is right again within about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import asyncpg
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from fonana_ws.broker.base import describe, mask_url, within
from fonana_ws.broker.postgres_backend import plain_dsn
from fonana_ws.config import Settings

log = logging.getLogger("fonana_ws.limits")

#: Seconds between attempts while the backend is down: acquires in between admit without asking.
RETRY_INTERVAL = 1.0


class UserConnections:
    """The per-user connection count shared by all processes; ``for_settings`` picks the backend.

    ``conn_id`` needs to be unique within this process only: the shared backends prefix it with a
    per-process id. ``acquire`` on a ``conn_id`` already held returns True without counting it twice.
    """

    limit: int

    async def start(self) -> None:
        """Connect and start refreshing; does not fail when the backend is down (see the module doc)."""

    async def stop(self) -> None:
        """Stop refreshing and release every connection this process holds."""

    async def acquire(self, user_id: str, conn_id: str) -> bool:
        """Record the connection and return True if the user's count stays within the limit, else False."""
        raise NotImplementedError

    async def release(self, user_id: str, conn_id: str) -> None:
        """Forget the connection; never raises (on failure its entry expires after TTL)."""
        raise NotImplementedError

    async def count(self, user_id: str) -> int:
        """The user's live connections across all processes; raises when the backend is unreachable."""
        raise NotImplementedError


class MemoryUserConnections(UserConnections):
    """One process: the count is a set of connection ids per user."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._users: dict[str, set[str]] = {}

    async def stop(self) -> None:
        self._users.clear()

    async def acquire(self, user_id: str, conn_id: str) -> bool:
        held = self._users.get(user_id, set())
        if conn_id not in held and len(held) >= self.limit:
            return False
        self._users.setdefault(user_id, held).add(conn_id)
        return True

    async def release(self, user_id: str, conn_id: str) -> None:
        held = self._users.get(user_id)
        if held is not None:
            held.discard(conn_id)
            if not held:
                del self._users[user_id]

    async def count(self, user_id: str) -> int:
        return len(self._users.get(user_id, ()))


class SharedUserConnections(UserConnections):
    """What the Redis and PostgreSQL backends share: the local record, the refresh loop, fail-open.

    A subclass implements ``_prepare`` (before first use and after each outage), ``_acquire``,
    ``_release``, ``_refresh`` (push the expiry of the given members forward, writing back any that are
    missing; also the health probe), ``_drop`` (release many), ``_count`` and ``_close``. Each is bounded
    by ``op_timeout``, except ``_refresh`` (``max(op_timeout, ttl / 3)``: it is on no connect's path).
    """

    backend_name = ""

    def __init__(self, limit: int, *, ttl: float, op_timeout: float) -> None:
        if ttl <= 0 or op_timeout <= 0:
            raise ValueError("ttl and op_timeout must be positive")
        self.limit = limit
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
        mine += late or []
        self._mine.clear()
        if mine and self._reachable():
            await self._call(self._drop, mine)
        self._prepared = False
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.op_timeout):
                await self._close()

    async def acquire(self, user_id: str, conn_id: str) -> bool:
        admitted = True  # fail-open: see the module doc
        # Cancelled while asking (shutdown), the entry may be written and not ours to refresh: it
        # expires after TTL.
        if self._reachable():
            result = await self._call(self._acquire, user_id, self._member(conn_id))
            admitted = result is not False
        if admitted:
            self._mine.setdefault(user_id, set()).add(conn_id)
        return admitted

    async def release(self, user_id: str, conn_id: str) -> None:
        conns = self._mine.get(user_id)
        if conns is None or conn_id not in conns:
            return
        conns.discard(conn_id)
        if not conns:
            del self._mine[user_id]
        member = self._member(conn_id)
        if self._late is not None:
            self._late.append((user_id, member))
        if self._reachable():
            await self._call(self._release, user_id, member)

    async def count(self, user_id: str) -> int:
        async with within(self.op_timeout, f"{self.backend_name} count"):
            await self._ensure_prepared()
            return await self._count(user_id)

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
                await self._call(self._refresh, members, seconds=max(self.op_timeout, self.ttl / 3))
            finally:
                late, self._late = self._late, None
            if late and self._reachable():
                await self._call(self._drop, late)

    async def _prepare(self) -> None:
        """Make the backend ready (tables, scripts); called again after every outage."""

    async def _acquire(self, user_id: str, member: str) -> bool:
        raise NotImplementedError

    async def _release(self, user_id: str, member: str) -> None:
        raise NotImplementedError

    async def _refresh(self, members: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    async def _drop(self, members: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    async def _count(self, user_id: str) -> int:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


# Scores are expiry times in milliseconds of Redis's own clock (TIME), so that processes whose clocks
# disagree still agree on what has expired. A member is live while its score is above now.
_LUA_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS[1] user's key; ARGV: member, limit, ttl in ms. Returns 1 when recorded, 0 when over the limit.
_LUA_ACQUIRE = (
    _LUA_NOW
    + """
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""
)
# KEYS[1] user's key; ARGV: ttl in ms, then the members to keep alive (added back if missing).
_LUA_REFRESH = (
    _LUA_NOW
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""
)
_LUA_COUNT = _LUA_NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')"


class RedisUserConnections(SharedUserConnections):
    """One sorted set per user, ``<key_prefix>:<user>``, of ``<process>:<conn>`` scored by expiry time.

    ``acquire`` is one Lua script (drop expired, count, add if under the limit): atomic, one round trip.
    The refresh is one pipeline of one script per user. Each key also expires after TTL, so the sets of
    users nobody holds any more vanish.
    """

    backend_name = "Redis"

    def __init__(
        self,
        url: str,
        limit: int,
        *,
        ttl: float = 60.0,
        op_timeout: float = 1.0,
        key_prefix: str = "fonana-ws:conns",
        pool_size: int = 16,
    ) -> None:
        super().__init__(limit, ttl=ttl, op_timeout=op_timeout)
        self.safe_url = mask_url(url)
        self.key_prefix = key_prefix
        self._ttl_ms = max(1, int(ttl * 1000))
        # A blocking pool caps the connections a connect storm opens; a wait counts against op_timeout.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=op_timeout,
            socket_connect_timeout=op_timeout,
            socket_timeout=op_timeout,
            # One retry lets a command survive a pooled connection that died with a restarted server.
            retry=Retry(NoBackoff(), 1),
            protocol=2,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._acquire_script = self._client.register_script(_LUA_ACQUIRE)
        self._refresh_script = self._client.register_script(_LUA_REFRESH)
        self._count_script = self._client.register_script(_LUA_COUNT)

    def key(self, user_id: str) -> str:
        return f"{self.key_prefix}:{user_id}"

    async def _acquire(self, user_id: str, member: str) -> bool:
        keys = [self.key(user_id)]
        return bool(await self._acquire_script(keys=keys, args=[member, self.limit, self._ttl_ms]))

    async def _release(self, user_id: str, member: str) -> None:
        await self._client.zrem(self.key(user_id), member)

    async def _refresh(self, members: list[tuple[str, str]]) -> None:
        if not members:
            await self._client.ping()
            return
        by_user: dict[str, list[str]] = {}
        for user, member in members:
            by_user.setdefault(user, []).append(member)
        async with self._client.pipeline(transaction=False) as pipe:
            for user, held in by_user.items():
                await self._refresh_script(keys=[self.key(user)], args=[self._ttl_ms, *held], client=pipe)
            await pipe.execute()

    async def _drop(self, members: list[tuple[str, str]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for user, member in members:
                pipe.zrem(self.key(user), member)
            await pipe.execute()

    async def _count(self, user_id: str) -> int:
        return int(await self._count_script(keys=[self.key(user_id)]))

    async def _close(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()


_PG_LOCK_SPACE = 0x66777363  # first key of our two-key advisory locks ("fwsc"): apart from other users'
_PG_CREATE = f"""
CREATE SCHEMA IF NOT EXISTS fonana_ws;
CREATE UNLOGGED TABLE IF NOT EXISTS fonana_ws.user_connections (
    user_id text NOT NULL,
    member text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, member)
);
CREATE OR REPLACE FUNCTION fonana_ws.user_connections_acquire(
    p_user text, p_member text, p_limit integer, p_ttl double precision
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    held integer;
BEGIN
    -- One user's acquires take turns; a VOLATILE function's next statement sees what they committed.
    PERFORM pg_advisory_xact_lock({_PG_LOCK_SPACE}, hashtext(p_user));
    SELECT count(*) INTO held FROM fonana_ws.user_connections
        WHERE user_id = p_user AND member <> p_member AND expires_at > now();
    IF held >= p_limit THEN
        RETURN false;
    END IF;
    INSERT INTO fonana_ws.user_connections (user_id, member, expires_at)
        VALUES (p_user, p_member, now() + make_interval(secs => p_ttl))
        ON CONFLICT (user_id, member) DO UPDATE SET expires_at = EXCLUDED.expires_at;
    RETURN true;
END
$$;
"""
# Made last, so its presence means all is there.
_PG_EXISTS = (
    "SELECT to_regprocedure('fonana_ws.user_connections_acquire(text, text, integer, double precision)')"
)
_PG_REFRESH = """
INSERT INTO fonana_ws.user_connections (user_id, member, expires_at)
SELECT u, m, now() + make_interval(secs => $3) FROM unnest($1::text[], $2::text[]) AS x(u, m)
ON CONFLICT (user_id, member) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""
# Rows of dead processes, whoever finds them; SKIP LOCKED so that sweeps never wait on each other.
_PG_SWEEP = """
DELETE FROM fonana_ws.user_connections WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM fonana_ws.user_connections WHERE expires_at < now() LIMIT 10000 FOR UPDATE SKIP LOCKED
))
"""
_PG_DROP = """
DELETE FROM fonana_ws.user_connections
WHERE (user_id, member) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query (UNLISTEN, RESET ALL...) on every return to the pool.

    It is a second round trip per operation, and our statements leave no session state behind: the
    advisory locks are transaction-scoped, and asyncpg still rolls back an unfinished transaction.
    """


class PostgresUserConnections(SharedUserConnections):
    """Rows ``(user_id, member, expires_at)`` in ``fonana_ws.user_connections``, made on first use.

    ``acquire`` is one call of ``fonana_ws.user_connections_acquire``, which serializes one user's
    acquires with an advisory lock: atomic, one round trip. The table is UNLOGGED: its rows are
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
        pool_size: int = 4,
    ) -> None:
        super().__init__(limit, ttl=ttl, op_timeout=op_timeout)
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
                reset=_keep_session,
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

    async def _acquire(self, user_id: str, member: str) -> bool:
        return bool(
            await self._pool_now().fetchval(
                "SELECT fonana_ws.user_connections_acquire($1, $2, $3, $4)",
                user_id,
                member,
                self.limit,
                self.ttl,
            )
        )

    async def _release(self, user_id: str, member: str) -> None:
        await self._pool_now().execute(
            "DELETE FROM fonana_ws.user_connections WHERE user_id = $1 AND member = $2",
            user_id,
            member,
        )

    async def _refresh(self, members: list[tuple[str, str]]) -> None:
        pool = self._pool_now()
        if members:
            members.sort()  # rows in key order: concurrent writers lock them in the same order
            users, held = [u for u, _ in members], [m for _, m in members]
            await pool.execute(_PG_REFRESH, users, held, self.ttl)
        await pool.execute(_PG_SWEEP)

    async def _drop(self, members: list[tuple[str, str]]) -> None:
        await self._pool_now().execute(_PG_DROP, [u for u, _ in members], [m for _, m in members])

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
    if kind == "redis":
        return RedisUserConnections(settings.broadcast_url, limit, **options)
    if kind == "postgresql":
        return PostgresUserConnections(settings.broadcast_url, limit, **options)
    if kind == "memory":
        return MemoryUserConnections(limit)
    raise ValueError(f"BROADCAST_URL: unsupported broker scheme {kind!r}")
