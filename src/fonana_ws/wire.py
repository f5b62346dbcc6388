"""A direct write path for outgoing frames, offered to the app through the ASGI scope.

uvicorn's ASGI ``send`` costs ~10 µs of Python per frame; writing a pre-built frame to the transport
costs ~3 µs (../shared/perf-notes.md). ``FonanaWSProtocol`` is uvicorn's websockets-sansio protocol plus
one scope extension, ``fonana.wire``: a ``Wire`` that writes whole, pre-encoded text frames, reports the
transport's write buffer (uvicorn's own flow control is bypassed, so the hub must watch it), and can cut a
connection without waiting for a peer that stopped reading. It leans on uvicorn internals; pyproject pins
uvicorn, and a test checks that the path is really taken.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol, State

EXTENSION = "fonana.wire"


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final, uncompressed text frame (server to client, RFC 6455 §5.2)."""
    return data_frame(payload, 0x81)


def binary_frame(payload: bytes) -> bytes:
    """An unmasked, final, uncompressed binary frame."""
    return data_frame(payload, 0x82)


def data_frame(payload: bytes, first: int) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


class Wire:
    """The app's handle on one connection's transport."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: FonanaWSProtocol) -> None:
        self._protocol = protocol

    @property
    def usable(self) -> bool:
        """Frames may be written directly: open, and no extension (permessage-deflate) negotiated."""
        p = self._protocol
        return p.handshake_complete and _open(p) and not p.conn.extensions

    def write(self, data: bytes) -> None:
        """Write pre-built frames; silently nothing once either side started closing (RFC 6455 §5.5.1)."""
        p = self._protocol
        if _open(p):
            p.transport.write(data)

    def buffered(self) -> int:
        """Bytes the kernel has not taken yet (the transport's write buffer)."""
        p = self._protocol
        return 0 if p.disconnected else p.transport.get_write_buffer_size()

    def cut(self, code: int, reason: str) -> None:
        """Close now without waiting for the peer: a close frame, then the transport is aborted.

        For a peer that stopped reading, waiting for the buffer to drain would never end.
        """
        p = self._protocol
        if p.disconnected or p.close_sent:
            return
        if p.conn.state is State.OPEN:  # the peer may have started closing: then no close frame from us
            p.conn.send_close(code, reason)
            p.transport.write(b"".join(p.conn.data_to_send()))
        p.close_sent = True
        p.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        p.stop_keepalive()
        p.loop.call_later(1.0, p.transport.abort)


def _open(p: WebSocketsSansIOProtocol) -> bool:
    return not p.close_sent and not p.disconnected and p.conn.state is State.OPEN


class Inbox:
    """What uvicorn uses of ``asyncio.Queue`` (one consumer), on a list.

    A Queue is three deques and an Event: ~2.4 KB for each idle connection, for the handful of client
    frames this protocol ever receives.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


class Flag:
    """What uvicorn uses of ``asyncio.Event`` (its write flow control), without the waiter deque."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if not self._set:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter
        return True


class FonanaWSProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, plus the ``fonana.wire`` scope extension, kept lean.

    An idle connection is what a real-time server holds most of, so what the handshake leaves behind
    (request, response, their headers) is dropped once the socket is accepted.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = Wire(self)
            self.request = None

    def shutdown(self) -> None:
        """uvicorn's shutdown (close 1012), safe for sockets that are already closing or not reading.

        uvicorn sends 1012 to a connection whose peer already sent its close (``InvalidState`` raised in
        its loop over all connections: the rest never hear of the shutdown), and waits for a peer that
        stopped reading to drain its buffer until the graceful timeout.
        """
        if self.handshake_complete and not self.close_sent and self.conn.state is not State.OPEN:
            self.stop_keepalive()
            self.transport.abort()
            return
        super().shutdown()
        if not self.disconnected and self.transport.get_write_buffer_size():
            self.loop.call_later(1.0, self.transport.abort)

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            self.response = None
            conn = self.conn
            if not conn.reader.buffer:
                # websockets' server parser generator keeps the handshake request (and its headers) in
                # its frame for the socket's whole life; past the handshake it only delegates to the
                # frame parser, so start that one directly. Nothing is buffered: a client may not send
                # frames before it has our 101.
                conn.parser = Protocol.parse(conn)
                next(conn.parser)
