"""Per-channel history in the three broker backends (protocol §7.8), against real Redis and PostgreSQL.

Every test publishes through ``Broker.publish_targets`` and watches what a subscriber of the broker
channel receives, then asks the history what it kept. The Redis restart test runs a private
redis-server (see conftest.py), never the shared one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest

from fonana_ws.broker import Broker, BrokerUnavailable, PayloadTooLarge
from fonana_ws.broker.history import HistoryLimits, Target
from fonana_ws.broker.redis_backend import history_keys
from fonana_ws.protocol import envelope as env

from .conftest import PrivatePostgres, PrivateRedis

LIMITS = HistoryLimits(size=100, ttl=300)


def tag() -> str:
    return uuid.uuid4().hex[:12]


def target(key: str, n: int, channel: str | None = None) -> Target:
    envelope, event = env.encode_with_history({"type": "test", "n": n}, f"ev-{key}-{n}", key)
    return Target(channel=channel or key, envelope=envelope, key=key, event=event)


def plain(channel: str, n: int) -> Target:
    body = {"id": f"p{n}", "event": {"type": "t", "n": n}}
    return Target(channel=channel, envelope=orjson.dumps(body).decode())


async def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


class Watched:
    """A connected Broker and every message its subscribed channels received, in order."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.seen: list[tuple[str, str]] = []
        broker.listen(lambda channel, message: self.seen.append((channel, message)))

    def on(self, channel: str) -> list[str]:
        return [message for ch, message in self.seen if ch == channel]

    async def expect(self, channel: str, count: int, timeout: float = 10.0) -> list[str]:
        await wait_until(lambda: len(self.on(channel)) >= count, timeout, f"{count} messages on {channel}")
        await asyncio.sleep(0.05)  # and no more than that
        return self.on(channel)


Opener = Callable[[str], Awaitable[Watched]]


def url_of(request: pytest.FixtureRequest, kind: str) -> str:
    if kind == "memory":
        return "memory://"
    return request.getfixturevalue("redis_url" if kind == "redis" else "postgres_url")


@pytest.fixture
async def opened() -> AsyncIterator[Opener]:
    made: list[Broker] = []

    async def open_one(url: str) -> Watched:
        broker = Broker(url)
        await broker.connect()
        made.append(broker)
        return Watched(broker)

    yield open_one
    for broker in made:
        await broker.disconnect()


@pytest.fixture(params=["memory", "redis", "postgresql"])
async def watched(request: pytest.FixtureRequest, opened: Opener) -> Watched:
    return await opened(url_of(request, request.param))


def offset_of(message: str, key: str) -> int:
    event = env.decode(message).event
    assert event["channelKey"] == key
    return event["offset"]


async def test_offsets_count_up_and_since_gives_exactly_what_followed(watched: Watched) -> None:
    broker, key = watched.broker, f"post_{tag()}"
    await broker.subscribe(key)
    epoch, last = await broker.history_position(key, LIMITS)
    assert last == 0
    offsets = [(await broker.publish_targets([target(key, n)], LIMITS))[0] for n in range(1, 6)]
    offsets += await broker.publish_targets([target(key, n) for n in range(6, 9)], LIMITS)
    assert offsets == list(range(1, 9))

    received = await watched.expect(key, 8)
    assert [offset_of(m, key) for m in received] == list(range(1, 9))
    assert [env.decode(m).event["n"] for m in received] == list(range(1, 9))
    assert await broker.history_position(key, LIMITS) == (epoch, 8)

    replay = await broker.history_since(key, 3, epoch, LIMITS)
    assert (replay.epoch, replay.offset) == (epoch, 8)
    assert replay.events is not None and len(replay.events) == 5
    for text, message in zip(replay.events, received[3:], strict=True):
        # The stored text is the very event the subscriber got, byte for byte.
        assert message.endswith(text + "}")
        assert orjson.loads(text) == env.decode(message).event
    full = await broker.history_since(key, 0, epoch, LIMITS)
    assert full.events is not None and [orjson.loads(t)["offset"] for t in full.events] == list(range(1, 9))
    assert (await broker.history_since(key, 8, epoch, LIMITS)).events == []
    assert (await broker.history_since(key, 9, epoch, LIMITS)).events is None  # ahead of the last
    wrong = await broker.history_since(key, 3, "not-the-epoch", LIMITS)
    assert wrong.events is None and (wrong.epoch, wrong.offset) == (epoch, 8)


