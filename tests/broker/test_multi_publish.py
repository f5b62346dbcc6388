"""One event to many targets: one broker round trip, delivered to every target once, or to none.

Real Redis and PostgreSQL. Failures mid-way come from a TCP proxy of our own between the publisher
and the broker (cutting or hanging the connection once a batch is partly through), so the shared
brokers are never stopped and the subscribers, connected directly, see exactly what was delivered.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from redis import asyncio as aioredis

from fonana_ws.broker import Broker, BrokerUnavailable, PayloadTooLarge, postgres_backend
from fonana_ws.broker.postgres_backend import PostgresBackend, channel_ident, plain_dsn
from fonana_ws.broker.redis_backend import RedisBackend
from fonana_ws.db import demo
from fonana_ws.fonana.publisher import Publisher
from fonana_ws.protocol import envelope as env

from ..conftest import API_KEY, Client, make_settings, running
from .conftest import free_port, service_missing, wait_for_port

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def tag() -> str:
    return uuid.uuid4().hex[:12]


def with_netloc(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo + '@' if userinfo else ''}{host}:{port}"))


def with_query(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


async def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


# --- a proxy that fails a batch half-way ------------------------------------------------------------


class Proxy:
    """A TCP proxy to ``host:port``, passing everything until ``trip(budget)``.

    After ``trip``, at most ``budget`` more bytes go from the clients to the server, all connections
    together. The connection that goes over forwards only what fits (the server holds part of a
    command), then is cut both ways, or with ``stall`` hangs, forwarding nothing more, until ``reset()``
    closes it. Any connection that sends after that fares the same.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.budget: int | None = None
        self.stall = False
        self.partial: list[int] = []  # per tripped connection: its bytes forwarded since trip()
        self._released = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        self._released.set()
        for writer in list(self._writers):
            writer.close()

    def url(self, url: str) -> str:
        return with_netloc(url, "127.0.0.1", self.listen_port)

    def trip(self, budget: int, *, stall: bool = False) -> None:
        self.budget, self.stall, self.partial = budget, stall, []
        self._released = asyncio.Event()

    def reset(self) -> None:
        """Pass everything again; a hung connection is closed, never resumed."""
        self.budget = None
        self._released.set()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(self.host, self.port)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, server_w}
        down = asyncio.create_task(self._pipe(server_r, client_w))
        try:
            await self._up(client_r, server_w)
        except OSError:
            pass
        finally:
            down.cancel()
            for writer in (client_w, server_w):
                writer.close()
                self._writers.discard(writer)

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent_since_trip = 0
        while data := await reader.read(65536):
            if self.budget is not None:
                fits = data[: max(self.budget, 0)]
                self.budget -= len(data)
                if len(fits) < len(data):
                    writer.write(fits)
                    await writer.drain()
                    self.partial.append(sent_since_trip + len(fits))
                    if self.stall:
                        await self._released.wait()
                    return
                sent_since_trip += len(data)
            writer.write(data)
            await writer.drain()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass


# --- subscribers that see every channel cheaply ------------------------------------------------------


class RedisWatch:
    """Every message on the broker channels matching ``pattern``, from a PSUBSCRIBE of its own."""

    def __init__(self, url: str, pattern: str) -> None:
        self.url, self.pattern = url, pattern
        self.messages: list[tuple[str, str]] = []

    async def __aenter__(self) -> RedisWatch:
        self.client = aioredis.Redis.from_url(self.url, protocol=2)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await self.pubsub.psubscribe(self.pattern)
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            message = await self.pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "pmessage":
                self.messages.append((message["channel"].decode(), message["data"].decode()))

    async def __aexit__(self, *exc: object) -> None:
        self.reader.cancel()
        await self.pubsub.aclose()
        await self.client.aclose()


class _EveryNotification(asyncpg.Connection):  # type: ignore[misc]
    """A connection that hands every notification to ``on_note``, listener or not."""

    __slots__ = ("on_note",)

    def _process_notification(self, pid: int, channel: str, payload: str) -> None:
        self.on_note(pid, channel, payload)


