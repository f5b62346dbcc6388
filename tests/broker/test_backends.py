"""Our Redis and PostgreSQL broadcaster backends, against real brokers (no mocks).

Fault tests kill and restart private broker instances (see conftest.py), never the shared ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from broadcaster import Broadcast, Event

from fonana_ws.broker.base import BrokerUnavailable, PayloadTooLarge, backend_is_up, mask_url
from fonana_ws.broker.postgres_backend import PostgresBackend, channel_ident, plain_dsn
from fonana_ws.broker.redis_backend import RedisBackend

from .conftest import PRIVATE_PASSWORD, PrivatePostgres, PrivateRedis, free_port

Backend = RedisBackend | PostgresBackend


def unique(prefix: str = "ch") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def next_event(backend: Backend, timeout: float = 3.0) -> Event:
    return await asyncio.wait_for(backend.next_published(), timeout)


async def no_event(backend: Backend, within: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(backend.next_published(), within)


async def wait_until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds it took for check() to hold; fails the test after timeout."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(params=["redis", "postgres"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A connected backend on the shared Redis or PostgreSQL."""
    if request.param == "redis":
        made: Backend = RedisBackend(request.getfixturevalue("redis_url"))
    else:
        made = PostgresBackend(request.getfixturevalue("postgres_url"))
    await made.connect()
    try:
        assert made.is_up and backend_is_up(made)
        yield made
    finally:
        await made.disconnect()


# --- pure helpers -----------------------------------------------------------------------------


@pytest.mark.unit
def test_mask_url_hides_passwords_only() -> None:
    assert mask_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("postgresql://u:pw@h/db?sslmode=require") == "postgresql://u:***@h/db?sslmode=require"
    assert mask_url("postgresql://u@h/db?password=pw") == "postgresql://u@h/db?password=***"
    assert mask_url("postgresql://u@h:5432/db") == "postgresql://u@h:5432/db"


@pytest.mark.unit
def test_channel_ident_is_a_short_safe_identifier() -> None:
    long_a = "a" * 63 + ".x"
    long_b = "a" * 63 + ".y"
    idents = {channel_ident(c) for c in ["a", "A", "fonana-ws:post_1", "ü" * 100, long_a, long_b]}
    assert len(idents) == 6
    for ident in idents:
        assert ident.startswith("fws_") and len(ident) == 44 and ident.isascii() and ident == ident.lower()


@pytest.mark.unit
def test_plain_dsn_drops_the_driver() -> None:
    assert plain_dsn("postgresql+asyncpg://u@h/db") == "postgresql://u@h/db"
    assert plain_dsn("postgres://u@h/db") == "postgres://u@h/db"
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        plain_dsn("mysql://u:secret@h/db")
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisBackend("http://h")


# --- both backends, shared services -----------------------------------------------------------


async def test_roundtrip_through_broadcast(backend: Backend) -> None:
    channel = unique("fonana-ws:post_é")
    async with Broadcast(backend=backend) as broadcast:
        async with broadcast.subscribe(channel) as subscriber:
            await broadcast.publish(channel, '{"text": "héllo"}')
            event = await asyncio.wait_for(subscriber.get(), 3)
    assert event == Event(channel=channel, message='{"text": "héllo"}')


async def test_messages_arrive_in_order(backend: Backend) -> None:
    channel = unique()
    await backend.subscribe(channel)
    for i in range(100):
        await backend.publish(channel, str(i))
    assert [(await next_event(backend)).message for _ in range(100)] == [str(i) for i in range(100)]


async def _listening(backend: Backend, channel: str) -> bool:
    """Whether the broker itself has our connection subscribed to ``channel``."""
    if isinstance(backend, RedisBackend):
        client = aioredis.Redis.from_url(backend._url)
        try:
            [(_, count)] = await client.pubsub_numsub(channel)
        finally:
            await client.aclose()
        return count > 0
    # A LISTEN is visible only on its own connection.
    rows = await backend._on_listen_conn(lambda conn: conn.fetch("SELECT pg_listening_channels() AS c"))
    return channel_ident(channel) in {row["c"] for row in rows}