async def test_events_trimmed_by_size_cannot_be_replayed(watched: Watched) -> None:
    broker, key, limits = watched.broker, f"feed_{tag()}", HistoryLimits(size=5, ttl=300)
    await broker.publish_targets([target(key, n) for n in range(1, 11)], limits)
    epoch, last = await broker.history_position(key, limits)
    assert last == 10
    kept = await broker.history_since(key, 5, epoch, limits)
    assert kept.events is not None
    assert [orjson.loads(t)["n"] for t in kept.events] == [6, 7, 8, 9, 10]
    assert (await broker.history_since(key, 4, epoch, limits)).events is None  # 5 is gone
    assert (await broker.history_since(key, 0, epoch, limits)).events is None


async def test_a_key_idle_past_ttl_starts_again_under_a_new_epoch(watched: Watched) -> None:
    broker, key, limits = watched.broker, f"creator_{tag()}", HistoryLimits(size=100, ttl=1)
    assert await broker.publish_targets([target(key, 1), target(key, 2)], limits) == [1, 2]
    epoch, _ = await broker.history_position(key, limits)
    assert (await broker.history_since(key, 0, epoch, limits)).events is not None
    await asyncio.sleep(1.3)
    assert (await broker.history_since(key, 0, epoch, limits)).events is None
    assert await broker.publish_targets([target(key, 3)], limits) == [1]
    new_epoch, last = await broker.history_position(key, limits)
    assert new_epoch != epoch and last == 1


async def test_events_older_than_ttl_are_gone_even_on_a_busy_key(watched: Watched) -> None:
    broker, key, limits = watched.broker, f"conversation_{tag()}", HistoryLimits(size=100, ttl=1)
    await broker.publish_targets([target(key, 1)], limits)
    epoch, _ = await broker.history_position(key, limits)
    for n in range(2, 5):  # keeps the key alive, while event 1 ages past the ttl
        await asyncio.sleep(0.4)
        await broker.publish_targets([target(key, n)], limits)
    assert (await broker.history_position(key, limits)) == (epoch, 4)
    assert (await broker.history_since(key, 0, epoch, limits)).events is None
    recent = await broker.history_since(key, 3, epoch, limits)
    assert recent.events is not None and [orjson.loads(t)["n"] for t in recent.events] == [4]


async def test_targets_without_history_are_published_exactly_as_given(watched: Watched) -> None:
    broker, key, other = watched.broker, f"post_{tag()}", f"user_{tag()}"
    await broker.subscribe(key)
    await broker.subscribe(other)
    given = plain(other, 1)
    assert await broker.publish_targets([given, target(key, 1), plain(other, 2)], LIMITS) == [None, 1, None]
    off = HistoryLimits(size=0, ttl=300)
    with_key = target(key, 2)
    assert await broker.publish_targets([with_key], off) == [None]
    assert await watched.expect(other, 2) == [given.envelope, plain(other, 2).envelope]
    on_key = await watched.expect(key, 2)
    assert offset_of(on_key[0], key) == 1
    assert on_key[1] == with_key.envelope and "offset" not in env.decode(on_key[1]).event
    # History off leaves the key's history untouched.
    assert (await broker.history_position(key, LIMITS)).offset == 1


async def test_a_malformed_target_is_refused_before_anything_is_sent(watched: Watched) -> None:
    broker, key = watched.broker, f"post_{tag()}"
    await broker.subscribe(key)
    bad = Target(channel=key, envelope='{"event":{"type":"x"}', key=key, event='{"type":"x"')
    with pytest.raises(ValueError):
        await broker.publish_targets([target(key, 1), bad], LIMITS)
    await asyncio.sleep(0.2)
    assert watched.on(key) == []
    assert (await broker.history_position(key, LIMITS)).offset == 0


