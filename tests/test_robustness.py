"""Edge cases found in review: bursts, the first frame under load, and SIGTERM with sockets that are
already closing or not reading."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import struct
import time
from pathlib import Path

import httpx
import orjson
import websockets

from fonana_ws.auth import create_token

from .conftest import (
    API_KEY,
    REDIS_URL,
    SECRET,
    ServerProcess,
    make_settings,
    need_service,
    redis_reachable,
    running,
)


async def test_a_burst_does_not_cut_a_client_that_reads(tmp_path: Path) -> None:
    """4,000 events arriving in one loop iteration (as a broker burst does) exceed the send buffer
    before the coalesced write runs: they go to the kernel, and only a socket that will not take
    them is cut."""
    async with running(make_settings(tmp_path, None, WS_SEND_BUFFER="262144")) as srv:
        user = await srv.user()
        client = await srv.connect(user)
        await client.subscribe({"type": "creator", "id": f"burst-{user}"})
        event = {"type": "comment_added", "pad": "z" * 300}
        publish = srv.services.publisher.publish
        await asyncio.gather(*(publish(event, channels=[f"creator_burst-{user}"]) for _ in range(4000)))
        for _ in range(4000):
            assert (await client.recv(10))["type"] == "comment_added"
        assert srv.services.stats.slow_consumer_disconnects == 0


async def test_connected_is_always_the_first_frame(tmp_path: Path) -> None:
    if (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    import redis.asyncio as aioredis

    async with running(make_settings(tmp_path, None, BROADCAST_URL=REDIS_URL)) as srv:
        user = await srv.user()
        redis = aioredis.from_url(REDIS_URL)
        stop = asyncio.Event()
        message = orjson.dumps({"id": "x", "event": {"type": "notification_read", "userId": user}}).decode()

        async def spam() -> None:  # the user's direct channel is busy while tabs connect
            while not stop.is_set():
                await redis.publish(f"fonana-ws:user:{user}", message)

        spammers = [asyncio.create_task(spam()) for _ in range(3)]
        try:
            for _ in range(30):
                ws = await websockets.connect(f"{srv.ws_url}?token={srv.token(user)}")
                assert orjson.loads(await ws.recv())["type"] == "connected"
                await ws.close()
        finally:
            stop.set()
            await asyncio.gather(*spammers)
            await redis.aclose()


class RawClient:
    """A WebSocket client on a plain socket with a tiny receive buffer, reading only when told."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(65536)
        assert b" 101 " in buf.split(b"\r\n", 1)[0]

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self) -> None:
        self.sock.close()


async def test_sigterm_with_a_peer_that_closed_and_one_that_stopped_reading(tmp_path: Path) -> None:
    """uvicorn's shutdown raised on a socket whose peer had already sent its close (the other clients
    never heard of the shutdown and the process hung); a peer that stopped reading held the exit until
    the graceful timeout."""
    env = {"JWT_SECRET": SECRET, "WS_API_KEY": API_KEY, "WS_SEND_BUFFER": "8000000"}
    async with ServerProcess(env, tmp_path, inherit=False) as proc:
        normal = await websockets.connect(
            f"{proc.ws_url}?token={create_token(SECRET, 'demo-subscriber', 600)}"
        )
        assert orjson.loads(await normal.recv())["type"] == "connected"
        closed = RawClient(proc.port, create_token(SECRET, "demo-outsider", 600))
        stalled = RawClient(proc.port, create_token(SECRET, "demo-creator", 600))
        subscribe = orjson.dumps(
            {"type": "subscribe", "channel": {"type": "post", "postId": "demo-post-open"}}
        )
        for raw in (closed, stalled):
            raw.send(1, subscribe)
        await asyncio.sleep(0.3)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=proc.http_url, headers=headers) as http:
            for _ in range(100):  # megabytes the two raw clients never read
                body = {"channel": "post_demo-post-open", "event": {"type": "x", "pad": "y" * 40000}}
                assert (await http.post("/api/publish", json=body)).status_code == 202
        await asyncio.sleep(0.3)
        closed.send(8, struct.pack("!H", 1000))  # its close, while the server still has data for it
        await asyncio.sleep(0.3)
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(normal.recv(), 10)
            raise AssertionError("the normal client was not closed")
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1012
        assert await asyncio.to_thread(proc.proc.wait, 10) == 0
        assert time.monotonic() - started < 5
        closed.close()
        stalled.close()
