"""Who is present in each channel (protocol §7.4), shared by every process of a deployment.

A user is present in a channel key while some process holds a connection of theirs joined to it. Each
process writes one entry per (key, user) it holds, not per connection: its own refcount
(``fonana.presence``) turns a user's tabs into one entry, and their first tab in and last tab out into
the only writes. Entries carry an expiry that the process pushes forward every TTL/3, as
``user_connections`` does for connections, so a dead process's entries stop counting after TTL and a sweep
on a survivor removes them and reports those of its users who thereby left, once (one script or function
runs at a time per key, so exactly one sweeping process sees each).

The backend also keeps, per key, when each user last left, for the grace (``WS_OFFLINE_GRACE``): a user
back within it is no join (a reload), and a leave is announced only if they are still gone after it.

Four implementations with one interface, picked by the broker URL: memory (one process), Redis (a
sorted set of entries, a hash of users with their entry counts and a sorted set of leave times per key;
every change of one key is one Lua script), Redis Cluster (the same keys hash-tagged by the key, the
sweep's index split into shards), PostgreSQL (two UNLOGGED tables in the server's own schema,
made on first use; every change of one key is one function call under the key's advisory lock).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any, NamedTuple

import asyncpg

from fonana_ws.broker.base import mask_url
from fonana_ws.broker.postgres_backend import plain_dsn
from fonana_ws.config import Settings
from fonana_ws.fonana.user_connections import (
    CLUSTER_DUE,
    INDEX_SHARDS,
    LUA_NOW,
    SWEEP_BATCH,
    Call,
    by_shard,
    cluster_client,
    eval_many,
    index_shard,
    keep_session,
    redis_client,
)

log = logging.getLogger("fonana_ws.presence")


class Change(NamedTuple):
    """What writing one key's entries did: present users after it, who came in, who went."""

    count: int
    #: Users present now who were not, and did not leave within the grace (a reload is no join).
    joined: list[str]
    #: Users whose last entry anywhere this change removed.
    left: list[str]


#: (backend clock in epoch seconds, present users of the key, user -> (present, last left or None)).
Lookup = tuple[float, int, dict[str, tuple[bool, float | None]]]


class PresenceStore:
    """The interface; each method is one round trip and raises when the backend cannot answer."""

    backend_name = "memory"
    #: Told apart from other processes' entries; shared backends prefix entries with it.
    process_id: str

    async def change(self, batch: list[tuple[str, list[str], list[str]]]) -> list[Change]:
        """For each (key, users who entered, users who left) write this process's entries."""
        raise NotImplementedError

    async def refresh(self, held: dict[str, list[str]]) -> list[tuple[str, str]]:
        """Keep this process's entries alive (writing back any that are missing) and sweep the expired
        entries of dead processes: returns the (key, user) pairs that thereby left."""
        raise NotImplementedError

    async def members(self, key: str, limit: int) -> tuple[int, list[str]]:
        """Present users of ``key`` and up to ``limit`` of their ids."""
        raise NotImplementedError

    async def lookup(self, key: str, user_ids: list[str]) -> Lookup:
        raise NotImplementedError

    async def claim(self, key: str, seconds: float) -> bool:
        """True for one caller across all processes per ``seconds`` per key (the count throttle)."""
        raise NotImplementedError

    async def fade(self, held: dict[str, list[str]]) -> None:
        """At shutdown: make this process's entries expire after the grace, for a survivor's sweep."""

    async def close(self) -> None:
        """Release the backend's connections."""

    def lost(self) -> None:
        """An operation failed: the backend may come back empty (check its tables before the next use)."""


