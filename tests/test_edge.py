"""The edge under abuse: deadlines, header sizes, and bytes the server writes on its own (pongs, closes).

Each test is one row of the attack table in issue 9 and fails on the server before its fix: an idle or
slowloris socket was never timed out, a header of any size was held, websockets' 414/431 was never
written, pongs to a client that does not read grew the buffer without end, and a refused socket stayed.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import struct
import time
from pathlib import Path

import pytest
import websockets

from .conftest import make_settings, running

LIMITS = {
    "WS_HANDSHAKE_TIMEOUT": "1",
    "WS_BODY_TIMEOUT": "1",
    "WS_MAX_HEADER_SIZE": "4096",
    "WS_SEND_BUFFER": "65536",
}


def raw(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the socket, and how long that took."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


def upgrade_request(path: str, extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + body


@pytest.fixture
async def edge(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running(make_settings(tmp_path, None, **LIMITS)) as srv:
        yield srv


async def test_a_socket_that_sends_nothing_is_dropped(edge) -> None:  # type: ignore[no-untyped-def]
    sock = raw(edge.port)
    data, took = await read_until_closed(sock, 5)
    sock.close()
    assert data == b"" and took < 3, (data, took)
    assert edge.services.stats.limit_refusals["head_timeout"] >= 1


async def test_slowloris_headers_get_408_at_the_deadline(edge) -> None:  # type: ignore[no-untyped-def]
    sock = raw(edge.port)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n")

    async def drip() -> None:
        for i in range(20):
            await asyncio.sleep(0.3)
            try:
                await loop.sock_sendall(sock, f"X-Drip-{i}: y\r\n".encode())
            except OSError:
                return

    dripping = asyncio.create_task(drip())
    data, took = await read_until_closed(sock, 5)
    dripping.cancel()
    sock.close()
    assert data.startswith(b"HTTP/1.1 408"), data
    assert took < 3


async def test_a_header_that_never_ends_gets_431_and_is_not_held(edge) -> None:  # type: ignore[no-untyped-def]
    sock = raw(edge.port)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-Big: ")
    try:
        for _ in range(64):  # 4 MB offered; the server stops at 4 KB
            await loop.sock_sendall(sock, b"a" * 65536)
    except OSError:
        pass
    data, _ = await read_until_closed(sock, 5)
    sock.close()
    assert data.startswith(b"HTTP/1.1 431"), data[:80]


async def test_a_long_url_gets_414(edge) -> None:  # type: ignore[no-untyped-def]
    sock = raw(edge.port)
    loop = asyncio.get_running_loop()
    token = "t" * 100_000
    try:
        await loop.sock_sendall(sock, f"GET /ws?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    except OSError:
        pass
    data, _ = await read_until_closed(sock, 5)
    sock.close()
    assert data.startswith(b"HTTP/1.1 414"), data[:80]


@pytest.mark.parametrize(
    ("path", "extra", "status"),
    [
        ("/ws?token=" + "t" * 9000, "", b"414"),  # under our head limit, over websockets' line limit
        ("/ws", "".join(f"X-H{i}: v\r\n" for i in range(200)), b"431"),  # over websockets' 128 headers
    ],
    ids=["long-request-line", "200-headers"],
)
async def test_an_upgrade_websockets_refuses_gets_its_answer(
    tmp_path: Path, path: str, extra: str, status: bytes
) -> None:
    async with running(make_settings(tmp_path, None, WS_MAX_HEADER_SIZE="65536")) as srv:
        sock = raw(srv.port)
        await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(path, extra))
        data, _ = await read_until_closed(sock, 5)
        sock.close()
        assert data.startswith(b"HTTP/1.1 " + status), data[:80]


async def test_a_body_that_never_ends_is_timed_out(edge) -> None:  # type: ignore[no-untyped-def]
    sock = raw(edge.port)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
    data, took = await read_until_closed(sock, 6)
    sock.close()
    assert took < 4.5, took  # WS_BODY_TIMEOUT + 1 s for a route that never reads its body
    assert edge.services.stats.limit_refusals["body_timeout"] >= 1 or data.startswith(b"HTTP/1.1 200")


async def flood_pings(sock: socket.socket, total: int) -> int:
    """Send ``total`` bytes of 125-byte pings without reading; the bytes the server accepted."""
    loop = asyncio.get_running_loop()
    ping = masked(0x9, b"p" * 125)
    batch = ping * 500
    sent = 0
    try:
        async with asyncio.timeout(10):
            while sent < total:
                await loop.sock_sendall(sock, batch)
                sent += len(batch)
    except (OSError, TimeoutError):
        pass
    return sent


async def handshake(sock: socket.socket, path: str) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, upgrade_request(path))
    head = b""
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 4096)
    return head


async def test_pongs_to_a_client_that_never_reads_count_against_the_send_buffer(edge) -> None:  # type: ignore[no-untyped-def]
    user = await edge.user()
    sock = raw(edge.port, rcvbuf=4096)
    head = await handshake(sock, f"/ws?token={edge.token(user)}")
    assert head.startswith(b"HTTP/1.1 101"), head
    await flood_pings(sock, 60 << 20)
    for _ in range(50):
        if edge.services.stats.limit_refusals["slow_consumer_pongs"]:
            break
        await asyncio.sleep(0.1)
    sock.close()
    assert edge.services.stats.limit_refusals["slow_consumer_pongs"] == 1
    await asyncio.sleep(0.2)
    assert not edge.services.hub.connections


async def test_a_refused_socket_is_dropped_within_a_second_whatever_it_sends(edge) -> None:  # type: ignore[no-untyped-def]
    sock = raw(edge.port, rcvbuf=4096)
    head = await handshake(sock, "/ws?token=not-a-token")
    assert head.startswith(b"HTTP/1.1 101"), head
    start = time.monotonic()
    await flood_pings(sock, 200 << 20)  # stops when the server aborts the socket
    took = time.monotonic() - start
    sock.close()
    assert took < 3, took


async def test_invalid_utf8_is_one_quiet_line(edge, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    user = await edge.user()
    caplog.set_level(logging.DEBUG)
    ws = await websockets.connect(f"{edge.ws_url}?token={edge.token(user)}", close_timeout=1)
    await ws.recv()
    await ws.send(b"\xff\xfe not utf-8", text=True)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    await asyncio.sleep(0.2)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
    assert any("invalid UTF-8" in r.getMessage() for r in caplog.records)


async def test_an_upgrade_not_authenticated_in_time_is_dropped(edge) -> None:  # type: ignore[no-untyped-def]
    """The head deadline carries over the upgrade: a socket whose authentication stalls (here, a user
    lookup that hangs) is dropped when it passes, not held for as long as the database takes."""
    user = await edge.user()
    store = edge.services.store
    original = store.user_exists

    async def stalled(user_id: str) -> bool:
        await asyncio.sleep(3)
        return True

    store.user_exists = stalled
    try:
        sock = raw(edge.port)
        start = time.monotonic()
        await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(f"/ws?token={edge.token(user)}"))
        data, _ = await read_until_closed(sock, 5)
        took = time.monotonic() - start
        sock.close()
    finally:
        store.user_exists = original
    assert data == b"" and took < 2.5, (data, took)
    assert edge.services.stats.limit_refusals["handshake_timeout"] == 1
