"""The per-user connection count (``user_connections``) on memory, and on the real Redis and PostgreSQL.

Two instances in one test stand for two server processes: each has its own process id. A process that
dies is a real child process killed with SIGKILL, so nothing of ours runs after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fonana_ws.config import Settings
from fonana_ws.fonana.user_connections import (
    MemoryUserConnections,
    PostgresUserConnections,
    RedisUserConnections,
    SharedUserConnections,
    UserConnections,
    for_settings,
)

from .conftest import REDIS_URL, free_port, fresh_pg_database, need_service, redis_reachable

TTL = 2.0  # seconds: short, so that a dead process's entries expire within a test


class Backend:
    """Makes started instances of one kind (one per simulated process) and cleans up after the test."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.prefix = f"fonana-ws-test:{uuid.uuid4().hex[:8]}:conns"
        self.instances: list[UserConnections] = []

    @property
    def shared(self) -> bool:
        return self.kind != "memory"

    def new(self, limit: int = 32, ttl: float = TTL, **options: Any) -> UserConnections:
        if self.kind == "redis":
            uc: UserConnections = RedisUserConnections(
                self.url, limit, ttl=ttl, key_prefix=self.prefix, **options
            )
        elif self.kind == "postgresql":
            uc = PostgresUserConnections(self.url, limit, ttl=ttl, **options)
        else:
            uc = MemoryUserConnections(limit, grace=options.get("grace", 0.0))
        self.instances.append(uc)
        return uc

    async def make(self, limit: int = 32, ttl: float = TTL, **options: Any) -> UserConnections:
        uc = self.new(limit, ttl, **options)
        await uc.start()
        if isinstance(uc, SharedUserConnections):
            assert uc.is_up, f"{self.kind} is up but the instance says it is not"
        return uc

    async def close(self) -> None:
        for uc in self.instances:
            await uc.stop()
        if self.kind == "redis":
            import redis.asyncio as aioredis

            client = aioredis.from_url(self.url)
            async for key in client.scan_iter(match=self.prefix + ":*"):
                await client.delete(key)
            await client.aclose()


class LazyPgDatabase:
    """One fresh PostgreSQL database for this module, made when a test first asks for it."""

    def __init__(self) -> None:
        self._db: fresh_pg_database | None = None
        self._url = ""

    async def url(self) -> str:
        if self._db is None:
            db = fresh_pg_database()
            self._url = await db.__aenter__()
            self._db = db
        return self._url

    async def drop(self) -> None:
        if self._db is not None:
            await self._db.__aexit__(None, None, None)


@pytest.fixture(scope="module")
async def pg_database() -> AsyncIterator[LazyPgDatabase]:
    db = LazyPgDatabase()
    yield db
    await db.drop()


async def _backend(kind: str, pg_database: LazyPgDatabase) -> Backend:
    if kind == "redis":
        if (why := await redis_reachable()) is not None:
            need_service("Redis", why)
        return Backend(kind, REDIS_URL)
    if kind == "postgresql":
        return Backend(kind, await pg_database.url())
    return Backend(kind, "memory://")


@pytest.fixture(params=["memory", "redis", "postgresql"])
async def backend(request: pytest.FixtureRequest, pg_database: LazyPgDatabase) -> AsyncIterator[Backend]:
    b = await _backend(request.param, pg_database)
    yield b
    await b.close()


@pytest.fixture(params=["redis", "postgresql"])
async def shared(request: pytest.FixtureRequest, pg_database: LazyPgDatabase) -> AsyncIterator[Backend]:
    """Only the backends that several processes share."""
    b = await _backend(request.param, pg_database)
    yield b
    await b.close()


def user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


async def test_limit_is_enforced(backend: Backend) -> None:
    uc = await backend.make(limit=3)
    alice, bob = user(), user()
    assert [await uc.acquire(alice, f"c{i}") for i in range(5)] == [True, True, True, False, False]
    assert await uc.count(alice) == 3
    assert await uc.acquire(alice, "c0"), "a connection already held is no new one"
    assert await uc.count(alice) == 3
    assert await uc.acquire(bob, "c9"), "the limit is per user"
    assert await uc.count(bob) == 1