class MemoryPresenceStore(PresenceStore):
    """One process: its refcount is the whole truth; this keeps the present sets and leave times."""

    def __init__(self, *, grace: float = 0.0) -> None:
        self.process_id = "memory"
        self.grace = grace
        self._present: dict[str, set[str]] = {}
        #: key -> user -> when they left, pruned past the grace at each change of the key; and every
        #: (key, user) in leave order, so that the leaves of keys nobody touches again go too.
        self._left: dict[str, dict[str, float]] = {}
        self._leaves: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._claims: dict[str, float] = {}

    async def change(self, batch: list[tuple[str, list[str], list[str]]]) -> list[Change]:
        now = time.time()
        self._forget_old_leaves(now)
        out = []
        for key, enter, leave in batch:
            present = self._present.setdefault(key, set())
            left = self._left.get(key)
            if left:
                for user in [u for u, at in left.items() if now - at >= self.grace]:
                    del left[user]
            joined, gone = [], []
            for user in enter:
                if user not in present:
                    present.add(user)
                    if not left or user not in left:
                        joined.append(user)
            for user in leave:
                if user in present:
                    present.discard(user)
                    self._left.setdefault(key, {})[user] = now
                    self._leaves.pop((key, user), None)
                    self._leaves[(key, user)] = now
                    gone.append(user)
            out.append(Change(len(present), joined, gone))
            if not present:
                del self._present[key]
            if not self._left.get(key, True):
                del self._left[key]
        return out

    async def refresh(self, held: dict[str, list[str]]) -> list[tuple[str, str]]:
        return []

    def _forget_old_leaves(self, now: float) -> None:
        leaves = self._leaves
        while leaves:
            (key, user), at = next(iter(leaves.items()))
            if now - at < self.grace:
                break
            del leaves[(key, user)]
            left = self._left.get(key)
            if left is not None and left.get(user) == at:
                del left[user]
                if not left:
                    del self._left[key]

    async def members(self, key: str, limit: int) -> tuple[int, list[str]]:
        present = self._present.get(key, set())
        return len(present), sorted(present)[:limit]

    async def lookup(self, key: str, user_ids: list[str]) -> Lookup:
        present = self._present.get(key, set())
        left = self._left.get(key, {})
        return time.time(), len(present), {u: (u in present, left.get(u)) for u in user_ids}

    async def claim(self, key: str, seconds: float) -> bool:
        now = time.monotonic()
        if self._claims.get(key, 0.0) > now:
            return False
        if len(self._claims) > 10_000:
            self._claims = {k: t for k, t in self._claims.items() if t > now}
        self._claims[key] = now + seconds
        return True


