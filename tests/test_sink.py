"""The direct path's sinks over real loopback sockets and uvloop transports: the C ``FdSink`` and the
Python ``Sink`` it must behave like (fanout/sink.py).

What matters: a turn's frames leave in one write and in order; what the kernel does not take stays in
the transport, ahead of later frames; a client over the limit is reported; nothing is written once the
transport is closing (its descriptor may be somebody else's by then) or our close frame went out.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from fonana_ws.fanout.sink import FIRST, OVER, QUEUED, FdSink, Sink, flush_all

from .conftest import need_service

LIMIT = 1 << 20


class Gate:
    """Stands for the WebSocket protocol object: ``close_sent`` is the flag the C sink reads."""

    close_sent = False


class TransportOutlet:
    """``transport.wire.Wire``'s write and buffered, on a bare transport: what the Python sink writes to."""

    def __init__(self, transport: asyncio.Transport, gate: Gate) -> None:
        self.transport = transport
        self.gate = gate

    def write(self, data: bytes) -> None:
        if not self.gate.close_sent and not self.transport.is_closing():
            self.transport.write(data)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()


def make_sink(kind: str, transport: asyncio.Transport, gate: Gate, limit: int = LIMIT) -> Any:
    if kind == "python":
        return Sink(TransportOutlet(transport, gate), limit)
    if FdSink is None:
        need_service("the C extension fonana_ws.fanout._sink", "not built (pip install -e . compiles it)")
    sock = transport.get_extra_info("socket")
    return FdSink(sock.fileno(), transport, gate, limit)


async def listen(loop: asyncio.AbstractEventLoop) -> tuple[Callable[[], Any], socket.socket]:
    """A listening uvloop server and an unconnected client socket; the returned call connects the two
    and gives the server-side transport (its descriptor is the lowest free one at that moment)."""
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Keep(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(transport)  # type: ignore[arg-type]

    server = await loop.create_server(Keep, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)

    async def connect() -> asyncio.Transport:
        await loop.sock_connect(client, ("127.0.0.1", port))
        transport = await asyncio.wait_for(accepted, 5)
        server.close()
        return transport

    return connect, client


async def pair(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Transport, socket.socket]:
    """A server-side uvloop transport and the raw client socket at the other end."""
    connect, client = await listen(loop)
    return await connect(), client


async def read_all(loop: asyncio.AbstractEventLoop, client: socket.socket, want: int) -> bytes:
    got = bytearray()
    while len(got) < want:
        chunk = await asyncio.wait_for(loop.sock_recv(client, 1 << 16), 5)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def drain_now(client: socket.socket) -> bytes:
    """What the client can read right now, without letting the event loop run."""
    got = bytearray()
    for _ in range(20):
        try:
            while chunk := client.recv(1 << 16):
                got += chunk
        except BlockingIOError:
            time.sleep(0.005)
    return bytes(got)


def on_uvloop(test: Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, None]]) -> None:
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(test(loop), 30))
    finally:
        loop.close()


KINDS = pytest.mark.parametrize("kind", ["c", "python"])


def test_the_c_sink_is_built() -> None:
    if FdSink is None:
        need_service("the C extension fonana_ws.fanout._sink", "not built (pip install -e . compiles it)")


@KINDS
def test_a_turns_frames_leave_together_and_in_order(kind: str) -> None:
    async def run(loop: asyncio.AbstractEventLoop) -> None:
        transport, client = await pair(loop)
        sink = make_sink(kind, transport, Gate())
        assert [sink.push(b"one,"), sink.push(b"two,"), sink.push(b"three")] == [FIRST, QUEUED, QUEUED]
        assert sink.pending == 13
        assert sink.flush() is True
        assert sink.pending == 0
        assert await read_all(loop, client, 13) == b"one,two,three"
        assert sink.push(b"again") == FIRST  # a new turn
        sink.clear()
        assert sink.pending == 0 and sink.flush() is True
        assert sink.push(b"x" * (LIMIT + 1)) == OVER
        transport.close()
        client.close()

    on_uvloop(run)


@KINDS
def test_what_the_kernel_does_not_take_stays_ahead_of_later_frames(kind: str) -> None:
    async def run(loop: asyncio.AbstractEventLoop) -> None:
        transport, client = await pair(loop)
        sink = make_sink(kind, transport, Gate(), limit=64 << 20)
        first = bytes(range(256)) * 16384  # 4 MiB: far more than the socket buffers hold
        sink.push(first)
        assert sink.flush() is True
        assert transport.get_write_buffer_size() > 0, "the kernel took it all: the test proves nothing"
        # Make room in the kernel without a loop turn: the transport still holds the rest of ``first``,
        # so a sink that sent "-after" on the descriptor now would put it ahead of that rest.
        early = drain_now(client)
        assert early and transport.get_write_buffer_size() > 0
        sink.push(b"-after")
        assert sink.flush() is True
        got = early + await read_all(loop, client, len(first) + 6 - len(early))
        assert len(got) == len(first) + 6 and got == first + b"-after"
        transport.close()
        client.close()

    on_uvloop(run)