async def test_release_frees_a_slot(backend: Backend) -> None:
    uc = await backend.make(limit=1)
    alice = user()
    assert await uc.acquire(alice, "a")
    assert not await uc.acquire(alice, "b")
    await uc.release(alice, "b")  # refused: releasing it is a no-op and must not free "a"'s slot
    assert await uc.count(alice) == 1
    await uc.release(alice, "a")
    assert await uc.count(alice) == 0
    assert await uc.acquire(alice, "b")
    await uc.release(alice, "never-acquired")
    await uc.release(user(), "x")


async def test_admit_and_release_say_when_a_user_comes_online_and_goes(backend: Backend) -> None:
    """Online status (protocol §7.3) from the same count: 0 -> 1 anywhere is "came online", the last
    release anywhere is "went", and a return within the grace is no change."""
    a = await backend.make(grace=60.0)
    b = await backend.make(grace=60.0) if backend.shared else a
    alice, bob = user(), user()
    assert await a.admit(alice, "1") == (True, True)
    assert await b.admit(alice, "2") == (True, False), "a second tab, on another process where shared"
    assert not await a.release(alice, "1")
    _, found = await a.lookup([alice, bob])
    assert found[alice] == (1, None) and found[bob] == (0, None)
    assert await b.release(alice, "2"), "the last connection anywhere went"
    assert not await b.release(alice, "2")
    now, found = await a.lookup([alice])
    count, seen = found[alice]
    assert count == 0 and seen is not None and 0 <= now - seen < 5, found
    assert await a.admit(alice, "3") == (True, False), "back within the grace"
    quick = await backend.make(grace=0.0)
    assert await quick.admit(bob, "1") == (True, True)
    assert await quick.release(bob, "1")
    assert await quick.admit(bob, "1") == (True, True), "back after the grace: came online again"


async def test_a_dead_process_s_users_are_swept_by_exactly_one_survivor(shared: Backend) -> None:
    """Two survivors sweep the entries of a dead one at the same time: each user whose last entries
    expired is reported once in all (and gets a lastSeen); a user still live elsewhere is not reported."""
    dead = shared.new(ttl=1.0)
    survivors = [shared.new(ttl=30.0), shared.new(ttl=30.0)]
    alice, bob = user(), user()
    assert await dead.acquire(alice, "1") and await dead.acquire(alice, "2")
    assert await dead.acquire(bob, "1")
    assert await survivors[0].acquire(bob, "live")
    assert isinstance(dead, SharedUserConnections)
    dead._mine.clear()  # it dies: nothing refreshes or releases its entries any more
    await asyncio.sleep(1.2)
    reported: list[str] = []
    for _ in range(5):
        for gone in await asyncio.gather(*(s.sweep() for s in survivors)):  # type: ignore[attr-defined]
            reported += [u for u in gone if u in (alice, bob)]
        await asyncio.sleep(0.05)
    assert reported == [alice], reported
    _, found = await survivors[1].lookup([alice, bob])
    assert found[alice][0] == 0 and found[alice][1] is not None
    assert found[bob] == (1, None)


async def test_concurrent_acquires_admit_exactly_the_limit(backend: Backend) -> None:
    """50 connects at once (split over two processes where the backend is shared), limit 32."""
    instances = [await backend.make(limit=32)]
    if backend.shared:
        instances.append(await backend.make(limit=32))
    alice = user()
    results = await asyncio.gather(
        *(instances[i % len(instances)].acquire(alice, f"c{i}") for i in range(50))
    )
    assert results.count(True) == 32
    assert await instances[0].count(alice) == 32
    for uc in instances:
        if isinstance(uc, SharedUserConnections):
            assert uc.is_up, "no acquire may have been admitted fail-open"


async def test_two_processes_share_the_count(shared: Backend) -> None:
    a, b = await shared.make(limit=4), await shared.make(limit=4)
    alice = user()
    assert await a.acquire(alice, "1") and await a.acquire(alice, "2")
    assert await b.acquire(alice, "1"), "the same conn id in another process is another connection"
    assert await b.acquire(alice, "2")
    assert not await a.acquire(alice, "3")
    assert not await b.acquire(alice, "3")
    assert await a.count(alice) == await b.count(alice) == 4
    await a.release(alice, "1")
    assert await b.acquire(alice, "3")
    assert not await a.acquire(alice, "4")


