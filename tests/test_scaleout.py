"""Several server processes as one server, through the shared Redis and through PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import databases
import httpx
import orjson
import pytest
import websockets

from fonana_ws.auth import create_token
from fonana_ws.db import create_schema, demo

from .conftest import (
    API_KEY,
    REDIS_URL,
    SECRET,
    Client,
    ServerProcess,
    clean_env,
    free_port,
    fresh_pg_database,
    need_service,
    redis_reachable,
)


async def connect(proc: ServerProcess, user: str) -> Client:
    ws = await websockets.connect(f"{proc.ws_url}?token={create_token(SECRET, user, 600)}", close_timeout=1)
    client = Client(ws)
    await client.recv_type("connected")
    return client


async def publish(proc: ServerProcess, body: dict) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            proc.http_url + "/api/publish", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )


@contextlib.asynccontextmanager
async def cluster(broker: str, count: int, tmp: Path):
    """``count`` processes on one fresh PostgreSQL database and the chosen broker."""
    if broker == "redis" and (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    async with fresh_pg_database() as db_url:
        db = databases.Database(db_url)
        await db.connect()
        await create_schema(db)
        users = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(10)]
        for user in users:
            await demo.insert_user(db, user)
        await db.disconnect()
        env = {
            "JWT_SECRET": SECRET,
            "WS_API_KEY": API_KEY,
            "DATABASE_URL": db_url,
            "BROADCAST_URL": "redis://127.0.0.1:6379/0" if broker == "redis" else db_url,
        }
        async with contextlib.AsyncExitStack() as stack:
            procs = [await stack.enter_async_context(ServerProcess(env, tmp / f"n{i}")) for i in range(count)]
            yield procs, users


@pytest.mark.parametrize("broker", ["redis", "postgres"])
@pytest.mark.parametrize("count", [2, 3])
async def test_publish_on_one_process_reaches_every_process_once(
    broker: str, count: int, tmp_path: Path
) -> None:
    async with cluster(broker, count, tmp_path) as (procs, users):
        channel_key = f"creator_{uuid.uuid4().hex[:8]}"
        subscribers = []
        for proc in procs:
            client = await connect(proc, users[0])
            reply = await client.subscribe({"type": "creator", "id": channel_key.split("_", 1)[1]})
            assert reply["type"] == "subscribed"
            subscribers.append(client)
        direct = [await connect(proc, users[1]) for proc in procs]
        bystander = await connect(procs[0], users[2])
        for origin in procs:  # publish on each process in turn: local and remote receive once each
            event = {"type": "creator_updated", "origin": origin.port}
            assert (await publish(origin, {"channel": channel_key, "event": event})).status_code == 202
            for client in subscribers:
                assert await client.recv() == event
            note = {"type": "notification", "userId": users[1], "origin": origin.port}
            assert (await publish(origin, {"user": users[1], "event": note})).status_code == 202
            for client in direct:
                assert await client.recv() == note
        for client in [*subscribers, *direct]:
            await client.nothing(0.3)
        await bystander.nothing(0.1)


@pytest.mark.parametrize("broker", ["redis", "postgres"])
async def test_200_concurrent_subscribers_of_a_new_channel(broker: str, tmp_path: Path) -> None:
    async with cluster(broker, 2, tmp_path) as (procs, users):
        key = uuid.uuid4().hex[:8]
        # 20 tabs per user: within WS_MAX_CONNECTIONS_PER_USER (32).
        clients = await asyncio.gather(*(connect(procs[0], users[i % 10]) for i in range(200)))
        await asyncio.gather(
            *(c.send({"type": "subscribe", "channel": {"type": "creator", "id": key}}) for c in clients)
        )
        for client in clients:
            assert (await client.recv())["type"] == "subscribed"
        assert (
            await publish(procs[1], {"channel": f"creator_{key}", "event": {"type": "x"}})
        ).status_code == 202
        frames = await asyncio.gather(*(c.recv() for c in clients))
        assert all(f == {"type": "x"} for f in frames)
        await asyncio.gather(*(c.close() for c in clients))


async def test_large_payload_through_postgres(tmp_path: Path) -> None:
    async with cluster("postgres", 2, tmp_path) as (procs, users):
        client = await connect(procs[0], users[0])
        await client.subscribe({"type": "creator", "id": "big"})
        for size in (7_900, 60_000):
            event = {"type": "creator_updated", "pad": "é" * size}
            assert (await publish(procs[1], {"channel": "creator_big", "event": event})).status_code == 202
            assert orjson.dumps(await client.recv()) == orjson.dumps(event)


async def test_serve_with_workers_shares_the_port_and_the_broker(tmp_path: Path) -> None:
    """``fonana-ws serve --workers 2``: two processes behind one port, one server to the clients."""
    if (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    import signal
    import subprocess
    import sys

    port = free_port()
    env = clean_env(JWT_SECRET=SECRET, WS_API_KEY=API_KEY, WS_PORT=str(port), BROADCAST_URL=REDIS_URL)
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fonana_ws", "serve", "--workers", "2"],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/ready")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            assert len(children) >= 2, log.read_text()  # the workers (and multiprocessing's helper)
            token = create_token(SECRET, "demo-subscriber", 600)
            clients = []
            for _ in range(8):  # the kernel spreads them over both workers
                ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?token={token}", close_timeout=1)
                client = Client(ws)
                await client.recv_type("connected")
                await client.subscribe({"type": "creator", "id": "demo-creator"})
                clients.append(client)
            event = {"type": "creator_updated", "creatorId": "demo-creator"}
            headers = {"Authorization": f"Bearer {API_KEY}"}
            body = {"channel": "creator_demo-creator", "event": event}
            assert (await http.post("/api/publish", json=body, headers=headers)).status_code == 202
            for client in clients:
                assert await client.recv() == event
            proc.send_signal(signal.SIGTERM)
            for client in clients:
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await client.recv(10)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1012
        assert await asyncio.to_thread(proc.wait, 15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_need_a_shared_broker(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "fonana_ws", "serve", "--workers", "2"],
        cwd=tmp_path,
        env=clean_env(WS_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "BROADCAST_URL" in result.stderr