class PgWatch:
    """Every notification on the LISTEN identifiers ``idents``, on a connection of its own.

    asyncpg's ``add_listener`` costs a round trip per channel (5 s for 10,000): this LISTENs to them all
    in one query and takes the notifications where asyncpg would look up the listeners.
    """

    def __init__(self, url: str, idents: list[str]) -> None:
        self.url, self.idents = url, idents
        self.notes: list[tuple[int, str, str]] = []  # (sending server pid, ident, payload)

    async def __aenter__(self) -> PgWatch:
        self.conn = await asyncpg.connect(plain_dsn(self.url), connection_class=_EveryNotification)
        self.conn.on_note = lambda pid, ident, payload: self.notes.append((pid, ident, payload))
        await self.conn.execute(";".join(f'LISTEN "{ident}"' for ident in self.idents))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()


# --- (a) 10,000 targets, each once -------------------------------------------------------------------

TARGETS = 10_000
EVENT = {"type": "post_created", "creatorId": "c", "post": {"id": "p", "title": "t" * 200}}


def feed_keys(prefix: str, count: int) -> list[str]:
    return [f"feed_{prefix}-{i}" for i in range(count)]


async def test_10000_targets_through_redis_arrive_once_on_a_small_pool(redis_url: str) -> None:
    prefix = tag()
    keys = feed_keys(prefix, TARGETS)
    sample = keys[::20]
    # 4 pooled connections: one connection per target (the old publish) fails with MaxConnectionsError.
    broker = Broker(with_query(redis_url, "max_connections=4"))
    subscriber = RedisBackend(redis_url)
    await broker.connect()
    await subscriber.connect()
    try:
        await asyncio.gather(*(subscriber.subscribe(env.key_channel(k)) for k in sample))
        async with RedisWatch(redis_url, env.key_channel(f"feed_{prefix}-*")) as watch:
            event_id = await Publisher(broker).publish(EVENT, channels=keys)
            await wait_until(lambda: len(watch.messages) >= TARGETS, 10, "every target received it")
            got = [await asyncio.wait_for(subscriber.next_published(), 3) for _ in sample]
            await asyncio.sleep(0.2)  # time for duplicates to show
        assert Counter(channel for channel, _ in watch.messages) == {env.key_channel(k): 1 for k in keys}
        assert sorted(e.channel for e in got) == sorted(env.key_channel(k) for k in sample)
        for event in got:
            envelope = env.decode(event.message)
            assert (envelope.id, envelope.multi, envelope.event) == (event_id, True, EVENT)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(subscriber.next_published(), 0.1)
    finally:
        await subscriber.disconnect()
        await broker.disconnect()


async def test_10000_targets_through_postgres_arrive_once_in_one_transaction(postgres_url: str) -> None:
    prefix = tag()
    keys = feed_keys(prefix, TARGETS)
    sample = keys[::20]
    broker = Broker(postgres_url)
    subscriber = PostgresBackend(postgres_url)
    await broker.connect()
    await subscriber.connect()
    try:
        for key in sample:
            await subscriber.subscribe(env.key_channel(key))
        idents = [channel_ident(env.key_channel(k)) for k in keys]
        async with PgWatch(postgres_url, idents) as watch:
            event_id = await Publisher(broker).publish(EVENT, channels=keys)
            await wait_until(lambda: len(watch.notes) >= TARGETS, 10, "every target received it")
            got = [await asyncio.wait_for(subscriber.next_published(), 3) for _ in sample]
            await asyncio.sleep(0.2)
        assert Counter(ident for _, ident, _ in watch.notes) == dict.fromkeys(idents, 1)
        # One sending session: the notifications of one transaction (the old publish used the whole pool).
        assert len({pid for pid, _, _ in watch.notes}) == 1
        assert [ident for _, ident, _ in watch.notes] == idents  # in order, too
        assert sorted(e.channel for e in got) == sorted(env.key_channel(k) for k in sample)
        for event in got:
            envelope = env.decode(event.message)
            assert (envelope.id, envelope.multi, envelope.event) == (event_id, True, EVENT)
    finally:
        await subscriber.disconnect()
        await broker.disconnect()


