"""A direct write path for outgoing frames, offered to the app through the ASGI scope.

uvicorn's ASGI ``send`` costs ~10 µs of Python per frame; writing a pre-built frame to the transport
costs ~3 µs (../shared/perf-notes.md). ``FonanaWSProtocol`` is uvicorn's websockets-sansio protocol plus
one scope extension, ``fonana.wire``: a ``Wire`` that writes whole, pre-encoded text frames, reports the
transport's write buffer (uvicorn's own flow control is bypassed, so the hub must watch it), and can cut a
connection without waiting for a peer that stopped reading. It leans on uvicorn internals; pyproject pins
uvicorn, and a test checks that the path is really taken.
"""

from __future__ import annotations

import struct
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

EXTENSION = "fonana.wire"


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final, uncompressed text frame (server to client, RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Wire:
    """The app's handle on one connection's transport."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: FonanaWSProtocol) -> None:
        self._protocol = protocol

    @property
    def usable(self) -> bool:
        """Frames may be written directly: open, and no extension (permessage-deflate) negotiated."""
        p = self._protocol
        return p.handshake_complete and not p.close_sent and not p.disconnected and not p.conn.extensions

    def write(self, data: bytes) -> None:
        """Write pre-built frames; silently nothing once the connection is closing."""
        p = self._protocol
        if not p.close_sent and not p.disconnected:
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
        p.conn.send_close(code, reason)
        p.transport.write(b"".join(p.conn.data_to_send()))
        p.close_sent = True
        p.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        p.stop_keepalive()
        p.loop.call_later(1.0, p.transport.abort)


class FonanaWSProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, plus the ``fonana.wire`` scope extension."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = Wire(self)
            # The handshake is done with; the upgrade request would otherwise live as long as the socket.
            self.request = None