async def test_concurrent_subscribes_listen_once_and_one_unsubscribe_ends_it(backend: Backend) -> None:
    # The hub's registry (fanout/subscriptions.py) is the one refcount; a backend is a set of channels in
    # use: 200 concurrent subscribes listen once and deliver once, one unsubscribe stops listening.
    channel = unique()
    await asyncio.gather(*(backend.subscribe(channel) for _ in range(200)))
    assert await _listening(backend, channel)
    await backend.publish(channel, "once")
    assert await next_event(backend) == Event(channel=channel, message="once")
    await no_event(backend)

    await backend.unsubscribe(channel)
    assert not await _listening(backend, channel)
    await backend.publish(channel, "nobody listens")
    await no_event(backend)
    await backend.unsubscribe(channel)  # a second one is harmless
    assert not await _listening(backend, channel)


async def test_resubscribing_while_unsubscribing(backend: Backend) -> None:
    channel = unique()
    # Interleaved joins and leaves must end in a consistent state: subscribed, once.
    await backend.subscribe(channel)
    await asyncio.gather(*(op(channel) for _ in range(50) for op in (backend.unsubscribe, backend.subscribe)))
    assert await _listening(backend, channel)
    await backend.publish(channel, "still here")
    assert (await next_event(backend)).message == "still here"
    await backend.unsubscribe(channel)
    assert not await _listening(backend, channel)


async def test_payload_limit(backend: Backend) -> None:
    backend._max_payload = 1000
    with pytest.raises(PayloadTooLarge):
        await backend.publish(unique(), "x" * 1001)


# --- PostgreSQL specifics ---------------------------------------------------------------------


@pytest.fixture
async def pg(postgres_url: str) -> AsyncIterator[PostgresBackend]:
    made = PostgresBackend(postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    await made.connect()
    try:
        yield made
    finally:
        await made.disconnect()


@pytest.mark.parametrize("size", [7898, 7899, 7900, 8000, 100_000])
async def test_postgres_carries_large_payloads(pg: PostgresBackend, size: int) -> None:
    channel = unique()
    await pg.subscribe(channel)
    message = "".join(chr(ord("a") + i % 26) for i in range(size))
    await pg.publish(channel, message)
    assert await next_event(pg) == Event(channel=channel, message=message)


async def test_postgres_counts_utf8_bytes(pg: PostgresBackend) -> None:
    channel = unique()
    await pg.subscribe(channel)
    message = "é" * 4000  # 4000 characters, 8000 bytes: too large for NOTIFY itself
    await pg.publish(channel, message)
    assert (await next_event(pg)).message == message


async def test_postgres_long_and_odd_channel_names(pg: PostgresBackend) -> None:
    prefix = "fonana-ws:" + "x" * 53  # 63 bytes shared by both names
    first, second = prefix + ":first", prefix + ":second"
    odd = 'fonana-ws:"quoted"; DROP TABLE x; -- ü' + "y" * 160
    assert len(odd.encode()) >= 190
    for channel in (first, second, odd):
        await pg.subscribe(channel)
    await pg.publish(first, "1")
    await pg.publish(second, "2")
    await pg.publish(odd, "3")
    got = [await next_event(pg) for _ in range(3)]
    assert got == [Event(first, "1"), Event(second, "2"), Event(odd, "3")]
    await pg.unsubscribe(first)
    await pg.publish(first, "gone")
    await pg.publish(second, "kept")
    assert await next_event(pg) == Event(second, "kept")


# --- broker unreachable from the start --------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_starts_while_broker_is_down(kind: str) -> None:
    port = free_port()  # nothing listens there
    if kind == "redis":
        made: Backend = RedisBackend(f"redis://:{PRIVATE_PASSWORD}@127.0.0.1:{port}/0", op_timeout=0.5)
    else:
        made = PostgresBackend(f"postgresql://postgres:{PRIVATE_PASSWORD}@127.0.0.1:{port}/x", op_timeout=0.5)
    start = time.monotonic()
    await made.connect()
    try:
        assert not made.is_up
        await made.subscribe("recorded")  # no error: it is subscribed once the broker is back
        with pytest.raises(BrokerUnavailable):
            await made.publish("recorded", "x")
        assert time.monotonic() - start < 2
    finally:
        await made.disconnect()


# --- faults: private brokers killed and restarted ---------------------------------------------


async def _survives_restart(
    backend: Backend, kill: Callable[[], None], restart: Callable[[], None], caplog: pytest.LogCaptureFixture
) -> None:
    """Subscriptions made before an outage, and during it, deliver again once the broker is back."""
    caplog.set_level(logging.INFO, logger="fonana_ws.broker")
    before, during = unique("before"), unique("during")
    async with Broadcast(backend=backend) as broadcast:
        assert backend.is_up
        async with broadcast.subscribe(before) as sub_before:
            await broadcast.publish(before, "1")
            assert (await asyncio.wait_for(sub_before.get(), 3)).message == "1"
            caplog.clear()

            await asyncio.to_thread(kill)
            await wait_until(lambda: not backend.is_up, 5)
            start = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await broadcast.publish(before, "lost")
            assert time.monotonic() - start < 2.5

            async with broadcast.subscribe(during) as sub_during:
                await asyncio.to_thread(restart)
                await wait_until(lambda: backend.is_up, 10)
                await broadcast.publish(before, "2")
                await broadcast.publish(during, "3")
                assert (await asyncio.wait_for(sub_before.get(), 3)).message == "2"
                assert (await asyncio.wait_for(sub_during.get(), 3)).message == "3"

    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "fonana_ws.broker"]
    assert [m for level, m in messages if level == logging.WARNING and m.startswith("broker down:")]
    assert len([m for _, m in messages if m.startswith("broker down:")]) == 1, messages
    assert len([m for _, m in messages if m.startswith("broker up again after")]) == 1, messages
    assert PRIVATE_PASSWORD not in caplog.text


