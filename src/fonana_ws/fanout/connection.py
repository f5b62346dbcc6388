"""One client connection: who it is, what it joined, and its bounded outbound path.

Frames arrive pre-built (text and wire bytes, made once per event by the hub). On the direct path a
connection only pushes bytes to its sink (``fanout.sink``); the ``Outbox`` writes every sink of the turn
in one write each, so a burst of events costs one syscall per recipient instead of one per event. Without
the direct path (another ASGI server, permessage-deflate negotiated) a writer task drains a queue through
ASGI ``send``. Either way the backlog is bounded in bytes: a client that stops reading is cut off with
close code 1013, and the hub is never blocked by it.

The direct path is an ``Outlet`` the connection is handed (``transport.wire.Wire`` is one, taken by the
endpoint from the ASGI scope): this layer imports nothing of the socket library or of HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import Any, Protocol, runtime_checkable

from fonana_ws.fanout.sink import FIRST, OVER, Pending, flush_all
from fonana_ws.protocol.frames import CLOSE_SLOW_CONSUMER, binary_frame, text_frame

log = logging.getLogger("fonana_ws.connection")
_ids = itertools.count(1)
_EMPTY: deque[str | bytes] = deque(maxlen=0)
#: Multi-target event ids each connection remembers (see ``seen_multi``).
RECENT_MULTI = 32


@runtime_checkable
class Outlet(Protocol):
    """The direct path's handle on one socket's transport (cf. centrifuge's ``Transport``).

    Frames come pre-built (RFC 6455 bytes), and the ``Outbox`` hands ``write`` all of a connection's frames
    of one loop turn at once. The transport's own flow control is bypassed, so ``buffered`` is how a client
    that stopped reading is noticed.
    """

    @property
    def usable(self) -> bool:
        """Frames may be written directly: open, and nothing (permessage-deflate) to apply to them."""
        ...

    def write(self, data: bytes) -> None:
        """Write whole frames, at once; nothing once the socket is closing."""
        ...

    def buffered(self) -> int:
        """Bytes written that the kernel has not taken yet."""
        ...

    def cut(self, code: int, reason: str) -> None:
        """Close now, without waiting for a peer that may never read: close frame, then abort."""
        ...

    def sink(self, limit: int) -> Pending:
        """Where this socket's frames of a turn wait for the ``Outbox`` (``fanout.sink.Sink`` will do)."""
        ...


class AsgiSocket(Protocol):
    """The fallback path: ASGI ``send`` through Starlette's ``WebSocket`` (~10 µs a frame)."""

    async def send_text(self, data: str) -> None: ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class Outbox:
    """Connections with frames pending, written out together once per loop iteration."""

    def __init__(self) -> None:
        self._dirty: list[Connection] = []
        self._sinks: list[Pending] = []  # the same connections' sinks, for one call of ``flush_all``
        self._scheduled = False

    def mark(self, conn: Connection, sink: Pending) -> None:
        self._dirty.append(conn)
        self._sinks.append(sink)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        sinks, self._sinks = self._sinks, []
        slow, failed = flush_all(sinks)
        for i in slow:
            dirty[i].slow()
        for i, exc in failed:  # one broken socket did not leave the others' frames unwritten
            log.error("write to connection %s failed", dirty[i].id, exc_info=exc)
            dirty[i].detach()


class Connection:
    """An authenticated client connection."""

    __slots__ = (
        "id",
        "user_id",
        "client",
        "keys",
        "closed",
        "close_reason",
        "_websocket",
        "_outlet",
        "_outbox",
        "_limit",
        "_sink",
        "_queue",
        "_queue_bytes",
        "_waiter",
        "_writer",
        "on_slow",
        "_recent_multi",
        "floors",
    )

    def __init__(
        self,
        websocket: AsgiSocket | None,
        user_id: str,
        outbox: Outbox,
        *,
        limit: int,
        client: str = "",
        outlet: Outlet | None = None,
    ) -> None:
        self.id = next(_ids)
        self.user_id = user_id
        self.client = client
        #: Keys joined in the hub (also the session's: ``protocol.session.Session.keys``).
        self.keys: set[str] = set()
        #: Key -> the last offset a recovery sent (protocol §7.8): live events of the key at or below it
        #: were in the replay, and are skipped until the first one above it (then the key is dropped).
        self.floors: dict[str, int] | None = None
        self.closed = False
        self.close_reason = ""
        self._websocket = websocket
        #: Kept even when not usable for writes (permessage-deflate): ``cut`` goes through it all the same.
        self._outlet = outlet
        self._outbox = outbox
        self._limit = limit
        self._sink: Pending | None = None
        self._queue: deque[str | bytes] = _EMPTY
        self._queue_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.on_slow: Any = None
        self._recent_multi: list[str] | None = None
        # No writer task is what marks the direct path: one slot less per connection than a flag.
        if outlet is None or not outlet.usable:
            self._queue = deque()  # the direct path never queues: no deque (~600 B) for it
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        else:
            self._sink = outlet.sink(limit)

    @property
    def direct(self) -> bool:
        """True when frames go straight to the transport (the fast path)."""
        return self._writer is None

    def send(self, text: str | bytes, wire: bytes) -> None:
        """Queue one pre-built frame. Never blocks; a connection over its limit is cut instead.

        ``text`` is the payload for the path without direct writes: a str goes as a text frame, bytes
        as a binary one.
        """
        if self.closed:
            return
        sink = self._sink
        if sink is not None:
            state = sink.push(wire)
            if state == FIRST:
                self._outbox.mark(self, sink)
            elif state == OVER:
                # A burst within one loop iteration: hand it to the kernel now, and cut only a client
                # whose socket will not take it (flush checks the transport's buffer).
                self.flush()
            return
        self._queue.append(text)
        self._queue_bytes += len(text)
        if self._queue_bytes > self._limit:
            self.slow()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def seen_multi(self, event_id: str) -> bool:
        """Was this multi-target event already sent here? Records it if not.

        The copies of one event (one per target channel) are published together, so a short memory per
        connection is enough; it is bounded per connection, whatever the number of events.
        """
        recent = self._recent_multi
        if recent is None:
            self._recent_multi = [event_id]
            return False
        if event_id in recent:
            return True
        recent.append(event_id)
        if len(recent) > RECENT_MULTI:
            del recent[0]
        return False

    def send_text(self, text: str) -> None:
        """Queue a control frame (a reply to this client only)."""
        self.send(text, text_frame(text.encode()))

    def send_binary(self, data: bytes) -> None:
        """Queue a binary frame (the conformance echo's; the protocol itself sends text only)."""
        self.send(data, binary_frame(data))

    def flush(self) -> None:
        """Write what is pending in one write; cut the connection if the kernel stopped taking it."""
        sink = self._sink
        if sink is None or self.closed:
            return
        if not sink.flush():
            self.slow()

    async def _write_loop(self) -> None:
        assert self._websocket is not None, "no ASGI socket for a connection without the direct path"
        send_text, send_bytes = self._websocket.send_text, self._websocket.send_bytes
        queue = self._queue
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not queue:
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
                item = queue.popleft()
                self._queue_bytes -= len(item)
                if isinstance(item, str):
                    await send_text(item)
                else:
                    await send_bytes(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket went away under us; the endpoint sees the disconnect
            log.debug("connection %s writer stopped: %s", self.id, exc)

    def slow(self) -> None:
        """The client stopped reading: cut with 1013 (the ``Outbox`` calls this for a slow sink)."""
        self.close_reason = "slow consumer"
        self.cut(CLOSE_SLOW_CONSUMER, "Slow consumer: outbound buffer full")
        if self.on_slow is not None:
            self.on_slow(self)

    def cut(self, code: int, reason: str) -> None:
        """Close from the server side without waiting for the peer; drops whatever is queued."""
        if self.closed:
            return
        self.closed = True
        if self._sink is not None:
            self._sink.clear()
        self._queue.clear()
        if self._writer is not None:
            self._writer.cancel()
        if self._outlet is not None:
            self._outlet.cut(code, reason)
        else:
            asyncio.get_running_loop().create_task(self._close_asgi(code, reason))

    async def _close_asgi(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(2):
                assert self._websocket is not None
                await self._websocket.close(code, reason)
        except Exception:  # already closed, or the peer never drained: nothing more to do here
            pass

    def detach(self) -> None:
        """The socket is gone: stop the writer and drop what was queued."""
        self.closed = True
        if self._sink is not None:
            self._sink.clear()
        self._queue.clear()
        if self._writer is not None:
            self._writer.cancel()