# The index scores each key by its earliest entry's expiry, so the keys holding an expired entry (of a
# dead process, or one whose removal failed) are its lowest, whoever else holds the key.
_LUA_INDEX = """
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then
    redis.call('ZREM', KEYS[4], channel)
else
    redis.call('ZADD', KEYS[4], first[2], channel)
end
"""
# KEYS: entries, users, left, index; ARGV: process, ttl ms, grace ms, key, n entered, users entered then
# users left. Returns {present users, {joined...}, {left...}}.
_LUA_CHANGE = (
    LUA_NOW
    + """
local ttl, grace, n, channel = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - grace)
local joined, gone = {}, {}
for i = 6, #ARGV do
    local user = ARGV[i]
    local member = ARGV[1] .. '|' .. user
    if i < 6 + n then
        if redis.call('ZADD', KEYS[1], now + ttl, member) == 1
            and redis.call('HINCRBY', KEYS[2], user, 1) == 1
            and not redis.call('ZSCORE', KEYS[3], user) then
            joined[#joined + 1] = user
        end
    elseif redis.call('ZREM', KEYS[1], member) == 1 and redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
        redis.call('HDEL', KEYS[2], user)
        redis.call('ZADD', KEYS[3], now, user)
        gone[#gone + 1] = user
    end
end
local keep = math.max(2 * ttl, grace + 1000)
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], keep) end
"""
    + _LUA_INDEX
    + """
return {redis.call('HLEN', KEYS[2]), joined, gone}
"""
)
# KEYS: entries, users, left, index; ARGV: process, ttl ms, key, users held. A missing entry (removed
# while the backend was away) is written back and counted again, without a join.
_LUA_REFRESH = (
    LUA_NOW
    + """
local ttl, channel = tonumber(ARGV[2]), ARGV[3]
for i = 4, #ARGV do
    if redis.call('ZADD', KEYS[1], now + ttl, ARGV[1] .. '|' .. ARGV[i]) == 1 then
        redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
    end
end
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], 2 * ttl) end
"""
    + _LUA_INDEX
    + """
return 1
"""
)
# KEYS: entries, users, left, index; ARGV: process, grace ms, key, users held (at shutdown).
_LUA_FADE = (
    LUA_NOW
    + """
local channel = ARGV[3]
for i = 4, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1] .. '|' .. ARGV[i])
end
"""
    + _LUA_INDEX
    + """
return 1
"""
)
# KEYS: the index; ARGV: entries prefix, users prefix, left prefix, batch, process id length.
# Returns {key, user, key, user, ...}: the users whose last entry in key this call removed.
_LUA_SWEEP = (
    LUA_NOW
    + """
local out = {}
local skip = tonumber(ARGV[5]) + 2
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))) do
    local entries, users, left = ARGV[1] .. key, ARGV[2] .. key, ARGV[3] .. key
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', entries, '-inf', now)) do
        redis.call('ZREM', entries, member)
        local user = string.sub(member, skip)
        if redis.call('HINCRBY', users, user, -1) <= 0 then
            redis.call('HDEL', users, user)
            redis.call('ZADD', left, now, user)
            out[#out + 1] = key
            out[#out + 1] = user
        end
    end
    local first = redis.call('ZRANGE', entries, 0, 0, 'WITHSCORES')
    if #first == 0 then
        redis.call('ZREM', KEYS[1], key)
    else
        redis.call('ZADD', KEYS[1], first[2], key)
    end
end
return out
"""
)
# KEYS: users, left; ARGV: users asked. Returns {now, present users, present1, left1 or false, ...}.
_LUA_LOOKUP = (
    LUA_NOW
    + """
local out = {now, redis.call('HLEN', KEYS[1])}
for i = 1, #ARGV do
    out[#out + 1] = redis.call('HEXISTS', KEYS[1], ARGV[i])
    out[#out + 1] = redis.call('ZSCORE', KEYS[2], ARGV[i])
end
return out
"""
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisPresenceStore(PresenceStore):
    """Per key K: ``<p>:K`` entries ``<process>|<user>`` scored by expiry, ``<p>-users:K`` user -> entry
    count (its length is the present count), ``<p>-left:K`` users scored by when they left (pruned past
    the grace), and one ``<p>-index`` of keys scored by their earliest expiry, for the sweep. Every key of
    K expires 2 TTL after its last write, so an abandoned channel leaves nothing behind."""

    backend_name = "Redis"

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 60.0,
        grace: float = 0.0,
        op_timeout: float = 1.0,
        key_prefix: str = "fonana-ws:presence",
        pool_size: int = 8,
    ) -> None:
        self.process_id = uuid.uuid4().hex
        self.safe_url = mask_url(url)
        self.prefix = key_prefix
        self._ttl_ms = max(1, int(ttl * 1000))
        self._grace_ms = int(grace * 1000)
        self._client = redis_client(url, op_timeout=op_timeout, pool_size=pool_size)
        self._change = self._client.register_script(_LUA_CHANGE)
        self._refresh = self._client.register_script(_LUA_REFRESH)
        self._sweep = self._client.register_script(_LUA_SWEEP)
        self._lookup = self._client.register_script(_LUA_LOOKUP)
        self._fade = self._client.register_script(_LUA_FADE)

    def _keys(self, key: str) -> list[str]:
        p = self.prefix
        return [f"{p}:{key}", f"{p}-users:{key}", f"{p}-left:{key}", f"{p}-index"]

    async def change(self, batch: list[tuple[str, list[str], list[str]]]) -> list[Change]:
        async with self._client.pipeline(transaction=False) as pipe:
            for key, enter, leave in batch:
                args = [self.process_id, self._ttl_ms, self._grace_ms, key, len(enter), *enter, *leave]
                await self._change(keys=self._keys(key), args=args, client=pipe)
            results = await pipe.execute()
        return [Change(int(c), [_text(u) for u in j], [_text(u) for u in g]) for c, j, g in results]

    async def refresh(self, held: dict[str, list[str]]) -> list[tuple[str, str]]:
        p = self.prefix
        async with self._client.pipeline(transaction=False) as pipe:
            for key, users in held.items():
                args = [self.process_id, self._ttl_ms, key, *users]
                await self._refresh(keys=self._keys(key), args=args, client=pipe)
            sweep = [f"{p}:", f"{p}-users:", f"{p}-left:", SWEEP_BATCH, len(self.process_id)]
            await self._sweep(keys=[f"{p}-index"], args=sweep, client=pipe)
            results = await pipe.execute()
        flat = [_text(v) for v in results[-1]]
        return list(zip(flat[::2], flat[1::2], strict=True))

    async def members(self, key: str, limit: int) -> tuple[int, list[str]]:
        users_key = self._keys(key)[1]
        count = int(await self._client.hlen(users_key))
        if count <= 4 * limit:
            return count, sorted(_text(u) for u in await self._client.hkeys(users_key))[:limit]
        found: list[str] = []
        cursor = 0
        while len(found) < limit:  # a large channel: a slice of it, in the hash's own order
            cursor, page = await self._client.hscan(users_key, cursor, count=2 * limit)
            found.extend(_text(u) for u in page)
            if cursor == 0:
                break
        return count, found[:limit]

    async def lookup(self, key: str, user_ids: list[str]) -> Lookup:
        keys = self._keys(key)
        out = await self._lookup(keys=keys[1:3], args=user_ids)
        found = {}
        for i, user in enumerate(user_ids):
            left = out[3 + 2 * i]
            found[user] = (bool(out[2 + 2 * i]), float(left) / 1000 if left else None)
        return int(out[0]) / 1000, int(out[1]), found

    async def claim(self, key: str, seconds: float) -> bool:
        claimed = await self._client.set(
            f"{self.prefix}-count:{key}", self.process_id, nx=True, px=max(1, int(seconds * 1000))
        )
        return bool(claimed)

    async def fade(self, held: dict[str, list[str]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for key, users in held.items():
                await self._fade(
                    keys=self._keys(key), args=[self.process_id, self._grace_ms, key, *users], client=pipe
                )
            await pipe.execute()

    async def close(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()


# The cluster's scripts: each touches one key's entries, users and leave times ({K} hash tag) and
# returns the key's earliest expiry (-1: no entries); the index shards are written after it. A writer
# only lowers a key's index score (ZADD LT), and the sweep removes a key only while its score is still
# expired and then looks at the key again, so a change racing a sweep keeps the key in the index.
_FIRST = """
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local earliest = -1
if #first > 0 then earliest = first[2] end
"""
# KEYS: entries, users, left; ARGV: process, ttl ms, grace ms, (unused), n entered, users entered then
# users left. Returns {present users, {joined...}, {left...}, earliest}.
_CLUSTER_CHANGE = _LUA_CHANGE.replace(_LUA_INDEX, _FIRST).replace(
    "return {redis.call('HLEN', KEYS[2]), joined, gone}",
    "return {redis.call('HLEN', KEYS[2]), joined, gone, earliest}",
)
# KEYS: entries, users, left; ARGV: process, ttl ms, (unused), users held. Returns earliest.
_CLUSTER_REFRESH = _LUA_REFRESH.replace(_LUA_INDEX, _FIRST).replace("return 1", "return earliest")
# KEYS: entries; ARGV: process, grace ms, (unused), users held. Returns earliest.
_CLUSTER_FADE = _LUA_FADE.replace(_LUA_INDEX, _FIRST).replace("return 1", "return earliest")
# KEYS: entries, users, left; ARGV: process id length. Returns {earliest, users whose last entry went}.
_CLUSTER_SWEEP_KEY = (
    LUA_NOW
    + """
local out = {}
local skip = tonumber(ARGV[1]) + 2
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
    redis.call('ZREM', KEYS[1], member)
    local user = string.sub(member, skip)
    if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
        redis.call('HDEL', KEYS[2], user)
        redis.call('ZADD', KEYS[3], now, user)
        out[#out + 1] = user
    end
end
"""
    + _FIRST
    + """
table.insert(out, 1, earliest)
return out
"""
)
# KEYS: an index shard; ARGV: pairs (key, earliest or -1). Sets the sweep's answer; -1 removes the key
# only while its score is still expired.
_CLUSTER_INDEX_SWEPT = (
    LUA_NOW
    + """
for i = 1, #ARGV, 2 do
    local score = tonumber(ARGV[i + 1])
    if score >= 0 then
        redis.call('ZADD', KEYS[1], score, ARGV[i])
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
assert "KEYS[4]" not in _CLUSTER_CHANGE + _CLUSTER_REFRESH + _CLUSTER_FADE, "an index write left in"


class ClusterPresenceStore(RedisPresenceStore):
    """RedisPresenceStore on a Redis Cluster: key K's entries, users and leave times are
    ``<p>:{K}``, ``<p>-users:{K}``, ``<p>-left:{K}`` (one slot, one script per change); the index is
    INDEX_SHARDS keys ``<p>-index:{i}`` (K's shard by CRC32), lowered after each change and walked, every
    shard, by the sweep. A change is two round trips (the key's script, then its shard)."""

    backend_name = "Redis Cluster"

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 60.0,
        grace: float = 0.0,
        op_timeout: float = 1.0,
        key_prefix: str = "fonana-ws:presence",
        pool_size: int = 8,
    ) -> None:
        self.process_id = uuid.uuid4().hex
        self.safe_url = mask_url(url)
        self.prefix = key_prefix
        self.index_prefix = f"{key_prefix}-index"
        self._ttl_ms = max(1, int(ttl * 1000))
        self._grace_ms = int(grace * 1000)
        self._client = cluster_client(url, op_timeout=op_timeout, pool_size=pool_size)

    def _keys(self, key: str) -> list[str]:
        p = self.prefix
        return [f"{p}:{{{key}}}", f"{p}-users:{{{key}}}", f"{p}-left:{{{key}}}"]

    async def _lower(self, keys: list[str], earliest: list[Any]) -> None:
        """Lower the keys' index scores to their earliest expiry (ZADD LT adds a missing key)."""
        pipe = self._client.pipeline()
        for key, score in zip(keys, earliest, strict=True):
            if float(score) >= 0:
                pipe.zadd(index_shard(self.index_prefix, key), {key: float(score)}, lt=True)
        if len(pipe):
            await pipe.execute()

    async def change(self, batch: list[tuple[str, list[str], list[str]]]) -> list[Change]:
        calls: list[Call] = [
            (
                _CLUSTER_CHANGE,
                self._keys(key),
                [self.process_id, self._ttl_ms, self._grace_ms, "", len(enter), *enter, *leave],
            )
            for key, enter, leave in batch
        ]
        results = await eval_many(self._client, calls)
        await self._lower([key for key, _, _ in batch], [r[3] for r in results])
        return [Change(int(c), [_text(u) for u in j], [_text(u) for u in g]) for c, j, g, _ in results]

    async def refresh(self, held: dict[str, list[str]]) -> list[tuple[str, str]]:
        keys = list(held)
        calls: list[Call] = [
            (_CLUSTER_REFRESH, self._keys(k), [self.process_id, self._ttl_ms, "", *held[k]]) for k in keys
        ]
        await self._lower(keys, await eval_many(self._client, calls))
        return await self._sweep()

    async def _sweep(self) -> list[tuple[str, str]]:
        client: Any = self._client
        shards = [f"{self.index_prefix}:{{{i}}}" for i in range(INDEX_SHARDS)]
        due_lists = await eval_many(client, [(CLUSTER_DUE, [s], [SWEEP_BATCH]) for s in shards])
        due = [_text(k) for keys in due_lists for k in keys][:SWEEP_BATCH]
        if not due:
            return []
        pid = [len(self.process_id)]
        swept = await eval_many(client, [(_CLUSTER_SWEEP_KEY, self._keys(k), pid) for k in due])
        gone = [(k, _text(u)) for k, out in zip(due, swept, strict=True) for u in out[1:]]
        earliest = {k: _text(out[0]) for k, out in zip(due, swept, strict=True)}
        updates: list[Call] = [
            (_CLUSTER_INDEX_SWEPT, [shard], [x for k in ks for x in (k, earliest[k])])
            for shard, ks in by_shard(self.index_prefix, due).items()
        ]
        await eval_many(client, updates)
        # A key removed from its shard may have got an entry meanwhile: look again, and put it back.
        emptied = [k for k in due if float(earliest[k]) < 0]
        if emptied:
            pipe = client.pipeline()
            for k in emptied:
                pipe.zrange(self._keys(k)[0], 0, 0, withscores=True)
            firsts = await pipe.execute()
            await self._lower(emptied, [f[0][1] if f else -1 for f in firsts])
        return gone

    async def lookup(self, key: str, user_ids: list[str]) -> Lookup:
        keys = self._keys(key)
        out = (await eval_many(self._client, [(_LUA_LOOKUP, keys[1:3], list(user_ids))]))[0]
        found = {}
        for i, user in enumerate(user_ids):
            left = out[3 + 2 * i] if 3 + 2 * i < len(out) else None
            found[user] = (bool(out[2 + 2 * i]), float(left) / 1000 if left else None)
        return int(out[0]) / 1000, int(out[1]), found

    async def claim(self, key: str, seconds: float) -> bool:
        claimed = await self._client.set(
            f"{self.prefix}-count:{{{key}}}", self.process_id, nx=True, px=max(1, int(seconds * 1000))
        )
        return bool(claimed)

    async def fade(self, held: dict[str, list[str]]) -> None:
        keys = list(held)
        calls: list[Call] = [
            (_CLUSTER_FADE, self._keys(k)[:1], [self.process_id, self._grace_ms, "", *held[k]]) for k in keys
        ]
        earliest = await eval_many(self._client, calls)
        pipe = self._client.pipeline()
        for key, score in zip(keys, earliest, strict=True):
            if float(score) >= 0:  # lowered: the sweep looks once the faded entries expire
                pipe.zadd(index_shard(self.index_prefix, key), {key: float(score)})
        if len(pipe):
            await pipe.execute()

    async def close(self) -> None:
        await self._client.aclose()


_PG_LOCK_SPACE = 0x66777370  # "fwsp": the first key of the per-channel advisory locks
_PG_CREATE = f"""
CREATE SCHEMA IF NOT EXISTS fonana_ws;
CREATE UNLOGGED TABLE IF NOT EXISTS fonana_ws.channel_presence (
    channel_key text NOT NULL,
    user_id text NOT NULL,
    process text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (channel_key, user_id, process)
);
CREATE INDEX IF NOT EXISTS channel_presence_expiry ON fonana_ws.channel_presence (expires_at);
CREATE UNLOGGED TABLE IF NOT EXISTS fonana_ws.channel_presence_left (
    channel_key text NOT NULL,
    user_id text NOT NULL,
    left_at timestamptz NOT NULL,
    PRIMARY KEY (channel_key, user_id)
);
CREATE UNLOGGED TABLE IF NOT EXISTS fonana_ws.channel_presence_claims (
    channel_key text PRIMARY KEY,
    until timestamptz NOT NULL
);
-- One process's entries of one key: who came in (not within p_grace of their last leave) and who went.
CREATE OR REPLACE FUNCTION fonana_ws.presence_change(
    p_key text, p_process text, p_ttl double precision, p_grace double precision,
    p_enter text[], p_leave text[], OUT present integer, OUT joined text[], OUT gone text[]
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    u text;
BEGIN
    PERFORM pg_advisory_xact_lock({_PG_LOCK_SPACE}, hashtext(p_key));
    joined := '{{}}';
    gone := '{{}}';
    DELETE FROM fonana_ws.channel_presence_left l
        WHERE l.channel_key = p_key AND l.left_at <= now() - make_interval(secs => p_grace);
    FOREACH u IN ARRAY p_enter LOOP
        INSERT INTO fonana_ws.channel_presence
            VALUES (p_key, u, p_process, now() + make_interval(secs => p_ttl)) ON CONFLICT DO NOTHING;
        IF FOUND AND NOT EXISTS (
            SELECT 1 FROM fonana_ws.channel_presence c
            WHERE c.channel_key = p_key AND c.user_id = u AND c.process <> p_process
        ) AND NOT EXISTS (
            SELECT 1 FROM fonana_ws.channel_presence_left l WHERE l.channel_key = p_key AND l.user_id = u
        ) THEN
            joined := joined || u;
        END IF;
    END LOOP;
    FOREACH u IN ARRAY p_leave LOOP
        DELETE FROM fonana_ws.channel_presence c
            WHERE c.channel_key = p_key AND c.user_id = u AND c.process = p_process;
        IF FOUND AND NOT EXISTS (
            SELECT 1 FROM fonana_ws.channel_presence c WHERE c.channel_key = p_key AND c.user_id = u
        ) THEN
            INSERT INTO fonana_ws.channel_presence_left VALUES (p_key, u, now())
                ON CONFLICT (channel_key, user_id) DO UPDATE SET left_at = EXCLUDED.left_at;
            gone := gone || u;
        END IF;
    END LOOP;
    SELECT count(DISTINCT c.user_id) INTO present
        FROM fonana_ws.channel_presence c WHERE c.channel_key = p_key;
END
$$;
-- The (key, user) pairs whose last rows (of dead processes) this call deleted, under each key's lock:
-- one sweeping process sees each. Keys in order, so two sweeps never deadlock.
CREATE OR REPLACE FUNCTION fonana_ws.presence_sweep(p_batch integer)
RETURNS TABLE (out_key text, out_user text) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    k text;
    u text;
    dead text[];
BEGIN
    DELETE FROM fonana_ws.channel_presence_claims WHERE until < now() - interval '1 hour';
    -- Leave times matter for the grace only (at most 600 s): those of keys nobody touches again go here.
    DELETE FROM fonana_ws.channel_presence_left WHERE left_at < now() - interval '1 hour';
    FOR k IN SELECT DISTINCT c.channel_key FROM fonana_ws.channel_presence c WHERE c.expires_at <= now()
             ORDER BY 1 LIMIT p_batch LOOP
        PERFORM pg_advisory_xact_lock({_PG_LOCK_SPACE}, hashtext(k));
        WITH d AS (
            DELETE FROM fonana_ws.channel_presence c WHERE c.channel_key = k AND c.expires_at <= now()
            RETURNING c.user_id
        ) SELECT array_agg(DISTINCT d.user_id) INTO dead FROM d;
        FOREACH u IN ARRAY coalesce(dead, '{{}}') LOOP
            IF NOT EXISTS (
                SELECT 1 FROM fonana_ws.channel_presence c WHERE c.channel_key = k AND c.user_id = u
            ) THEN
                INSERT INTO fonana_ws.channel_presence_left VALUES (k, u, now())
                    ON CONFLICT (channel_key, user_id) DO UPDATE SET left_at = EXCLUDED.left_at;
                out_key := k;
                out_user := u;
                RETURN NEXT;
            END IF;
        END LOOP;
    END LOOP;
END
$$;
"""
# Made last, so its presence means all is there.
_PG_EXISTS = "SELECT to_regprocedure('fonana_ws.presence_sweep(integer)')"
_PG_CHANGE = "SELECT present, joined, gone FROM fonana_ws.presence_change($1, $2, $3, $4, $5, $6)"
_PG_REFRESH = """
INSERT INTO fonana_ws.channel_presence (channel_key, user_id, process, expires_at)
SELECT k, u, $3, now() + make_interval(secs => $4) FROM unnest($1::text[], $2::text[]) AS x(k, u)
ON CONFLICT (channel_key, user_id, process) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""
_PG_FADE = """
UPDATE fonana_ws.channel_presence SET expires_at = now() + make_interval(secs => $2) WHERE process = $1
"""
_PG_SWEEP = "SELECT out_key, out_user FROM fonana_ws.presence_sweep($1)"
_PG_COUNT = "SELECT count(DISTINCT user_id) FROM fonana_ws.channel_presence WHERE channel_key = $1"
_PG_MEMBERS = """
SELECT DISTINCT user_id FROM fonana_ws.channel_presence WHERE channel_key = $1 ORDER BY user_id LIMIT $2
"""
_PG_LOOKUP = """
SELECT extract(epoch FROM now())::float8,
    (SELECT count(DISTINCT c.user_id) FROM fonana_ws.channel_presence c WHERE c.channel_key = $1),
    u,
    EXISTS (SELECT 1 FROM fonana_ws.channel_presence c WHERE c.channel_key = $1 AND c.user_id = u),
    (SELECT extract(epoch FROM l.left_at)::float8 FROM fonana_ws.channel_presence_left l
     WHERE l.channel_key = $1 AND l.user_id = u)
FROM unnest($2::text[]) AS x(u)
"""
_PG_CLAIM = """
INSERT INTO fonana_ws.channel_presence_claims AS c (channel_key, until)
VALUES ($1, now() + make_interval(secs => $2))
ON CONFLICT (channel_key) DO UPDATE SET until = EXCLUDED.until WHERE c.until <= now()
RETURNING 1
"""


class PostgresPresenceStore(PresenceStore):
    """Rows ``(channel_key, user_id, process, expires_at)`` in ``fonana_ws.channel_presence``, leave times
    in ``fonana_ws.channel_presence_left``, the count throttle's claims in ``..._claims``: UNLOGGED, as
    ``user_connections``' table (rewritten every TTL/3; after a crash the live processes write theirs
    back)."""

    backend_name = "PostgreSQL"

    def __init__(
        self, url: str, *, ttl: float = 60.0, grace: float = 0.0, op_timeout: float = 1.0, pool_size: int = 4
    ) -> None:
        self.process_id = uuid.uuid4().hex
        self.safe_url = mask_url(url)
        self.ttl = ttl
        self.grace = grace
        self.op_timeout = op_timeout
        self._dsn = plain_dsn(url)
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._ready = False
        self._lock = asyncio.Lock()

    async def _pool_ready(self) -> asyncpg.Pool:
        if self._ready and self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=0,
                    max_size=self._pool_size,
                    timeout=self.op_timeout,
                    reset=keep_session,
                )
            async with self._pool.acquire() as conn:
                if await conn.fetchval(_PG_EXISTS) is None:
                    for attempt in range(2):
                        try:
                            async with conn.transaction():
                                await conn.execute(
                                    "SELECT pg_advisory_xact_lock(hashtext('fonana_ws.channel_presence'))"
                                )
                                await conn.execute(_PG_CREATE)
                            break
                        except asyncpg.exceptions.UniqueViolationError:
                            if attempt:  # CREATE SCHEMA racing another module's
                                raise
            self._ready = True
            return self._pool

    def lost(self) -> None:
        self._ready = False

    async def change(self, batch: list[tuple[str, list[str], list[str]]]) -> list[Change]:
        pool = await self._pool_ready()
        out = []
        async with pool.acquire() as conn:
            for key, enter, leave in batch:
                row = await conn.fetchrow(
                    _PG_CHANGE, key, self.process_id, self.ttl, self.grace, enter, leave
                )
                out.append(Change(int(row[0]), list(row[1]), list(row[2])))
        return out

    async def refresh(self, held: dict[str, list[str]]) -> list[tuple[str, str]]:
        pool = await self._pool_ready()
        pairs = sorted((k, u) for k, users in held.items() for u in users)
        if pairs:
            keys, users = [k for k, _ in pairs], [u for _, u in pairs]
            await pool.execute(_PG_REFRESH, keys, users, self.process_id, self.ttl)
        return [(r[0], r[1]) for r in await pool.fetch(_PG_SWEEP, SWEEP_BATCH)]

    async def members(self, key: str, limit: int) -> tuple[int, list[str]]:
        pool = await self._pool_ready()
        async with pool.acquire() as conn:
            count = int(await conn.fetchval(_PG_COUNT, key))
            users = [r[0] for r in await conn.fetch(_PG_MEMBERS, key, limit)] if count else []
        return count, users

    async def lookup(self, key: str, user_ids: list[str]) -> Lookup:
        pool = await self._pool_ready()
        rows = await pool.fetch(_PG_LOOKUP, key, user_ids)
        if not rows:
            return time.time(), int(await pool.fetchval(_PG_COUNT, key)), {}
        return float(rows[0][0]), int(rows[0][1]), {r[2]: (bool(r[3]), r[4]) for r in rows}

    async def claim(self, key: str, seconds: float) -> bool:
        pool = await self._pool_ready()
        return await pool.fetchval(_PG_CLAIM, key, seconds) is not None

    async def fade(self, held: dict[str, list[str]]) -> None:
        pool = await self._pool_ready()
        await pool.execute(_PG_FADE, self.process_id, self.grace)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await pool.close()
            except BaseException:
                pool.terminate()
                raise


def for_settings(settings: Settings, **options: Any) -> PresenceStore:
    """The store on the broker ``settings.broadcast_url`` selects; ``options`` go to its constructor."""
    kind = settings.broker_kind
    grace = settings.offline_grace
    if kind == "redis":
        options.setdefault("ttl", settings.presence_ttl)
        return RedisPresenceStore(settings.broadcast_url, grace=grace, **options)
    if kind == "postgresql":
        options.setdefault("ttl", settings.presence_ttl)
        return PostgresPresenceStore(settings.broadcast_url, grace=grace, **options)
    if kind == "redis+cluster":
        options.setdefault("ttl", settings.presence_ttl)
        return ClusterPresenceStore(settings.broadcast_url, grace=grace, **options)
    if kind == "memory":
        return MemoryPresenceStore(grace=grace)
    raise ValueError(f"BROADCAST_URL: unsupported broker scheme {kind!r}")