async def test_an_event_too_large_to_notify_inline_still_gets_its_offset(watched: Watched) -> None:
    # 20 kB: over PostgreSQL's NOTIFY limit, so that backend moves it through its payload table.
    broker, key = watched.broker, f"notifications_{tag()}"
    await broker.subscribe(key)
    envelope, event = env.encode_with_history({"type": "big", "text": "x" * 20_000}, "ev-big", key)
    assert await broker.publish_targets([Target(key, envelope, key, event), target(key, 2)], LIMITS) == [1, 2]
    received = await watched.expect(key, 2)
    assert [offset_of(m, key) for m in received] == [1, 2]
    assert env.decode(received[0]).event["text"] == "x" * 20_000
    epoch, _ = await broker.history_position(key, LIMITS)
    replay = await broker.history_since(key, 0, epoch, LIMITS)
    assert replay.events is not None and received[0].endswith(replay.events[0] + "}")


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
async def test_a_message_over_the_backends_limit_is_refused_before_anything_is_sent(
    request: pytest.FixtureRequest, kind: str
) -> None:
    from fonana_ws.broker.postgres_backend import PostgresBackend
    from fonana_ws.broker.redis_backend import RedisBackend

    url = url_of(request, kind)
    made = RedisBackend if kind == "redis" else PostgresBackend
    backend = made(url, max_payload=1000)
    broker = Broker(url, backend)
    await broker.connect()
    try:
        key = f"post_{tag()}"
        envelope, event = env.encode_with_history({"type": "big", "text": "x" * 2000}, "ev-big", key)
        with pytest.raises(PayloadTooLarge):
            await broker.publish_targets([target(key, 1), Target(key, envelope, key, event)], LIMITS)
        assert (await broker.history_position(key, LIMITS)).offset == 0
    finally:
        await broker.disconnect()


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
async def test_two_processes_publishing_to_one_key_never_reuse_or_skip_an_offset(
    request: pytest.FixtureRequest, opened: Opener, kind: str
) -> None:
    url = url_of(request, kind)
    subscriber, one, two = await opened(url), await opened(url), await opened(url)
    key = f"post_{tag()}"
    await subscriber.broker.subscribe(key)

    async def publish_200(publisher: Watched, start: int) -> list[int | None]:
        got: list[int | None] = []
        for n in range(start, start + 200):
            got += await publisher.broker.publish_targets([target(key, n)], LIMITS)
        return got

    firsts, seconds = await asyncio.gather(publish_200(one, 0), publish_200(two, 1000))
    assert sorted(firsts + seconds) == list(range(1, 401))  # type: ignore[type-var]
    received = await subscriber.expect(key, 400, timeout=30)
    assert [offset_of(m, key) for m in received] == list(range(1, 401))
    # Both publishers really interleaved, or the test proved nothing about concurrency.
    sources = [env.decode(m).event["n"] >= 1000 for m in received]
    assert sum(a != b for a, b in zip(sources, sources[1:], strict=False)) > 1


async def test_redis_restarted_empty_is_a_new_epoch(tmp_path: Path) -> None:
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(binary, tmp_path)
    server.start()
    broker = Broker(server.url)
    try:
        await broker.connect()
        key = f"post_{tag()}"
        assert await broker.publish_targets([target(key, 1), target(key, 2)], LIMITS) == [1, 2]
        epoch, _ = await broker.history_position(key, LIMITS)
        server.kill()
        await wait_until(lambda: not broker.is_up, 10, "the broker noticed the restart")
        server.start()
        await wait_until(lambda: broker.is_up, 15, "the broker reconnected")
        replay = await broker.history_since(key, 2, epoch, LIMITS)
        assert replay.events is None and replay.epoch != epoch and replay.offset == 0
        assert await broker.publish_targets([target(key, 3)], LIMITS) == [1]
        assert (await broker.history_position(key, LIMITS)) == (replay.epoch, 1)
    finally:
        await broker.disconnect()
        server.kill()


async def test_redis_keeps_history_under_its_own_names(redis_url: str) -> None:
    from redis import asyncio as aioredis

    broker = Broker(redis_url)
    await broker.connect()
    client = aioredis.Redis.from_url(redis_url)
    try:
        key = f"post_{tag()}"
        await broker.publish_targets([target(key, 1)], HistoryLimits(size=10, ttl=60))
        meta, stream = history_keys(key)
        assert meta.startswith("fonana-ws:history:") and stream.startswith("fonana-ws:history:")
        assert int(await client.hget(meta, "offset")) == 1
        assert [entry_id for entry_id, _ in await client.xrange(stream)] == [b"1-0"]
        for name in (meta, stream):  # bounded: both expire with the ttl
            assert 0 < await client.pttl(name) <= 60_000
    finally:
        await client.aclose()
        await broker.disconnect()


