"""The redis+cluster:// broker on a private Redis Cluster: three primaries with one replica each.

The cluster runs on its own ports and directories (never the shared Redis), started once for the
module; the failover test kills one primary with SIGKILL and waits for its replica to take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fonana_ws.broker import Broker
from fonana_ws.broker.history import HistoryLimits, Target
from fonana_ws.protocol import envelope as env

from .conftest import need_service

PORTS = list(range(17101, 17107))
LIMITS = HistoryLimits(size=100, ttl=300)


class RedisCluster:
    """Six redis-server processes in cluster mode and the ``redis-cli --cluster create`` that joins them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in PORTS)

    def start(self) -> None:
        for port in PORTS:
            work = self.tmp / str(port)
            work.mkdir()
            self.procs[port] = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--dir",
                    str(work),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--bind",
                    "127.0.0.1",
                ],  # fmt: skip
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for port in PORTS:
            self.wait(lambda p=port: self.cli(p, "PING") == "PONG", 10, f"redis-server on {port}")
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in PORTS),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],  # fmt: skip
            check=True,
            capture_output=True,
            timeout=30,
        )
        for port in PORTS:
            self.wait(lambda p=port: "cluster_state:ok" in self.cli(p, "CLUSTER", "INFO"), 20, "cluster ok")

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=5
        )
        return done.stdout.strip()

    def primary_of(self, channel: str) -> int:
        alive = next(p for p in PORTS if self.procs[p].poll() is None)
        slot = int(self.cli(alive, "CLUSTER", "KEYSLOT", channel))
        for line in self.cli(alive, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                for span in fields[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return int(fields[1].split(":")[1].split("@")[0])
        raise AssertionError(f"no primary for slot {slot}")

    @staticmethod
    def wait(check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(5)

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        need_service("redis-server", "redis-server / redis-cli are not installed")
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - polling state another task changes
            await asyncio.sleep(0.05)
    assert check(), what


class Watched:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.got: dict[str, list[str]] = {}
        broker.listen(lambda channel, message: self.got.setdefault(channel, []).append(message))


def event_target(key: str, n: int) -> Target:
    event = f'{{"type":"e","n":{n},"channelKey":"{key}"}}'
    return Target(env.key_channel(key), f'{{"event":{event}}}', key, event)


def spread_keys(cluster: RedisCluster, count_per_primary: int) -> dict[int, list[str]]:
    """Channel keys whose channels land on each primary."""
    found: dict[int, list[str]] = {}
    while min((len(v) for v in found.values()), default=0) < count_per_primary or len(found) < 3:
        key = f"post_{uuid.uuid4().hex[:8]}"
        found.setdefault(cluster.primary_of(env.key_channel(key)), []).append(key)
    return found


async def test_channels_on_every_shard_delivered_across_processes_with_history(
    redis_cluster: RedisCluster,
) -> None:
    one, two = Broker(redis_cluster.url), Broker(redis_cluster.url)
    a, b = Watched(one), Watched(two)
    await one.connect()
    await two.connect()
    try:
        await until(lambda: one.is_up and two.is_up, 15, "both connected")
        by_primary = spread_keys(redis_cluster, 2)
        keys = [k for ks in by_primary.values() for k in ks]
        for key in keys:
            await one.subscribe(env.key_channel(key))
            await two.subscribe(env.key_channel(key))
        assert len(one.backend._links) == 3  # one sharded pub/sub connection per primary
        offsets = await one.publish_targets([event_target(k, 1) for k in keys], LIMITS)
        assert offsets == [1] * len(keys)
        assert await two.publish_targets([event_target(k, 2) for k in keys], LIMITS) == [2] * len(keys)
        for w in (a, b):
            await until(lambda w=w: all(len(w.got.get(env.key_channel(k), [])) == 2 for k in keys), 10, "all")
            for key in keys:
                assert ['"offset":1', '"offset":2'] == [
                    m[m.index('"offset"') :][:10] for m in w.got[env.key_channel(key)]
                ]
        epoch, last = await two.history_position(keys[0], LIMITS)
        assert last == 2
        replay = await one.history_since(keys[0], 0, epoch, LIMITS)
        assert replay.events is not None and len(replay.events) == 2 and '"n":2' in replay.events[1]
        assert (await one.history_since(keys[0], 0, "other-epoch", LIMITS)).events is None
    finally:
        await one.disconnect()
        await two.disconnect()


async def test_a_killed_primary_fails_over_and_delivery_resumes(redis_cluster: RedisCluster) -> None:
    publisher, subscriber = Broker(redis_cluster.url), Broker(redis_cluster.url)
    watched = Watched(subscriber)
    await publisher.connect()
    await subscriber.connect()
    try:
        await until(lambda: publisher.is_up and subscriber.is_up, 15, "both connected")
        by_primary = spread_keys(redis_cluster, 1)
        victim = next(iter(by_primary))
        keys = [ks[0] for ks in by_primary.values()]
        for key in keys:
            await subscriber.subscribe(env.key_channel(key))
        assert await publisher.publish_targets([event_target(k, 1) for k in keys], LIMITS) == [1] * len(keys)
        await until(lambda: all(watched.got.get(env.key_channel(k)) for k in keys), 10, "before the kill")
        redis_cluster.kill(victim)
        await until(lambda: not subscriber.is_up, 10, "the subscriber saw the outage")
        moved = by_primary[victim][0]
        started = time.monotonic()
        await until(lambda: subscriber.is_up and publisher.is_up, 30, "back up on the promoted replica")
        recovered = time.monotonic() - started
        deadline = time.monotonic() + 15
        while True:  # the publisher's own view may lag the failover by a retry or two
            try:
                await publisher.publish_targets([event_target(k, 2) for k in keys], LIMITS)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await until(
            lambda: all(len(watched.got[env.key_channel(k)]) >= 2 for k in keys), 10, "after failover"
        )
        assert redis_cluster.primary_of(env.key_channel(moved)) != victim
        print(f"subscriber back up {recovered:.2f} s after it noticed the kill")
    finally:
        await publisher.disconnect()
        await subscriber.disconnect()


async def test_two_server_processes_fan_out_over_the_cluster(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """Publish on each fonana-ws process; subscribers on both, channels on every shard, get it once."""
    import databases
    import httpx
    import websockets

    from fonana_ws.auth import create_token
    from fonana_ws.db import create_schema, demo

    from .conftest import API_KEY, SECRET, Client, ServerProcess, fresh_pg_database

    async def connect(proc: ServerProcess, user: str) -> Client:
        token = create_token(SECRET, user, 600)
        client = Client(await websockets.connect(f"{proc.ws_url}?token={token}", close_timeout=1))
        await client.recv_type("connected")
        return client

    async with fresh_pg_database() as db_url:
        db = databases.Database(db_url)
        await db.connect()
        await create_schema(db)
        user = f"u-{uuid.uuid4().hex[:8]}"
        await demo.insert_user(db, user)
        await db.disconnect()
        environ = {"JWT_SECRET": SECRET, "WS_API_KEY": API_KEY, "DATABASE_URL": db_url}
        environ["BROADCAST_URL"] = redis_cluster.url
        creators: list[str] = []
        while len({redis_cluster.primary_of(env.key_channel(f"creator_{c}")) for c in creators}) < 3:
            creators.append(uuid.uuid4().hex[:8])
        async with contextlib.AsyncExitStack() as stack:
            procs = [
                await stack.enter_async_context(ServerProcess(environ, tmp_path / f"n{i}")) for i in range(2)
            ]
            clients = [await connect(proc, user) for proc in procs]
            for client in clients:
                for creator in creators:
                    assert (await client.subscribe({"type": "creator", "id": creator}))[
                        "type"
                    ] == "subscribed"
            async with httpx.AsyncClient() as http:
                for origin in procs:
                    for creator in creators:
                        event = {"type": "creator_updated", "origin": origin.port, "creator": creator}
                        reply = await http.post(
                            origin.http_url + "/api/publish",
                            json={"channel": f"creator_{creator}", "event": event},
                            headers={"Authorization": f"Bearer {API_KEY}"},
                        )
                        assert reply.status_code == 202
                        for client in clients:
                            got = await client.recv()
                            assert {k: got.get(k) for k in event} == event
            for client in clients:
                await client.nothing(0.3)


async def test_recovery_across_two_processes_on_the_cluster(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """The recovery story of test_recovery.py (replay, refused for another epoch or too far behind)."""
    import httpx

    from .conftest import process_pair
    from .test_recovery import recovery_story

    async with process_pair(tmp_path, "postgres", BROADCAST_URL=redis_cluster.url) as (procs, db):
        async with (
            httpx.AsyncClient(base_url=procs[0].http_url, timeout=10) as pub,
            httpx.AsyncClient(base_url=procs[1].http_url, timeout=10) as pub2,
        ):
            await recovery_story(db, procs[1].ws_url, pub, pub2)


def shared_state_pair(cluster: RedisCluster, tmp: Path, **env: str) -> Any:
    """Two fonana-ws processes on the cluster, with test_status.py's short TTL and grace."""
    from . import test_status as status
    from .conftest import process_pair

    return process_pair(
        tmp,
        "postgres",
        BROADCAST_URL=cluster.url,
        WS_PRESENCE_TTL=str(status.TTL),
        WS_OFFLINE_GRACE=str(status.GRACE),
        **env,
    )


async def test_online_status_across_two_processes_on_the_cluster(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """test_status.py's §7.3 story: A watching on process 1, B's tabs on process 0 and process 1."""
    from . import test_status as status

    async with shared_state_pair(redis_cluster, tmp_path) as (procs, db):
        nodes = [status.Node(p.ws_url, p.http_url) for p in procs]
        await status.a_watches_b(db, nodes[1], nodes[0], nodes[1])


async def test_presence_across_two_processes_on_the_cluster(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """test_presence.py's §7.4 story across the two processes."""
    from . import test_presence as presence

    async with shared_state_pair(redis_cluster, tmp_path) as (procs, db):
        nodes = [presence.Node(p.ws_url, p.http_url) for p in procs]
        await presence.presence_story(db, nodes[1], nodes[0], nodes[1])


async def test_the_per_user_limit_counts_both_processes_on_the_cluster(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """WS_MAX_CONNECTIONS_PER_USER=2: one tab on each process, the third (on either) is closed 4008."""
    import websockets

    from fonana_ws.auth import create_token
    from fonana_ws.db import demo

    from . import test_status as status
    from .conftest import SECRET

    async with shared_state_pair(redis_cluster, tmp_path, WS_MAX_CONNECTIONS_PER_USER="2") as (procs, db):
        nodes = [status.Node(p.ws_url, p.http_url) for p in procs]
        user = status.user_id("u")
        await demo.insert_user(db, user)
        first = await status.connect(nodes[0], user)
        await status.connect(nodes[1], user)
        for n in nodes:
            ws = await websockets.connect(
                f"{n.ws_url}?token={create_token(SECRET, user, 600)}", close_timeout=1
            )
            with pytest.raises(websockets.ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4008, "Too many connections")
        await first.close()
        async with asyncio.timeout(5):  # the close is released on the cluster before the server answers
            while True:
                try:
                    await status.connect(nodes[1], user)  # the freed slot, taken on the other process
                    break
                except (AssertionError, websockets.ConnectionClosed):
                    await asyncio.sleep(0.1)


async def test_a_killed_process_s_users_go_offline_and_leave_once_on_the_cluster(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """B (two tabs, in a channel) on process 0, watched on process 1; SIGKILL process 0: process 1's
    sweeps over the cluster announce B offline and B's leave within TTL + TTL/3 + grace, once each."""
    from fonana_ws.db import demo

    from . import test_presence as presence
    from . import test_status as status

    ttl, grace = status.TTL, status.GRACE
    async with shared_state_pair(redis_cluster, tmp_path) as (procs, db):
        nodes = [status.Node(p.ws_url, p.http_url) for p in procs]
        a, b, c = status.user_id("a"), status.user_id("b"), status.user_id("c")
        for user in (a, b, c):
            await demo.insert_user(db, user)
        channel, key = {"type": "creator", "id": c}, f"creator_{c}"
        watcher, snapshot = await status.watch(nodes[1], a, b)
        assert snapshot == status.status(b, False)
        inside = await presence.enter(nodes[1], a, channel, presence=True)
        assert await inside.recv() == presence.join(key, a)
        await presence.enter(nodes[0], b, channel)
        await presence.enter(nodes[0], b, channel)  # two tabs on the doomed process: one leave, one offline
        assert await watcher.recv() == status.status(b, True)
        assert await inside.recv() == presence.join(key, b)
        await status.nothing_but_marker(watcher, nodes[1], b)

        procs[0].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        went, left = await asyncio.gather(
            watcher.recv(timeout=ttl * 2 + grace + 3), inside.recv(timeout=ttl * 2 + grace + 3)
        )
        after = time.monotonic() - killed
        assert went["online"] is False and isinstance(went["lastSeen"], str), went
        assert left == presence.leave(key, b)
        print(f"\n[cluster] offline and leave {after:.2f} s after SIGKILL (TTL {ttl} s, grace {grace} s)")
        assert grace <= after <= ttl + ttl / 3 + grace + 1.0, f"{after:.2f} s after the kill"
        assert (await status.query(nodes[1], b))[b] == {"online": False, "lastSeen": went["lastSeen"]}
        assert (await presence.ask(inside, channel))["data"]["count"] == 1
        await asyncio.sleep(ttl / 3)  # another sweep or two: nothing more
        await status.nothing_but_marker(watcher, nodes[1], b)
        await presence.nothing_but_marker(inside, nodes[1], key)


@pytest.mark.unit
def test_shared_state_on_a_cluster_url_is_the_cluster_stores(caplog: pytest.LogCaptureFixture) -> None:
    """No per-process fallback any more: both stores are the cluster ones, and nothing is warned."""
    from fonana_ws.config import Settings
    from fonana_ws.fonana import presence_store, user_connections

    settings = Settings(broadcast_url="redis+cluster://127.0.0.1:17101,127.0.0.1:17102")
    with caplog.at_level("WARNING"):
        store = presence_store.for_settings(settings)
        conns = user_connections.for_settings(settings)
    assert isinstance(store, presence_store.ClusterPresenceStore)
    assert isinstance(conns, user_connections.ClusterUserConnections)
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    shards = {user_connections.index_shard("p", f"u{i}") for i in range(200)}
    assert len(shards) == user_connections.INDEX_SHARDS, "members spread over every shard"
    assert user_connections.index_shard("p", "u1") == user_connections.index_shard("p", "u1")
