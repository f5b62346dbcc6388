"""A whole server through a broker outage: /ready and the publish API say so, and delivery resumes
for connections that never reconnected. Runs against private broker instances only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import websockets

from fonana_ws.auth import create_token

from ..conftest import API_KEY, SECRET, Client, ServerProcess


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {within} s: {what}")


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_server_survives_a_broker_restart(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    broker = request.getfixturevalue("private_redis" if kind == "redis" else "private_postgres")
    env = {"JWT_SECRET": SECRET, "WS_API_KEY": API_KEY, "BROADCAST_URL": broker.url}
    async with ServerProcess(env, tmp_path) as proc, httpx.AsyncClient(base_url=proc.http_url) as http:
        token = create_token(SECRET, "demo-subscriber", 600)
        client = Client(await websockets.connect(f"{proc.ws_url}?token={token}", close_timeout=1))
        await client.recv_type("connected")
        await client.subscribe({"type": "creator", "id": "demo-creator"})
        headers = {"Authorization": f"Bearer {API_KEY}"}

        async def publish(body: dict) -> int:
            return (await http.post("/api/publish", json=body, headers=headers)).status_code

        channel_event = {"channel": "creator_demo-creator", "event": {"type": "creator_updated", "n": 0}}
        assert await publish(channel_event) == 202
        assert (await client.recv())["n"] == 0

        broker.kill() if kind == "redis" else broker.stop()

        async def not_ready() -> bool:
            return (await http.get("/ready")).status_code == 503

        await eventually(not_ready, 10, "/ready answers 503 while the broker is down")
        assert (await http.get("/ready")).json()["broker"] == "down"
        assert await publish(channel_event) == 503
        assert (await http.get("/health")).status_code == 200

        broker.start()

        async def ready() -> bool:
            return (await http.get("/ready")).status_code == 200

        await eventually(ready, 15, "/ready answers 200 after the broker came back")
        assert await publish({**channel_event, "event": {"type": "creator_updated", "n": 1}}) == 202
        assert (await client.recv(5))["n"] == 1
        note = {"type": "notification", "userId": "demo-subscriber"}
        assert await publish({"user": "demo-subscriber", "event": note}) == 202
        assert await client.recv(5) == note
        await client.close()
        log = proc.log()
        assert "broker down" in log and "up again" in log
        assert SECRET not in log and API_KEY not in log