async def test_memory_broker_publishes_every_item() -> None:
    broker = Broker("memory://")
    got: list[tuple[str, str]] = []
    broker.listen(lambda channel, message: got.append((channel, message)))
    await broker.connect()
    try:
        channels = [f"fonana-ws:feed_{i}" for i in range(100)]
        for channel in channels:
            await broker.subscribe(channel)
        await broker.publish_many([(c, f"m-{c}") for c in channels])
        await wait_until(lambda: len(got) >= 100, 3, "all delivered")
        assert got == [(c, f"m-{c}") for c in channels]
    finally:
        await broker.disconnect()


# --- (b) all or nothing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stall", "script"), [(False, True), (True, True), (False, False)], ids=["cut", "stall", "cut-multi-exec"]
)
async def test_redis_batch_cut_half_way_delivers_nothing(redis_url: str, stall: bool, script: bool) -> None:
    prefix = tag()
    keys = feed_keys(prefix, 2_000)
    host, port = urlsplit(redis_url).hostname or "127.0.0.1", urlsplit(redis_url).port or 6379
    async with (
        Proxy(host, port) as proxy,
        RedisWatch(redis_url, env.key_channel(f"feed_{prefix}-*")) as watch,
    ):
        url = proxy.url(redis_url)
        backend = RedisBackend(url, op_timeout=0.5)
        backend._scripting = script  # False: the MULTI/EXEC of a Redis that refuses EVAL
        broker = Broker(url, backend=backend)
        await broker.connect()
        try:
            publisher = Publisher(broker)
            proxy.trip(64 * 1024, stall=stall)  # the batch is ~0.8 MB
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await publisher.publish(EVENT, channels=keys, event_id="retry-me")
            assert time.monotonic() - started < 1.5
            assert max(proxy.partial, default=0) > 0, "the broker got part of the batch"
            await asyncio.sleep(0.3)
            proxy.reset()
            await asyncio.sleep(0.3)
            assert watch.messages == []

            # Back: the same publish again (same id) reaches every target, once.
            await wait_until(lambda: broker.is_up, 10, "broker up again")
            await publisher.publish(EVENT, channels=keys, event_id="retry-me")
            await wait_until(lambda: len(watch.messages) >= len(keys), 5, "every target received it")
            await asyncio.sleep(0.2)
            assert Counter(c for c, _ in watch.messages) == {env.key_channel(k): 1 for k in keys}
        finally:
            await broker.disconnect()


