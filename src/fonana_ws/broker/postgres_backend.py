"""PostgreSQL LISTEN/NOTIFY backend for broadcaster that survives restarts and carries any payload.

broadcaster 0.3.1's own PostgreSQL backend runs concurrent LISTENs on one asyncpg connection
("another operation is in progress"), dies silently when the connection drops, passes channel names
to LISTEN as they are (truncated past 63 bytes) and cannot send payloads of 8000 bytes or more.
This one serializes every operation on its listen connection, hashes
channel names into LISTEN identifiers, moves large payloads through a table of its own, and
reconnects with backoff, listening again on every channel still in use.

History (protocol §7.8) lives in two UNLOGGED tables of schema ``fonana_ws``, made on first use with the
functions that work on them: ``history_keys`` (key, epoch, last offset, expiry) and ``history_events``
(key, offset, event text, time). UNLOGGED: no WAL for a cache of the last minutes; a crash (or a
failover) empties both tables together, which is a new epoch for every key, exactly what a lost history
must be. A clean restart keeps them, and the epochs with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
from broadcaster import BroadcastBackend, Event

from fonana_ws.broker.base import (
    MIN_BACKOFF,
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

T = TypeVar("T")

# NOTIFY rejects payloads of 8000 bytes or more; keep a margin under it.
_NOTIFY_MAX = 7900
# First character of every NOTIFY payload we send: the message itself follows, or a row id.
_INLINE = "="
_STORED = "#"
_KEEP_PAYLOADS = 300.0
_CLEANUP_EVERY = 60.0

_CREATE_TABLE = """
CREATE SCHEMA IF NOT EXISTS fonana_ws;
CREATE TABLE IF NOT EXISTS fonana_ws.broker_payloads (
    id bigserial PRIMARY KEY,
    channel text NOT NULL,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""
_DELETE_OLD = "DELETE FROM fonana_ws.broker_payloads WHERE created_at < now() - make_interval(secs => $1)"
_STORE_AND_NOTIFY = f"""
WITH stored AS (
    INSERT INTO fonana_ws.broker_payloads (channel, payload) VALUES ($1, $2) RETURNING id
)
SELECT pg_notify($3, '{_STORED}' || id) FROM stored
"""

# Many notifications in one statement, so one round trip and one transaction: PostgreSQL delivers them at
# COMMIT, all or none, in the order they were sent (ORDER BY: volatile functions run after the sort).
# Rows flagged ``spill`` get their row id up front (nextval, so no join back is needed), are inserted in
# the same statement and are notified as that id.
_PUBLISH_MANY = f"""
WITH items AS MATERIALIZED (
    SELECT ord, ident, channel, message, spill,
           CASE WHEN spill THEN nextval(pg_get_serial_sequence('fonana_ws.broker_payloads', 'id')) END AS id
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[])
        WITH ORDINALITY AS t(ident, channel, message, spill, ord)
),
stored AS (
    INSERT INTO fonana_ws.broker_payloads (id, channel, payload)
    SELECT id, channel, message FROM items WHERE spill
)
SELECT count(*) FROM (
    SELECT pg_notify(ident, CASE WHEN spill THEN '{_STORED}' || id ELSE '{_INLINE}' || message END)
    FROM items ORDER BY ord
) AS sent
"""
# The history tables and functions (the _v1 suffix lets a later layout live beside this one).
# history_key_v1 makes the key's row if missing, locks it, and starts a new epoch once it was idle past
# ttl. history_publish_v1 locks every key of the call first, in key order, so that two concurrent calls
# never deadlock, then for each target in order: bumps the offset, stores the event, trims the key by
# size and age, and notifies exactly as publish() does (the same identifier and inline/stored framing).
# NOTIFYs reach listeners at COMMIT in commit order, and the key's row lock is held until then, so
# every listener sees a key's offsets in order.
_CREATE_HISTORY = f"""
CREATE UNLOGGED TABLE IF NOT EXISTS fonana_ws.history_keys (
    key text PRIMARY KEY,
    epoch text NOT NULL,
    last_offset bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE UNLOGGED TABLE IF NOT EXISTS fonana_ws.history_events (
    key text NOT NULL,
    "offset" bigint NOT NULL,
    event text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (key, "offset")
);
CREATE OR REPLACE FUNCTION fonana_ws.history_key_v1(
    p_key text, p_epoch text, p_ttl double precision, OUT o_epoch text, OUT o_offset bigint
) LANGUAGE plpgsql AS $$
DECLARE
    expiry timestamptz;
BEGIN
    INSERT INTO fonana_ws.history_keys (key, epoch, last_offset, expires_at)
    VALUES (p_key, p_epoch, 0, clock_timestamp() + make_interval(secs => p_ttl))
    ON CONFLICT (key) DO NOTHING;
    SELECT epoch, last_offset, expires_at INTO o_epoch, o_offset, expiry
    FROM fonana_ws.history_keys WHERE key = p_key FOR UPDATE;
    IF expiry < clock_timestamp() THEN
        UPDATE fonana_ws.history_keys
        SET epoch = p_epoch, last_offset = 0, expires_at = clock_timestamp() + make_interval(secs => p_ttl)
        WHERE key = p_key;
        DELETE FROM fonana_ws.history_events WHERE key = p_key;
        o_epoch := p_epoch;
        o_offset := 0;
    END IF;
END $$;
CREATE OR REPLACE FUNCTION fonana_ws.history_publish_v1(
    p_keys text[], p_idents text[], p_channels text[], p_envelopes text[], p_events text[],
    p_epochs text[], p_size integer, p_ttl double precision
) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    ttl interval := make_interval(secs => p_ttl);
    offsets bigint[] := '{{}}';
    k text;
    i integer;
    n bigint;
    at timestamptz;
    message text;
    row_id bigint;
BEGIN
    FOR k IN SELECT DISTINCT x FROM unnest(p_keys) AS x WHERE x IS NOT NULL ORDER BY x LOOP
        PERFORM fonana_ws.history_key_v1(k, p_epochs[array_position(p_keys, k)], p_ttl);
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(p_channels, 1), 0) LOOP
        n := NULL;
        message := p_envelopes[i];
        IF p_keys[i] IS NOT NULL THEN
            at := clock_timestamp();
            UPDATE fonana_ws.history_keys SET last_offset = last_offset + 1, expires_at = at + ttl
            WHERE key = p_keys[i] RETURNING last_offset INTO n;
            INSERT INTO fonana_ws.history_events (key, "offset", event, created_at)
            VALUES (p_keys[i], n, left(p_events[i], -1) || ',"offset":' || n || '}}', at);
            DELETE FROM fonana_ws.history_events
            WHERE key = p_keys[i] AND ("offset" <= n - p_size OR created_at < at - ttl);
            message := left(message, -2) || ',"offset":' || n || '}}}}';
        END IF;
        IF octet_length(message) + {len(_INLINE)} >= {_NOTIFY_MAX} THEN
            INSERT INTO fonana_ws.broker_payloads (channel, payload) VALUES (p_channels[i], message)
            RETURNING id INTO row_id;
            PERFORM pg_notify(p_idents[i], '{_STORED}' || row_id);
        ELSE
            PERFORM pg_notify(p_idents[i], '{_INLINE}' || message);
        END IF;
        offsets := array_append(offsets, n);
    END LOOP;
    RETURN offsets;
END $$;
CREATE OR REPLACE FUNCTION fonana_ws.history_since_v1(
    p_key text, p_epoch text, p_ttl double precision, p_after bigint, p_asked text,
    OUT o_epoch text, OUT o_offset bigint, OUT o_events text[]
) LANGUAGE plpgsql AS $$
DECLARE
    kept bigint;
    first_offset bigint;
    oldest timestamptz;
BEGIN
    SELECT k.o_epoch, k.o_offset INTO o_epoch, o_offset
    FROM fonana_ws.history_key_v1(p_key, p_epoch, p_ttl) AS k;
    IF o_epoch <> p_asked OR p_after > o_offset OR p_after < 0 THEN
        RETURN;
    END IF;
    SELECT coalesce(array_agg(event ORDER BY "offset"), '{{}}'), count(*), min("offset"), min(created_at)
    INTO o_events, kept, first_offset, oldest
    FROM fonana_ws.history_events WHERE key = p_key AND "offset" > p_after AND "offset" <= o_offset;
    IF kept <> o_offset - p_after OR (kept > 0 AND (first_offset <> p_after + 1
            OR oldest < clock_timestamp() - make_interval(secs => p_ttl))) THEN
        o_events := NULL;
    END IF;
END $$;
"""
_HISTORY_READY = (
    "SELECT to_regprocedure('fonana_ws.history_since_v1(text,text,double precision,bigint,text)') IS NOT NULL"
)
_PUBLISH_TARGETS = (
    "SELECT fonana_ws.history_publish_v1($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6::text[], $7::integer, $8::double precision)"
)
# Keys idle past their ttl, and their events (an active key's old events go at each append).
_DELETE_IDLE_HISTORY = """
WITH gone AS (DELETE FROM fonana_ws.history_keys WHERE expires_at < now() RETURNING key)
DELETE FROM fonana_ws.history_events WHERE key IN (SELECT key FROM gone)
"""

# Bytes of messages per statement of a batch: far below the 1 GB limit of one value (a text[]) or message.
_BATCH_BYTES = 64 * 1024 * 1024


def channel_ident(channel: str) -> str:
    """The LISTEN identifier for a channel: always hashed, so any text fits 63 bytes and never collides."""
    return "fws_" + hashlib.sha256(channel.encode("utf-8")).hexdigest()[:40]


def plain_dsn(url: str) -> str:
    """The URL as asyncpg takes it: ``postgresql+asyncpg://`` becomes ``postgresql://``."""
    scheme, sep, rest = url.partition("://")
    base = scheme.lower().split("+", 1)[0]
    if not sep or base not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {mask_url(url)}")
    return f"{base}://{rest}"


def is_down_error(exc: BaseException) -> bool:
    """True when the error means PostgreSQL is unreachable or going away, not a bad query."""
    return isinstance(
        exc,
        OSError  # includes TimeoutError and ConnectionError
        | asyncpg.InterfaceError  # connection closed, pool closing
        | asyncpg.PostgresConnectionError  # SQLSTATE class 08
        | asyncpg.exceptions.OperatorInterventionError  # class 57: admin/crash shutdown, cannot connect now
        | asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections
    )


class PostgresBackend(Supervised, BroadcastBackend):
    """broadcaster backend on PostgreSQL LISTEN/NOTIFY with reconnects and a health flag (``is_up``).

    ``connect()`` does not fail when PostgreSQL is down: it waits up to ``op_timeout`` for the first
    connection, then keeps retrying in the background while ``is_up`` stays False. It creates schema
    ``fonana_ws`` and table ``fonana_ws.broker_payloads`` if missing, for payloads too large to NOTIFY.
    """

    def __init__(
        self,
        url: str,
        *,
        op_timeout: float = 2.0,
        health_interval: float = 1.0,
        max_backoff: float = 5.0,
        max_payload: int = 64 * 1024 * 1024,
        pool_size: int = 4,
    ) -> None:
        self._dsn = plain_dsn(url)
        self.safe_url = mask_url(url)
        self._op_timeout = op_timeout
        self._health_interval = health_interval
        self._max_backoff = max_backoff
        self._max_payload = max_payload
        self._pool_size = pool_size
        #: Channels in use; the hub's registry (fanout/subscriptions.py) counts their subscribers.
        self._wanted: set[str] = set()
        self._names: dict[str, str] = {}  # LISTEN identifier -> channel
        self._locks = KeyedLocks()
        # asyncpg allows one operation at a time per connection.
        self._conn_lock = asyncio.Lock()
        self._notes: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        self._up = asyncio.Event()
        self._down_since: float | None = None
        self._supervisor: asyncio.Task[None] | None = None
        # State of the current connection; reset by each session.
        self._listen: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None
        self._live: set[str] = set()
        self._lost = asyncio.Event()
        self._lost_reason: BaseException | str = ""
        self._session_was_up = False
        self._history_ready = False  # the history tables and functions are known to exist

    @property
    def is_up(self) -> bool:
        """True while connected with every channel in use listened to."""
        return self._up.is_set()

    async def connect(self) -> None:
        if self._supervisor is not None:
            return
        self._notes = asyncio.Queue()
        await self._start("fonana-ws postgres broker")

    async def disconnect(self) -> None:
        await self._stop()
        self._wanted.clear()
        self._names.clear()
        self._notes.put_nowait(None)

    async def subscribe(self, channel: str) -> None:
        """Mark the channel in use and LISTEN unless it already is; never raises when down.

        Idempotent: the process's one subscription registry counts subscribers, so a backend sees each
        channel subscribed once and unsubscribed once (broadcaster's own backends behave the same).
        """
        async with self._locks.hold(channel):
            self._wanted.add(channel)
            self._names[channel_ident(channel)] = channel
            if channel not in self._live:
                await self._change(channel, listen=True)

    async def unsubscribe(self, channel: str) -> None:
        """The channel is no longer in use: UNLISTEN."""
        async with self._locks.hold(channel):
            self._wanted.discard(channel)
            self._names.pop(channel_ident(channel), None)
            if channel in self._live:
                await self._change(channel, listen=False)

    def _size(self, message: str) -> int:
        """The message's size in bytes, after checking PostgreSQL can carry it."""
        if "\x00" in message:
            raise ValueError("PostgreSQL text cannot hold NUL characters")
        size = len(message.encode("utf-8"))
        if size > self._max_payload:
            raise PayloadTooLarge(f"{size} bytes is over the {self._max_payload} byte limit")
        return size

    async def publish(self, channel: str, message: str) -> None:
        """NOTIFY, or raise BrokerUnavailable within ``op_timeout`` rather than drop the message."""
        size = self._size(message)
        pool = self._pool
        if not self.is_up or pool is None:
            raise BrokerUnavailable("PostgreSQL is unreachable")
        ident = channel_ident(channel)
        try:
            async with within(self._op_timeout, "PostgreSQL NOTIFY"):
                if size + len(_INLINE) < _NOTIFY_MAX:
                    await pool.execute("SELECT pg_notify($1, $2)", ident, _INLINE + message)
                else:
                    await pool.execute(_STORE_AND_NOTIFY, channel, message, ident)
        except Exception as exc:
            if is_down_error(exc):
                raise BrokerUnavailable(f"PostgreSQL publish failed: {describe(exc)}") from exc
            raise

    async def publish_many(self, items: Sequence[tuple[str, str]]) -> None:
        """Every NOTIFY in one transaction, in one statement and round trip: delivered all or none.

        Messages too large to NOTIFY are stored in the same statement. A batch of more than
        ``_BATCH_BYTES`` is sent as several statements in one explicit transaction (still all or none).
        Raises BrokerUnavailable within ``op_timeout`` when it cannot be done; nothing was delivered then.
        """
        if not items:
            return
        batches: list[tuple[list[str], list[str], list[str], list[bool]]] = []
        batch_bytes = 0
        for channel, message in items:
            size = self._size(message)
            if not batches or (batch_bytes and batch_bytes + size > _BATCH_BYTES):
                batches.append(([], [], [], []))
                batch_bytes = 0
            batch_bytes += size
            idents, channels, messages, spills = batches[-1]
            idents.append(channel_ident(channel))
            channels.append(channel)
            messages.append(message)
            spills.append(size + len(_INLINE) >= _NOTIFY_MAX)
        pool = self._pool
        if not self.is_up or pool is None:
            raise BrokerUnavailable("PostgreSQL is unreachable")
        try:
            async with within(self._op_timeout, f"PostgreSQL NOTIFY of {len(items)} messages"):
                if len(batches) == 1:
                    await pool.fetchval(_PUBLISH_MANY, *batches[0])  # its own transaction
                else:
                    async with pool.acquire() as conn, conn.transaction():
                        for batch in batches:
                            await conn.fetchval(_PUBLISH_MANY, *batch)
        except Exception as exc:
            if is_down_error(exc):
                raise BrokerUnavailable(f"PostgreSQL publish failed: {describe(exc)}") from exc
            raise

    async def _ensure_history(self, pool: asyncpg.Pool) -> None:
        """Create the history tables and functions on first use (checked first: CREATE needs rights)."""
        if self._history_ready:
            return
        async with pool.acquire() as conn:
            if not await conn.fetchval(_HISTORY_READY):
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('fonana_ws.history'))")
                    await conn.execute(_CREATE_HISTORY)
        self._history_ready = True

    async def _history_pool(self) -> asyncpg.Pool:
        pool = self._pool
        if not self.is_up or pool is None:
            raise BrokerUnavailable("PostgreSQL is unreachable")
        return pool

    async def publish_targets(self, targets: Sequence[Target], limits: HistoryLimits) -> list[int | None]:
        """Publish every target in one statement and transaction, all or none; return the offsets.

        Without history (no key, or ``limits`` off) a target is published as publish_many publishes
        it. With history, ``fonana_ws.history_publish_v1`` gives it the key's next offset under the
        key's row lock, stores and trims, and notifies in the same transaction.
        """
        history = limits.enabled and any(t.key for t in targets)
        for t in targets:
            self._size(t.envelope)
            if history and t.key:
                self._size(t.event)
                if not (t.envelope.endswith("}}") and t.event.endswith("}")):
                    raise ValueError(f"target for {t.key!r}: envelope must end with }}}} and event with }}")
        if not history:
            await self.publish_many([(t.channel, t.envelope) for t in targets])
            return [None] * len(targets)
        pool = await self._history_pool()
        args = (
            [t.key or None for t in targets],
            [channel_ident(t.channel) for t in targets],
            [t.channel for t in targets],
            [t.envelope for t in targets],
            [t.event if t.key else "" for t in targets],
            [uuid.uuid4().hex[:12] if t.key else "" for t in targets],
            limits.size,
            float(limits.ttl),
        )
        try:
            async with within(self._op_timeout, f"PostgreSQL publish of {len(targets)} targets"):
                await self._ensure_history(pool)
                offsets = await pool.fetchval(_PUBLISH_TARGETS, *args)
        except Exception as exc:
            if is_down_error(exc):
                raise BrokerUnavailable(f"PostgreSQL publish failed: {describe(exc)}") from exc
            raise
        return list(offsets)

    async def _history_row(self, query: str, *args: Any) -> asyncpg.Record:
        pool = await self._history_pool()
        try:
            async with within(self._op_timeout, "PostgreSQL history"):
                await self._ensure_history(pool)
                return await pool.fetchrow(query, *args)
        except Exception as exc:
            if is_down_error(exc):
                raise BrokerUnavailable(f"PostgreSQL history failed: {describe(exc)}") from exc
            raise

    async def history_position(self, key: str, limits: HistoryLimits) -> Position:
        """The key's epoch and last offset; makes the epoch (offset 0) when the key has none."""
        query = "SELECT * FROM fonana_ws.history_key_v1($1, $2, $3)"
        row = await self._history_row(query, key, uuid.uuid4().hex[:12], float(limits.ttl))
        return Position(row["o_epoch"], row["o_offset"])

    async def history_since(self, key: str, offset: int, epoch: str, limits: HistoryLimits) -> Replay:
        """The key's events after ``offset`` as stored, read under the key's lock (one moment)."""
        row = await self._history_row(
            "SELECT * FROM fonana_ws.history_since_v1($1, $2, $3, $4, $5)",
            key,
            uuid.uuid4().hex[:12],
            float(limits.ttl),
            offset,
            epoch,
        )
        events = row["o_events"]
        return Replay(row["o_epoch"], row["o_offset"], list(events) if events is not None else None)

    async def next_published(self) -> Event:
        """The next message, in order; waits through outages and raises only after disconnect()."""
        while True:
            note = await self._notes.get()
            if note is None:
                self._notes.put_nowait(None)  # wake any other waiter too
                raise BrokerUnavailable("backend disconnected")
            channel, body = note
            kind, rest = body[:1], body[1:]
            if kind == _INLINE:
                return Event(channel=channel, message=rest)
            if kind == _STORED and rest.isdigit():
                message = await self._load(int(rest))
                if message is not None:
                    return Event(channel=channel, message=message)
            else:
                logger.debug("ignoring a notification we did not send on %r", channel)

    async def _load(self, row_id: int) -> str | None:
        """A stored payload; retried through outages since the row outlives them by minutes."""
        while True:
            await self._up.wait()
            pool = self._pool
            try:
                if pool is None:
                    raise ConnectionError("no pool")
                async with asyncio.timeout(self._op_timeout):
                    message = await pool.fetchval(
                        "SELECT payload FROM fonana_ws.broker_payloads WHERE id = $1", row_id
                    )
            except Exception as exc:
                if not is_down_error(exc):
                    logger.error("dropping stored message %d: %s", row_id, describe(exc))
                    return None
                await asyncio.sleep(MIN_BACKOFF)
                continue
            if message is None:
                logger.warning("dropping stored message %d: its row is gone", row_id)
            return message

    async def _on_listen_conn(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run one operation on the listen connection, alone and bounded by ``op_timeout``."""
        async with self._conn_lock:
            conn = self._listen
            if conn is None or conn.is_closed() or self._lost.is_set():
                raise ConnectionError("not connected to PostgreSQL")
            async with within(self._op_timeout, "PostgreSQL"):
                return await op(conn)

    async def _change(self, channel: str, *, listen: bool) -> None:
        """LISTEN/UNLISTEN on the live connection, if any; a failure ends that connection."""
        conn = self._listen
        if conn is None:
            return  # down: _wanted is the record, the next session applies it
        try:
            await self._listen_or_unlisten(channel, listen)
        except Exception as exc:
            if not is_down_error(exc):
                raise
            if self._listen is conn:
                self._signal_lost(exc)

    async def _listen_or_unlisten(self, channel: str, listen: bool) -> None:
        ident = channel_ident(channel)
        if listen:
            await self._on_listen_conn(lambda conn: conn.add_listener(ident, self._on_notify))
            self._live.add(channel)
        else:
            self._live.discard(channel)
            await self._on_listen_conn(lambda conn: conn.remove_listener(ident, self._on_notify))

    def _on_notify(self, conn: Any, pid: int, ident: str, payload: str) -> None:
        # Resolve the name now: once the last subscriber has left, the notification is dropped.
        channel = self._names.get(ident)
        if channel is not None:
            self._notes.put_nowait((channel, payload))

    def _on_terminated(self, conn: Any) -> None:
        if conn is self._listen:  # our own close at the end of a session is no loss
            self._signal_lost("connection to PostgreSQL closed")

    def _signal_lost(self, reason: BaseException | str) -> None:
        """Mark the broker down now and make the watcher end this session."""
        self._mark_down(reason)
        self._lost_reason = reason
        self._lost.set()

    async def _session(self) -> None:
        """One connection's life: connect, LISTEN again, watch until the connection fails."""
        self._session_was_up = False
        self._lost = asyncio.Event()
        conn: asyncpg.Connection | None = None
        pool: asyncpg.Pool | None = None
        try:
            async with within(self._op_timeout * 2, "connecting to PostgreSQL"):
                conn = await asyncpg.connect(self._dsn, timeout=self._op_timeout)
                pool = await asyncpg.create_pool(
                    self._dsn, min_size=1, max_size=self._pool_size, timeout=self._op_timeout
                )
                await _ensure_table(conn)
            conn.add_termination_listener(self._on_terminated)
            self._live.clear()
            self._listen, self._pool = conn, pool
            await self._relisten()
            self._mark_up()
            self._session_was_up = True
            await self._watch()
        finally:
            self._up.clear()
            self._listen, self._pool = None, None
            self._live.clear()
            if conn is not None:
                conn.terminate()
            if pool is not None:
                pool.terminate()

    async def _relisten(self) -> None:
        # One at a time: the listen connection takes one operation at a time anyway.
        for channel in list(self._wanted):
            async with self._locks.hold(channel):
                if channel in self._wanted and channel not in self._live:
                    await self._listen_or_unlisten(channel, True)

    async def _watch(self) -> None:
        """Return never; raise once the connection is lost or stops answering ``SELECT 1``."""
        loop = asyncio.get_running_loop()
        next_cleanup = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._health_interval):
                    await self._lost.wait()
            if self._lost.is_set():
                raise ConnectionError(describe(self._lost_reason))
            await self._on_listen_conn(lambda conn: conn.fetchval("SELECT 1"))
            if loop.time() >= next_cleanup:
                next_cleanup = loop.time() + _CLEANUP_EVERY
                await self._delete_old_payloads()

    async def _delete_old_payloads(self) -> None:
        pool = self._pool
        if pool is None:
            return
        try:
            async with asyncio.timeout(self._op_timeout):
                await pool.execute(_DELETE_OLD, _KEEP_PAYLOADS)
                if self._history_ready:
                    await pool.execute(_DELETE_IDLE_HISTORY)
        except Exception as exc:
            if is_down_error(exc):
                raise
            logger.warning("could not delete old stored messages: %s", describe(exc))


async def _ensure_table(conn: asyncpg.Connection) -> None:
    """Create our schema and table if missing; checked first, since CREATE needs rights we may lack."""
    if await conn.fetchval("SELECT to_regclass('fonana_ws.broker_payloads')") is not None:
        return
    async with conn.transaction():
        # Concurrent CREATE ... IF NOT EXISTS from several servers can still collide; take turns.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('fonana_ws.broker_payloads'))")
        await conn.execute(_CREATE_TABLE)