async def test_stop_releases_everything_the_process_holds(shared: Backend) -> None:
    a, b = await shared.make(), await shared.make()
    alice, bob = user(), user()
    for i in range(3):
        assert await a.acquire(alice, f"c{i}")
    assert await a.acquire(bob, "c0")
    assert await b.acquire(alice, "c0")
    await a.stop()
    assert await b.count(alice) == 1
    assert await b.count(bob) == 0


async def test_a_release_during_a_refresh_is_not_written_back(shared: Backend) -> None:
    """The refresh took its list before the release and writes after it: the release must still win."""
    uc = shared.new(ttl=3.0)
    assert isinstance(uc, SharedUserConnections)
    refresh, in_flight = uc._refresh, asyncio.Event()

    async def slow_refresh(members: list[tuple[str, str]]) -> None:
        if members:
            in_flight.set()
            await asyncio.sleep(0.3)
        await refresh(members)

    uc._refresh = slow_refresh  # type: ignore[method-assign]
    await uc.start()
    alice = user()
    assert await uc.acquire(alice, "a")
    await asyncio.wait_for(in_flight.wait(), 5)
    await uc.release(alice, "a")
    assert await uc.count(alice) == 0
    await asyncio.sleep(0.6)  # the refresh has written "a" back, then released it again
    assert await uc.count(alice) == 0


_CHILD = """
import asyncio, sys
from fonana_ws.fonana.user_connections import PostgresUserConnections, RedisUserConnections

async def main():
    kind, url, prefix, user, n, ttl = sys.argv[1:]
    if kind == "redis":
        uc = RedisUserConnections(url, 32, ttl=float(ttl), key_prefix=prefix)
    else:
        uc = PostgresUserConnections(url, 32, ttl=float(ttl))
    await uc.start()
    for i in range(int(n)):
        assert await uc.acquire(user, f"c{i}")
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_dead_process_stops_counting_after_ttl_a_live_one_keeps_counting(shared: Backend) -> None:
    alice = user()
    live = await shared.make(limit=32, ttl=TTL)
    for i in range(4):
        assert await live.acquire(alice, f"c{i}")
    live_since = time.monotonic()

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        shared.kind,
        shared.url,
        shared.prefix,
        alice,
        "5",
        str(TTL),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 20)
        assert line.strip() == b"ready", line
        assert await live.count(alice) == 9
        await asyncio.sleep(TTL)  # the child refreshes its entries while it lives
        assert await live.count(alice) == 9
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    killed = time.monotonic()
    assert await live.count(alice) == 9, "a dead process counts until its entries expire"

    # Its last refresh was at most TTL/3 before the kill: TTL after the kill, all is gone.
    while await live.count(alice) != 4:
        assert time.monotonic() - killed < TTL + 1.0, "the dead process's entries did not expire"
        await asyncio.sleep(0.1)
    assert time.monotonic() - killed > TTL / 2, "entries expired too soon"
    # Wait (rather than assume the steps above took long enough) until the live entries are 2 TTLs old.
    await asyncio.sleep(max(TTL / 2, live_since + 2 * TTL - time.monotonic()))
    assert await live.count(alice) == 4, "the live process's entries are kept alive past TTL"
    assert all([await live.acquire(alice, f"n{i}") for i in range(28)])
    assert not await live.acquire(alice, "one-too-many")


class HungServer:
    """A TCP server that accepts and then never answers: a broker that hangs."""

    async def __aenter__(self) -> int:
        self.writers: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            with contextlib.suppress(Exception):
                await reader.read()

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
@pytest.mark.parametrize("failure", ["refused", "hung"])
async def test_an_unreachable_backend_admits_fast_and_warns_once(
    kind: str, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fonana_ws.limits")
    async with contextlib.AsyncExitStack() as stack:
        port = await stack.enter_async_context(HungServer()) if failure == "hung" else free_port()
        url = f"redis://127.0.0.1:{port}/0" if kind == "redis" else f"postgresql://u@127.0.0.1:{port}/db"
        uc = (
            RedisUserConnections(url, 1, ttl=TTL, op_timeout=0.3)
            if kind == "redis"
            else PostgresUserConnections(url, 1, ttl=TTL, op_timeout=0.3)
        )
        started = time.monotonic()
        await uc.start()
        assert time.monotonic() - started < 1.0, "start must not wait for a dead backend"
        assert not uc.is_up
        alice = user()
        for i in range(5):
            began = time.monotonic()
            assert await uc.acquire(alice, f"c{i}"), "fail-open: admitted although over the limit"
            assert time.monotonic() - began < 0.6
        await uc.release(alice, "c0")
        with pytest.raises(Exception):  # noqa: B017 - whichever error the client raises
            await uc.count(alice)
        began = time.monotonic()
        await uc.stop()
        assert time.monotonic() - began < 1.5
    warnings = [r for r in caplog.records if "not enforced" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


class PrivateRedis:
    """A redis-server of this test's own, without persistence, that the test may kill and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self.proc = await asyncio.create_subprocess_exec(
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            stdout=asyncio.subprocess.DEVNULL,
        )
        client = aioredis.from_url(self.url, socket_connect_timeout=0.2)
        try:
            for _ in range(100):
                with contextlib.suppress(Exception):
                    await client.ping()
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("private redis-server did not start")
        finally:
            await client.aclose()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server binary")
