"""A connection's outbound path with a fake outlet and a fake ASGI socket: no socket, no server."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from fonana_ws.fanout.connection import RECENT_MULTI, Connection, Outbox, Outlet
from fonana_ws.fanout.sink import Sink
from fonana_ws.protocol.frames import CLOSE_SLOW_CONSUMER, text_frame

pytestmark = pytest.mark.unit

SLOW = (CLOSE_SLOW_CONSUMER, "Slow consumer: outbound buffer full")


class FakeOutlet:
    """A transport whose kernel takes what is written (``draining``) or nothing at all."""

    def __init__(self, *, usable: bool = True, draining: bool = True) -> None:
        self.usable = usable
        self.draining = draining
        self.writes: list[bytes] = []
        self.backlog = 0
        self.cuts: list[tuple[int, str]] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if not self.draining:
            self.backlog += len(data)

    def buffered(self) -> int:
        return self.backlog

    def cut(self, code: int, reason: str) -> None:
        self.cuts.append((code, reason))

    def sink(self, limit: int) -> Sink:
        return Sink(self, limit)


class FakeSocket:
    """Starlette's ``WebSocket`` as the fallback path uses it; ``stalled``: a peer that stopped reading."""

    def __init__(self, *, stalled: bool = False) -> None:
        self.stalled = stalled
        self.sent: list[str | bytes] = []
        self.closed: list[tuple[int, str]] = []

    async def send_text(self, data: str) -> None:
        await self._wait()
        self.sent.append(data)

    async def send_bytes(self, data: bytes) -> None:
        await self._wait()
        self.sent.append(data)

    async def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    async def _wait(self) -> None:
        if self.stalled:
            await asyncio.Event().wait()


def connect(
    outlet: FakeOutlet | None, *, limit: int = 1 << 20, socket: FakeSocket | None = None
) -> Connection:
    return Connection(socket or FakeSocket(), "u1", Outbox(), limit=limit, outlet=outlet)


async def next_turn() -> None:
    """Let the loop run what was scheduled for the next turn (the outbox's flush)."""
    await asyncio.sleep(0)


def test_the_fake_and_the_real_wire_are_outlets() -> None:
    from websockets.protocol import State

    from fonana_ws.transport.wire import Wire

    protocol = SimpleNamespace(
        handshake_complete=True,
        close_sent=False,
        disconnected=False,
        conn=SimpleNamespace(state=State.OPEN, extensions=[]),
    )
    wire = Wire(protocol)  # type: ignore[arg-type]
    assert isinstance(wire, Outlet) and wire.usable
    assert isinstance(FakeOutlet(), Outlet)


def test_the_wire_hands_out_the_c_sink_only_for_a_plain_socket() -> None:
    """Over TLS the descriptor carries ciphertext, and without a socket there is nothing to send on."""
    from fonana_ws.fanout.sink import FdSink
    from fonana_ws.transport.wire import Wire

    def sink_for(**extra: object) -> object:
        transport = SimpleNamespace(get_extra_info=lambda name: extra.get(name))
        return Wire(SimpleNamespace(transport=transport)).sink(1 << 20)  # type: ignore[arg-type]

    sock = SimpleNamespace(fileno=lambda: 7)  # only its descriptor number is read; nothing is sent
    assert type(sink_for(socket=sock, sslcontext=object())) is Sink
    if FdSink is not None:
        assert type(sink_for(socket=sock)) is FdSink
    assert type(sink_for()) is Sink


async def test_one_write_per_connection_per_loop_turn() -> None:
    outbox = Outbox()
    outlets = [FakeOutlet(), FakeOutlet()]
    conns = [Connection(FakeSocket(), "u1", outbox, limit=1 << 20, outlet=o) for o in outlets]
    assert all(c.direct for c in conns)
    for i in range(3):
        for conn in conns:
            conn.send_text(f"frame {i}")
    assert all(o.writes == [] for o in outlets)  # nothing before the loop turns
    await next_turn()
    expected = b"".join(text_frame(f"frame {i}".encode()) for i in range(3))
    assert [o.writes for o in outlets] == [[expected], [expected]]
    conns[0].send_text("later")
    await next_turn()
    assert outlets[0].writes == [expected, text_frame(b"later")] and outlets[1].writes == [expected]


