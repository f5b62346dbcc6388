"""What an attacker sends, against a real server: bodies too large or too slow, objects nested too
deep, forged log lines and forwarded addresses, and the same subscribe over and over."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from fonana_ws.auth import create_token

from .conftest import (
    API_KEY,
    SECRET,
    Client,
    Server,
    ServerProcess,
    fresh_pg_database,
    make_settings,
    running,
)

AUTH = f"Authorization: Bearer {API_KEY}\r\n"
BODY_ROUTES = ("/api/publish", "/api/events/notification", "/api/events/creator-updated")


def nested(depth: int, inner: str = "1") -> str:
    """JSON text of ``depth`` lists around ``inner`` (orjson cannot write more than 254 levels itself)."""
    return "[" * depth + inner + "]" * depth


async def raw_request(port: int, head: str, body: bytes = b"") -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def read_response(
    reader: asyncio.StreamReader, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one response with a Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    return status, headers, body


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# -- bodies: 413 before reading past the limit, 408 for one that does not arrive (rows 6 and 12) --------


@pytest.mark.parametrize("path", BODY_ROUTES)
async def test_declared_body_over_the_limit_is_413_at_once_unread(server: Server, path: str) -> None:
    """100 MB declared, not a byte of it sent: the answer comes anyway (the old code waited for it)."""
    reader, writer = await raw_request(
        server.port,
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Type: application/json\r\n"
        f"Content-Length: {100 << 20}\r\n\r\n",
    )
    started = time.monotonic()
    status, _headers, body = await read_response(reader, timeout=3)
    assert status == 413, body
    assert time.monotonic() - started < 2
    assert f"larger than {server.settings.max_event_size} bytes" in orjson.loads(body)["error"]
    writer.close()


@pytest.mark.parametrize("path", BODY_ROUTES)
async def test_chunked_body_is_413_as_soon_as_it_passes_the_limit(server: Server, path: str) -> None:
    """Chunks past the limit and no end: the 413 arrives while the body is still open."""
    limit = server.settings.max_event_size
    reader, writer = await raw_request(
        server.port, f"POST {path} HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 65536
    for _ in range(limit // len(chunk) + 2):
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    await writer.drain()
    status, _headers, body = await read_response(reader)
    assert status == 413 and "larger than" in orjson.loads(body)["error"], body
    writer.close()


async def test_the_413_reaches_a_client_that_sends_the_whole_body(server: Server) -> None:
    """An ordinary client (httpx writes all of it before it reads) gets the answer, not a reset."""
    too_big = b"x" * (8 * server.settings.max_event_size)
    for path in BODY_ROUTES:
        response = await server.http.post(
            path, content=too_big, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert response.status_code == 413, response.text


@asynccontextmanager
async def small_limits(tmp: Path) -> AsyncIterator[Server]:
    async with running(make_settings(tmp, None, WS_MAX_EVENT_SIZE="2048", WS_BODY_TIMEOUT="0.5")) as srv:
        yield srv


async def test_a_body_that_never_finishes_is_408(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with small_limits(tmp_path) as srv:
        for path in BODY_ROUTES:
            reader, writer = await raw_request(
                srv.port,
                f"POST {path} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 100\r\n\r\n",
                b'{"user": ',
            )
            started = time.monotonic()
            status, headers, body = await read_response(reader, timeout=3)
            # The route's own answer (JSON), not the edge's catch-all one second later (plain text).
            assert status == 408 and headers["content-type"] == "application/json", body
            assert "0.5 seconds" in orjson.loads(body)["error"]
            assert 0.3 < time.monotonic() - started < 1.2
            writer.close()
    assert not errors_logged(caplog)


async def test_a_body_at_the_limit_is_read_one_byte_more_is_413(tmp_path: Path) -> None:
    async with small_limits(tmp_path) as srv:

        def body(size: int) -> bytes:
            """``size`` bytes of JSON that is read and parsed, then refused for having no target (400)."""
            text = b'{"pad": "", "event": {"type": "x"}}'
            return text.replace(b'""', b'"' + b"p" * (size - len(text)) + b'"')

        assert len(body(2048)) == 2048
        headers = {"Authorization": f"Bearer {API_KEY}"}

        # Without Content-Length (chunked): counted as it arrives.
        async def chunks(data: bytes) -> AsyncIterator[bytes]:
            for i in range(0, len(data), 500):
                yield data[i : i + 500]

        for size, status in ((2048, 400), (2049, 413)):
            for content in (body(size), chunks(body(size))):
                response = await srv.http.post("/api/publish", content=content, headers=headers)
                assert response.status_code == status, (size, response.text)
                if status == 400:
                    assert response.json()["error"] == "channel or user is required"
                else:
                    assert "body is larger than 2048 bytes" in response.json()["error"]


# -- nesting (row 8) ------------------------------------------------------------------------------------


async def test_deep_events_are_400_not_500(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    user = await server.user(creator=True)
    # Deeper than orjson can encode (254), or than it can even parse (1024).
    for depth in (300, 1000, 1100):
        body = f'{{"user": "{user}", "event": {{"type": "x", "data": {nested(depth)}}}}}'
        response = await server.http.post("/api/publish", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert re.search(r"nested deeper than \d+ levels|not valid JSON", response.json()["error"])
    # At the event's limit: 64 levels ({"type", "data": 63 lists}) pass, 65 do not.
    for depth, status in ((63, 202), (64, 400)):
        event = {"type": "x", "data": orjson.loads(nested(depth))}
        response = await server.publish({"user": user, "event": event})
        assert response.status_code == status, response.text
    assert response.json()["error"] == "event is nested deeper than 64 levels"
    # The typed endpoints: their fields go into the event a level or more down.
    typed = [
        ("/api/events/creator-updated", f'{{"creatorId": "{user}", "changes": {{"bio": {nested(300)}}}}}'),
        ("/api/events/creator-updated", f'{{"creatorId": "{user}", "changes": {{"bio": {nested(100)}}}}}'),
        (
            "/api/events/notification",
            f'{{"userId": "{user}", "type": "LIKE_POST", "title": "t", "message": "m", '
            f'"metadata": {nested(1000)}}}',
        ),
        ("/api/events/feed-update", f'{{"userId": "{user}", "posts": {nested(80)}}}'),
    ]
    for path, body in typed:
        response = await server.http.post(path, content=body, headers=headers)
        assert response.status_code == 400, (path, response.text)
        assert "nested deeper than" in response.json()["error"], response.text
    assert not errors_logged(caplog)


async def test_a_frame_nested_1000_deep_gets_an_error_and_the_connection_stays(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    client = await server.connect(await server.user())
    invalid = {"type": "error", "data": {"message": "Invalid message format"}}
    frames = [
        f'{{"type": "subscribe", "channel": {nested(1000)}}}',
        f'{{"type": "subscribe", "channel": {{"type": "post", "postId": {nested(300)}}}}}',
        f'{{"type": "unsubscribe", "channel": {{"type": "nope", "x": {nested(40)}}}}}',
        f'{{"type": "ping", "x": {nested(1000)}}}',
    ]
    for frame in frames:
        await client.send(frame)
        assert await client.recv() == invalid, frame[:60]
    # Under the limit, the error still echoes the channel (protocol §2).
    channel = {"type": "nope", "x": orjson.loads(nested(20))}
    await client.send({"type": "subscribe", "channel": channel})
    assert await client.recv() == {"type": "error", "data": {**invalid["data"], "channel": channel}}
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}
    assert not errors_logged(caplog)


# -- the log (row 10) -----------------------------------------------------------------------------------


#: A whole log line, as the text formatter writes one.
FORGED = (
    "2030-01-01 00:00:00,000 INFO    fonana_ws.connection: connected conn=1 user=demo-creator client=6.6.6.6"
)


async def test_nothing_a_client_sends_makes_a_second_log_line(tmp_path: Path) -> None:
    env = {"JWT_SECRET": SECRET, "WS_API_KEY": API_KEY, "FONANA_WS_DATA_DIR": str(tmp_path / "data")}
    async with ServerProcess(env, tmp_path, inherit=False) as proc:
        token = create_token(SECRET, "demo-outsider", 600)
        # Loopback is a trusted proxy by default; a header that is not a list of addresses is ignored.
        ws = await websockets.connect(
            f"{proc.ws_url}?token={token}",
            close_timeout=1,
            additional_headers={"X-Forwarded-For": "6.6.6.6 user=demo-creator"},
        )
        client = Client(ws)
        await client.recv_type("connected")
        for post_id in (f"x\n{FORGED}", f"y\r{FORGED}", "z user=demo-creator", 'q" client="6.6.6.6'):
            await client.send({"type": "subscribe", "channel": {"type": "post", "postId": post_id}})
            assert (await client.recv())["data"]["message"] == "Access denied to channel"
        await client.close()
        deadline = time.monotonic() + 5
        while " disconnected conn=" not in proc.log():
            assert time.monotonic() < deadline, proc.log()
            await asyncio.sleep(0.05)
    log = proc.log()
    lines = log.splitlines()
    assert not [line for line in lines if "6.6.6.6" in line and "denied" not in line], log
    assert re.search(r" connected conn=\d+ user=demo-outsider client=127\.0\.0\.1 direct=\S+$", log, re.M)
    denied = [line for line in lines if " denied conn=" in line]
    assert len(denied) == 4, log
    assert denied[0].endswith('key="post_x\\n' + FORGED + '"')
    assert denied[1].endswith('key="post_y\\r' + FORGED + '"')
    assert denied[2].endswith('client=127.0.0.1 key="post_z user=demo-creator"')
    assert denied[3].endswith('key="post_q\\" client=\\"6.6.6.6"')
    assert not [line for line in lines if line.startswith("2030-") or "\r" in line], log


# -- access decisions (row 7) ---------------------------------------------------------------------------


class CountingQueries:
    """Stands in for ``Store.q`` and counts the queries that go through it."""

    def __init__(self, q: Any) -> None:
        self.q = q
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.q, name)
        if name.startswith(("fetch_", "execute")):
            self.count += 1
        return attr


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_repeated_subscribes_cost_one_access_check(tmp_path: Path, database: str) -> None:
    async with (
        _database(database) as url,
        running(make_settings(tmp_path, url, WS_CLIENT_RATE="1000/second")) as srv,
    ):
        creator, outsider = await srv.user(creator=True), await srv.user()
        locked = await srv.post(creator, locked=True)
        outside = await srv.connect(outsider)
        own = await srv.connect(creator)
        store = srv.services.store
        counting = CountingQueries(store.q)
        store.q = counting
        try:
            channel = {"type": "post", "postId": locked}
            for _ in range(200):
                await outside.send({"type": "subscribe", "channel": channel})
            for _ in range(200):
                reply = await outside.recv()
                assert reply["data"]["message"] == "Access denied to channel", reply
            for _ in range(100):
                await own.send({"type": "subscribe", "channel": channel})
                await own.send({"type": "unsubscribe", "channel": channel})
            for _ in range(100):
                await own.recv_type("subscribed")
                await own.recv_type("unsubscribed")
            # 3 for the denial (post, purchase, subscription), 1 for the creator's allowance, and at most 2
            # for the creator's presence join (hidden status, profile: both remembered afterwards).
            assert counting.count <= 6, counting.count
        finally:
            store.q = counting.q


@asynccontextmanager
async def _database(kind: str) -> AsyncIterator[str | None]:
    if kind == "sqlite":
        yield None
        return
    async with fresh_pg_database() as url:
        yield url