@pytest.fixture
def redis_without_eval(tmp_path: Path) -> Iterator[str]:
    """A private redis-server whose default user may not run EVAL/EVALSHA (a pub/sub-only ACL)."""
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("redis-server is not installed; needed for the EVAL-refused test")
    port = free_port()
    # fmt: off
    args = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(tmp_path), "--user", "default", "on", "nopass", "~*", "&*", "+@all", "-eval", "-evalsha",
    ]
    # fmt: on
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_redis_refusing_eval_gets_one_multi_exec(
    redis_without_eval: str, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = tag()
    keys = feed_keys(prefix, 2_000)
    broker = Broker(redis_without_eval)
    await broker.connect()
    try:
        async with RedisWatch(redis_without_eval, env.key_channel(f"feed_{prefix}-*")) as watch:
            publisher = Publisher(broker)
            for _ in range(2):
                await publisher.publish(EVENT, channels=keys)
            await wait_until(lambda: len(watch.messages) >= 2 * len(keys), 5, "every target received both")
            await asyncio.sleep(0.2)
        assert Counter(c for c, _ in watch.messages) == {env.key_channel(k): 2 for k in keys}
        refused = [r for r in caplog.records if "refused EVAL" in r.getMessage()]
        assert len(refused) == 1 and "no permissions" in refused[0].getMessage()
    finally:
        await broker.disconnect()


def spill_items(prefix: str, count: int) -> list[tuple[str, str]]:
    """Broker items, every 10th too large to NOTIFY (stored in the payload table instead)."""
    return [
        (f"fonana-ws:spill-{prefix}-{i}", f"{i}:" + ("L" * 9_000 if i % 10 == 0 else "s" * 150))
        for i in range(count)
    ]


@pytest.mark.parametrize(
    ("stall", "chunk"), [(False, False), (True, False), (False, True)], ids=["cut", "stall", "cut-chunked"]
)
async def test_postgres_batch_cut_half_way_delivers_nothing(
    postgres_url: str, stall: bool, chunk: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk:  # many statements in one explicit transaction, the first ones run before the cut
        monkeypatch.setattr(postgres_backend, "_BATCH_BYTES", 100_000)
    items = spill_items(tag(), 2_000)  # ~2.2 MB
    channels = [c for c, _ in items]
    idents = [channel_ident(c) for c in channels]
    parts = urlsplit(postgres_url)
    admin = await asyncpg.connect(plain_dsn(postgres_url))

    async def stored_rows() -> int:
        return await admin.fetchval(
            "SELECT count(*) FROM fonana_ws.broker_payloads WHERE channel = ANY($1::text[])", channels
        )

    async with Proxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        url = proxy.url(postgres_url)
        broker = Broker(url, backend=PostgresBackend(url, op_timeout=0.5))
        await broker.connect()
        subscriber = PostgresBackend(postgres_url)
        await subscriber.connect()
        try:
            assert broker.is_up
            sample = channels[:30]  # inline and stored messages
            for channel in sample:
                await subscriber.subscribe(channel)
            async with PgWatch(postgres_url, idents) as watch:
                proxy.trip(256 * 1024, stall=stall)
                started = time.monotonic()
                with pytest.raises(BrokerUnavailable):
                    await broker.publish_many(items)
                assert time.monotonic() - started < 1.5
                assert max(proxy.partial, default=0) > 0, "the broker got part of the batch"
                await asyncio.sleep(0.3)
                proxy.reset()
                await asyncio.sleep(0.3)
                assert watch.notes == []
                assert await stored_rows() == 0

                await wait_until(lambda: broker.is_up, 10, "broker up again")
                await broker.publish_many(items)
                await wait_until(lambda: len(watch.notes) >= len(items), 5, "every target received it")
                got = [await asyncio.wait_for(subscriber.next_published(), 3) for _ in sample]
                await asyncio.sleep(0.2)
            assert [ident for _, ident, _ in watch.notes] == idents
            assert len({pid for pid, _, _ in watch.notes}) == 1
            assert await stored_rows() == 200
            assert [(e.channel, e.message) for e in got] == items[:30]
        finally:
            await subscriber.disconnect()
            await broker.disconnect()
            await admin.close()


# --- (c) the HTTP route, over Redis ------------------------------------------------------------------


async def test_post_created_reaches_150_paid_subscribers_over_redis(redis_url: str, tmp_path: Path) -> None:
    # 8 pooled publish connections: fewer than the targets, as in the defect (redis-py's default is 100).
    settings = make_settings(tmp_path, None, BROADCAST_URL=with_query(redis_url, "max_connections=8"))
    async with running(settings) as server:
        creator = await server.user("c", creator=True)
        post_id = await server.post(creator)
        async with server.db.transaction():  # one commit for the 300 rows, not 300
            fans = [await server.user("fan") for _ in range(150)]
            for fan in fans:
                await demo.insert_subscription(server.db, uuid.uuid4().hex, fan, creator)
        bystander = await server.user()

        async def feed_of(user: str) -> Client:
            client = await server.connect(user)
            reply = await client.subscribe({"type": "feed", "userId": user})
            assert reply["type"] == "subscribed", reply
            return client

        feeds = await asyncio.gather(*(feed_of(fan) for fan in fans))
        other = await feed_of(bystander)
        response = await server.http.post("/api/events/post-created", json={"post": post_id}, headers=HEADERS)
        assert response.status_code == 202, response.text
        answer = response.json()
        assert len(answer["channels"]) == 151
        frames = await asyncio.gather(*(client.recv() for client in feeds))
        assert all(frame == answer["event"] for frame in frames)
        assert answer["event"]["type"] == "post_created" and answer["event"]["post"]["id"] == post_id
        await asyncio.gather(*(client.nothing(0.3) for client in [*feeds, other]))
        assert server.services.stats.publish_failures == 0


# --- (d) too large -----------------------------------------------------------------------------------


async def test_event_over_max_event_size_is_413_and_sent_nowhere(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, None, WS_MAX_EVENT_SIZE="1024")) as server:
        creator = await server.user("c", creator=True)
        fan = await server.user("fan")
        await demo.insert_subscription(server.db, uuid.uuid4().hex, fan, creator)
        post_id = await server.post(creator)
        follower = await server.connect(await server.user())
        assert (await follower.subscribe({"type": "creator", "id": creator}))["type"] == "subscribed"
        feed = await server.connect(fan)
        assert (await feed.subscribe({"type": "feed", "userId": fan}))["type"] == "subscribed"
        failures = server.services.stats.publish_failures

        # A body within the limit whose envelope (id, channel) is over it.
        body: dict[str, Any] = {
            "channel": f"creator_{creator}",
            "event": {"type": "creator_updated", "pad": ""},
        }
        body["event"]["pad"] = "x" * (1000 - len(orjson.dumps(body)))
        content = orjson.dumps(body)
        assert len(content) <= 1000
        response = await server.http.post("/api/publish", content=content, headers=HEADERS)
        assert response.status_code == 413, response.text
        assert "1024" in response.json()["error"]

        # A small request for a post whose stored title makes the event too large, to 2 targets.
        await server.db.execute(
            "UPDATE posts SET title = :t WHERE id = :id", {"t": "T" * 2000, "id": post_id}
        )
        response = await server.http.post("/api/events/post-created", json={"post": post_id}, headers=HEADERS)
        assert response.status_code == 413, response.text
        await asyncio.gather(follower.nothing(0.3), feed.nothing(0.3))
        assert server.services.stats.publish_failures == failures + 2

        # Within the limit, the same event goes through.
        response = await server.http.post(
            "/api/events/post-created", json={"post": {"id": post_id, "title": "short"}}, headers=HEADERS
        )
        assert response.status_code == 202, response.text
        assert (await follower.recv())["post"]["title"] == "short"
        assert (await feed.recv())["post"]["title"] == "short"


async def test_publisher_measures_encoded_bytes_and_sends_nothing_too_large() -> None:
    assert Publisher(Broker("memory://")).max_event_size == 1 << 20
    broker = Broker("memory://")
    got: list[tuple[str, str]] = []
    broker.listen(lambda channel, message: got.append((channel, message)))
    await broker.connect()
    try:
        keys = ["feed_a", "feed_b", "creator_c"]
        for key in keys:
            await broker.subscribe(env.key_channel(key))
        publisher = Publisher(broker, max_event_size=1500)
        fits = {"type": "x", "pad": "é" * 680}  # 680 characters, 1360 bytes, about 1440 in the envelope
        await publisher.publish(fits, channels=keys)
        await wait_until(lambda: len(got) == 3, 3, "delivered")
        too_large = {"type": "x", "pad": "é" * 740}  # fewer characters than the limit, more bytes
        with pytest.raises(PayloadTooLarge, match="1500 byte limit"):
            await publisher.publish(too_large, channels=keys)
        await asyncio.sleep(0.1)
        assert len(got) == 3
        assert (publisher.stats.events_published, publisher.stats.publish_failures) == (1, 1)
    finally:
        await broker.disconnect()