@KINDS
@pytest.mark.parametrize("frames", [4, 100])  # one sendmsg for all; past 64 the transport takes them
def test_many_frames_cut_anywhere_arrive_whole_and_in_order(kind: str, frames: int) -> None:
    async def run(loop: asyncio.AbstractEventLoop) -> None:
        transport, client = await pair(loop)
        sink = make_sink(kind, transport, Gate(), limit=256 << 20)
        sent = [bytes([i % 251]) * (1_000_003 if frames == 4 else 40_009) for i in range(frames)]
        for frame in sent:
            sink.push(frame)
        assert sink.flush() is True
        sink.push(b"-tail")
        assert sink.flush() is True
        want = b"".join(sent) + b"-tail"
        got = drain_now(client)
        got += await read_all(loop, client, len(want) - len(got))
        assert len(got) == len(want) and got == want
        transport.close()
        client.close()

    on_uvloop(run)


@KINDS
def test_a_client_over_the_limit_is_reported(kind: str) -> None:
    async def run(loop: asyncio.AbstractEventLoop) -> None:
        transport, client = await pair(loop)
        sink = make_sink(kind, transport, Gate(), limit=64 << 10)
        sink.push(b"y" * (4 << 20))
        assert sink.flush() is False
        slow, failed = flush_all([sink, make_sink(kind, transport, Gate(), limit=64 << 10)])
        assert (slow, failed) == ([], [])  # nothing pending: nothing to report
        sink.push(b"z")
        assert flush_all([sink]) == ([0], [])
        transport.abort()
        client.close()

    on_uvloop(run)


@KINDS
def test_nothing_is_written_once_the_transport_closes(kind: str) -> None:
    async def run(loop: asyncio.AbstractEventLoop) -> None:
        transport, client = await pair(loop)
        gone_fd = transport.get_extra_info("socket").fileno()
        sink = make_sink(kind, transport, Gate())
        sink.push(b"late")
        connect, newer_client = await listen(loop)
        transport.close()
        await asyncio.sleep(0.05)  # the descriptor is closed now: the next accepted socket gets its number
        newer = await connect()
        assert newer.get_extra_info("socket").fileno() == gone_fd, "no reuse: the test proves nothing"
        assert sink.flush() is True
        assert await read_all(loop, client, 1) == b""  # end of stream, and not "late"
        newer.write(b"mine")
        assert await read_all(loop, newer_client, 4) == b"mine"  # and nothing else before it
        newer.close()
        client.close()
        newer_client.close()

    on_uvloop(run)


@KINDS
def test_nothing_is_written_after_our_close_frame(kind: str) -> None:
    async def run(loop: asyncio.AbstractEventLoop) -> None:
        transport, client = await pair(loop)
        gate = Gate()
        sink = make_sink(kind, transport, gate)
        sink.push(b"before")
        assert sink.flush() is True
        gate.close_sent = True
        sink.push(b"after")
        assert sink.flush() is True
        transport.close()
        assert await read_all(loop, client, 100) == b"before"
        client.close()

    on_uvloop(run)


def test_flush_all_writes_every_sink_whatever_one_of_them_does() -> None:
    class Broken:
        def flush(self) -> bool:
            raise OSError("gone")

    async def run(loop: asyncio.AbstractEventLoop) -> None:
        (ta, ca), (tb, cb) = await pair(loop), await pair(loop)
        a = make_sink("c", ta, Gate()) if FdSink is not None else make_sink("python", ta, Gate())
        b = make_sink("python", tb, Gate())
        a.push(b"to a")
        b.push(b"to b")
        slow, failed = flush_all([Broken(), a, b])
        assert slow == []
        assert [(i, type(exc), str(exc)) for i, exc in failed] == [(0, OSError, "gone")]
        assert await read_all(loop, ca, 4) == b"to a"
        assert await read_all(loop, cb, 4) == b"to b"
        for t in (ta, tb):
            t.close()
        ca.close()
        cb.close()

    on_uvloop(run)


def test_the_c_sink_takes_bytes_only() -> None:
    if FdSink is None:
        pytest.skip("the C extension is not built (test_the_c_sink_is_built says so, or fails under CI)")
    sink = FdSink(-1, object(), Gate(), 10)
    with pytest.raises(TypeError):
        sink.push("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        flush_all((sink,))  # type: ignore[arg-type]