async def test_redis_survives_restart(private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture) -> None:
    private_redis.start()
    await _survives_restart(RedisBackend(private_redis.url), private_redis.kill, private_redis.start, caplog)


async def test_postgres_survives_restart(
    private_postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture
) -> None:
    backend = PostgresBackend(private_postgres.url)
    await _survives_restart(backend, private_postgres.stop, private_postgres.start, caplog)


async def _notices_frozen_peer(
    backend: Backend, freeze: Callable[[], None], thaw: Callable[[], None]
) -> None:
    """A peer that stops answering without closing the socket is noticed by the health check."""
    channel = unique()
    await backend.connect()
    try:
        await backend.subscribe(channel)
        freeze()
        try:
            await wait_until(lambda: not backend.is_up, 6)
            start = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await backend.publish(channel, "lost")
            assert time.monotonic() - start < 2.5
        finally:
            thaw()
        await wait_until(lambda: backend.is_up, 10)
        await backend.publish(channel, "back")
        assert await next_event(backend) == Event(channel, "back")
    finally:
        await backend.disconnect()


async def test_redis_notices_a_frozen_server(private_redis: PrivateRedis) -> None:
    private_redis.start()
    assert private_redis.proc is not None
    pid = private_redis.proc.pid
    await _notices_frozen_peer(
        RedisBackend(private_redis.url),
        lambda: os.kill(pid, signal.SIGSTOP),
        lambda: os.kill(pid, signal.SIGCONT),
    )


async def test_postgres_notices_a_frozen_connection(private_postgres: PrivatePostgres) -> None:
    await asyncio.to_thread(private_postgres.start)
    backend = PostgresBackend(private_postgres.url)
    pids: list[int] = []

    def freeze() -> None:
        assert backend._listen is not None
        pids.append(backend._listen.get_server_pid())  # only the listen connection's server process
        os.kill(pids[0], signal.SIGSTOP)

    def thaw() -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    await _notices_frozen_peer(backend, freeze, thaw)