async def test_a_broker_that_is_down_refuses_at_once() -> None:
    broker = Broker("redis://127.0.0.1:1/0")
    broker.backend._op_timeout = 0.2  # type: ignore[attr-defined]
    await broker.connect()
    try:
        with pytest.raises(BrokerUnavailable):
            await broker.publish_targets([target(f"post_{tag()}", 1)], LIMITS)
        with pytest.raises(BrokerUnavailable):
            await broker.history_position(f"post_{tag()}", LIMITS)
    finally:
        await broker.disconnect()


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
async def test_a_new_server_process_continues_the_same_history(
    request: pytest.FixtureRequest, opened: Opener, kind: str
) -> None:
    url, key = url_of(request, kind), f"post_{tag()}"
    first = Broker(url)
    await first.connect()
    try:
        assert await first.publish_targets([target(key, 1), target(key, 2)], LIMITS) == [1, 2]
        epoch, _ = await first.history_position(key, LIMITS)
    finally:
        await first.disconnect()
    later = await opened(url)  # as a restarted process would: nothing shared but the backend
    replay = await later.broker.history_since(key, 1, epoch, LIMITS)
    assert replay.epoch == epoch and replay.events is not None and len(replay.events) == 1
    assert await later.broker.publish_targets([target(key, 3)], LIMITS) == [3]


async def test_postgresql_keeps_the_epoch_over_a_clean_restart_not_over_a_crash(
    private_postgres: PrivatePostgres,
) -> None:
    # The history tables are UNLOGGED: a crash empties them (a new epoch), a clean shutdown does not.
    broker = Broker(private_postgres.url)
    await broker.connect()
    try:
        key = f"post_{tag()}"
        assert await broker.publish_targets([target(key, 1), target(key, 2)], LIMITS) == [1, 2]
        epoch, _ = await broker.history_position(key, LIMITS)
        data = str(private_postgres.datadir)
        private_postgres._run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        await wait_until(lambda: not broker.is_up, 10, "the broker noticed the shutdown")
        private_postgres.start()
        await wait_until(lambda: broker.is_up, 20, "the broker reconnected")
        kept = await broker.history_since(key, 0, epoch, LIMITS)
        assert kept.epoch == epoch and kept.events is not None and len(kept.events) == 2

        private_postgres.stop()  # -m immediate: a crash, recovered at the next start
        await wait_until(lambda: not broker.is_up, 10, "the broker noticed the crash")
        private_postgres.start()
        await wait_until(lambda: broker.is_up, 20, "the broker reconnected")
        lost = await broker.history_since(key, 2, epoch, LIMITS)
        assert lost.events is None and lost.epoch != epoch and lost.offset == 0
        assert await broker.publish_targets([target(key, 3)], LIMITS) == [1]
    finally:
        await broker.disconnect()
        private_postgres.start()


async def test_postgresql_drops_keys_idle_past_their_ttl(postgres_url: str) -> None:
    import asyncpg

    from fonana_ws.broker.postgres_backend import PostgresBackend, plain_dsn

    broker = Broker(postgres_url)
    await broker.connect()
    conn = await asyncpg.connect(plain_dsn(postgres_url))
    try:
        key = f"post_{tag()}"
        await broker.publish_targets([target(key, 1), target(key, 2)], HistoryLimits(size=10, ttl=0.5))
        count = "SELECT count(*) FROM fonana_ws.history_events WHERE key = $1"
        assert await conn.fetchval(count, key) == 2
        await asyncio.sleep(0.8)
        backend = broker.backend
        assert isinstance(backend, PostgresBackend)
        await backend._delete_old_payloads()  # what the backend's watcher runs every minute
        assert await conn.fetchval(count, key) == 0
        assert await conn.fetchval("SELECT count(*) FROM fonana_ws.history_keys WHERE key = $1", key) == 0
    finally:
        await conn.close()
        await broker.disconnect()