async def test_redis_outage_admits_then_writes_the_admitted_back() -> None:
    server = PrivateRedis()
    await server.start()
    uc = RedisUserConnections(server.url, 2, ttl=TTL, op_timeout=0.3)
    try:
        await uc.start()
        alice = user()
        assert await uc.acquire(alice, "c1") and await uc.acquire(alice, "c2")
        assert not await uc.acquire(alice, "c3")
        await server.kill()  # and everything it held is lost
        assert await uc.acquire(alice, "c3"), "fail-open while Redis is down"
        assert not uc.is_up
        await server.start()
        deadline = time.monotonic() + 5
        while not uc.is_up:
            assert time.monotonic() < deadline, "did not notice Redis is back"
            await asyncio.sleep(0.1)
        assert await uc.count(alice) == 3, "the refresh writes back every connection this process holds"
        assert not await uc.acquire(alice, "c4")
        await uc.release(alice, "c1")
        await uc.release(alice, "c2")
        assert await uc.acquire(alice, "c4")
    finally:
        await uc.stop()
        await server.kill()


@pytest.mark.unit
def test_for_settings_follows_the_broker_url() -> None:
    def pick(url: str) -> UserConnections:
        return for_settings(Settings(broadcast_url=url, max_connections_per_user=7))

    memory = pick("memory://")
    assert isinstance(memory, MemoryUserConnections) and memory.limit == 7
    assert isinstance(pick("redis://127.0.0.1:6379/0"), RedisUserConnections)
    assert isinstance(pick("rediss://127.0.0.1:6380/0"), RedisUserConnections)
    assert isinstance(pick("postgres://u@127.0.0.1/db"), PostgresUserConnections)
    pg = pick("postgresql://u@127.0.0.1/db")
    assert isinstance(pg, PostgresUserConnections) and pg.limit == 7
    a, b = pick("redis://127.0.0.1:6379/0"), pick("redis://127.0.0.1:6379/0")
    assert isinstance(a, SharedUserConnections) and isinstance(b, SharedUserConnections)
    assert a.process_id != b.process_id


async def test_cost_of_acquire_and_release(backend: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    """What a connect and its close cost on each backend: 1,000 acquire+release pairs, one at a time."""
    uc = await backend.make(limit=100_000)
    users = [user() for _ in range(50)]
    for i in range(50):  # warm up connections, prepared statements and scripts
        await uc.acquire(users[i], "warm")
        await uc.release(users[i], "warm")
    n = 1000
    began = time.perf_counter()
    for i in range(n):
        assert await uc.acquire(users[i % 50], f"c{i}")
        await uc.release(users[i % 50], f"c{i}")
    per_pair = (time.perf_counter() - began) / n * 1e6
    with capsys.disabled():
        print(f"\n[user_connections] {backend.kind}: {per_pair:.0f} µs per acquire+release")
    assert per_pair < 20_000