async def test_a_burst_over_the_limit_is_written_at_once_and_kept_when_the_kernel_takes_it() -> None:
    outlet = FakeOutlet(draining=True)
    conn = connect(outlet, limit=1000)
    payload = "x" * 400
    for _ in range(3):
        conn.send_text(payload)
    assert len(outlet.writes) == 1  # the third frame went over 1000 bytes: written without waiting
    assert not conn.closed and outlet.cuts == []
    await next_turn()
    assert len(outlet.writes) == 1  # nothing left for the turn's flush


async def test_a_full_backlog_cuts_with_1013_and_never_blocks() -> None:
    outlet = FakeOutlet(draining=False)
    conn = connect(outlet, limit=1000)
    slow: list[Connection] = []
    conn.on_slow = slow.append
    for _ in range(10):  # all synchronous: a send never waits for the client
        conn.send_text("x" * 400)
    assert outlet.cuts == [SLOW]
    assert conn.closed and conn.close_reason == "slow consumer" and slow == [conn]
    writes = len(outlet.writes)
    assert writes == 1  # the frames after the cut are dropped, not written
    conn.send_text("more")
    await next_turn()
    assert len(outlet.writes) == writes and outlet.cuts == [SLOW] and slow == [conn]


async def test_a_client_falling_behind_over_several_turns_is_cut() -> None:
    outlet = FakeOutlet(draining=False)
    conn = connect(outlet, limit=1000)
    for turn in range(3):  # 300, 600, 900 bytes unread: within the limit (296 + a 4-byte header)
        conn.send_text("x" * 296)
        await next_turn()
        assert len(outlet.writes) == turn + 1 and not conn.closed
    conn.send_text("x" * 296)
    await next_turn()
    assert outlet.backlog == 1200 and conn.closed and outlet.cuts == [SLOW]


async def test_the_asgi_fallback_cuts_a_stalled_client_with_1013_and_never_blocks() -> None:
    socket = FakeSocket(stalled=True)
    conn = connect(None, limit=1000, socket=socket)
    assert not conn.direct
    slow: list[Connection] = []
    conn.on_slow = slow.append
    conn.send_text("first")
    await next_turn()  # the writer takes it and hangs in ASGI send
    for i in range(3):  # all synchronous: a send never waits for the writer
        assert not conn.closed, i
        conn.send_text("x" * 400)
    assert conn.closed and conn.close_reason == "slow consumer" and slow == [conn]
    await next_turn()
    assert socket.closed == [SLOW] and socket.sent == []


async def test_the_asgi_fallback_cuts_through_an_outlet_that_cannot_write() -> None:
    outlet = FakeOutlet(usable=False)  # permessage-deflate: frames go through ASGI, the close does not
    socket = FakeSocket()
    conn = connect(outlet, limit=1 << 20, socket=socket)
    assert not conn.direct
    conn.send_text("hello")
    conn.send_binary(b"\x01\x02")
    for _ in range(3):
        await next_turn()
    assert socket.sent == ["hello", b"\x01\x02"] and outlet.writes == []
    conn.cut(1012, "Server shutting down")
    await next_turn()
    assert outlet.cuts == [(1012, "Server shutting down")] and socket.closed == []


async def test_detach_drops_what_is_pending() -> None:
    outlet = FakeOutlet()
    conn = connect(outlet)
    conn.send_text("never")
    conn.detach()
    await next_turn()
    assert outlet.writes == [] and outlet.cuts == []


def test_a_multi_target_event_is_seen_once_and_the_memory_is_bounded() -> None:
    conn = Connection(FakeSocket(), "u1", Outbox(), limit=1000, outlet=FakeOutlet())
    assert not conn.seen_multi("e1")
    assert conn.seen_multi("e1") and conn.seen_multi("e1")
    for i in range(RECENT_MULTI):
        assert not conn.seen_multi(f"other-{i}")
    assert not conn.seen_multi("e1")  # forgotten: 32 later events pushed it out
