"""A direct write path for outgoing frames, offered to the app through the ASGI scope.

uvicorn's ASGI ``send`` costs ~10 µs of Python per frame; writing a pre-built frame to the transport
costs ~3 µs (docs/perf-facts.md). ``FonanaWSProtocol`` is uvicorn's websockets-sansio protocol plus
one scope extension, ``fonana.wire``: a ``Wire`` that writes whole, pre-encoded text frames, reports the
transport's write buffer (uvicorn's own flow control is bypassed, so the hub must watch it), and can cut a
connection without waiting for a peer that stopped reading. It leans on uvicorn internals; pyproject pins
uvicorn, and a test checks that the path is really taken.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Opcode
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

from fonana_ws.fanout.sink import FdSink, Pending, Sink
from fonana_ws.transport.keepalive import wheel_of

EXTENSION = "fonana.wire"
#: How long a closing socket may take to read our close frame before it is aborted.
CLOSE_GRACE = 1.0

log = logging.getLogger("fonana_ws.connection")

#: Shared by every accepted socket's scope instead of one copy each (read-only after the accept).
_ASGI = {"version": "3.0", "spec_version": "2.4"}
_NO_SUBPROTOCOLS: list[str] = []


class Wire:
    """The app's handle on one connection's transport: a ``fanout.connection.Outlet``, plus ``authenticated``.

    Nothing in fanout imports this class: the endpoint takes it from the scope and hands it to the connection.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: FonanaWSProtocol) -> None:
        self._protocol = protocol

    @property
    def usable(self) -> bool:
        """Frames may be written directly: open, and no extension (permessage-deflate) negotiated."""
        p = self._protocol
        return p.handshake_complete and _open(p) and not p.conn.extensions

    def write(self, data: bytes) -> None:
        """Write pre-built frames; silently nothing once either side started closing (RFC 6455 §5.5.1).

        Once for every recipient of every event, so cheaper than ``_open``: websockets' ``state`` is a
        Python property. Whenever it leaves OPEN, our close frame was sent (``close_sent``) or, for the
        peer's close, uvicorn has answered it and closed the transport in the same ``data_received``.
        """
        p = self._protocol
        if not p.close_sent:
            transport = p.transport
            if not transport.is_closing():
                transport.write(data)

    def buffered(self) -> int:
        """Bytes the kernel has not taken yet (the transport's write buffer)."""
        p = self._protocol
        return 0 if p.disconnected else p.transport.get_write_buffer_size()

    def sink(self, limit: int) -> Pending:
        """The C ``FdSink`` on the socket's descriptor where it can be used, else the Python ``Sink``.

        Not over TLS (the bytes on the descriptor are ciphertext) nor without a socket to send on.
        """
        transport = self._protocol.transport
        sock = transport.get_extra_info("socket")
        if FdSink is None or sock is None or transport.get_extra_info("sslcontext") is not None:
            return Sink(self, limit)
        return FdSink(sock.fileno(), transport, self._protocol, limit)

    def cut(self, code: int, reason: str) -> None:
        """Close now without waiting for the peer: a close frame, then the transport is aborted.

        For a peer that stopped reading, waiting for the buffer to drain would never end.
        """
        self._protocol.cut(code, reason)

    def authenticated(self) -> None:
        """The connection passed authentication: the handshake deadline no longer applies."""
        self._protocol.cancel_deadline()

    def detach(self, listener: Callable[[dict[str, Any]], None]) -> bool:
        """Hand every later ASGI receive event (and those already queued) to ``listener``, as it arrives.

        The app's ASGI call may then return without the socket being closed: an idle connection is then
        a protocol object and the app's own state, with no task and no coroutine frames waiting in
        ``receive``. False (nothing changed) where the direct path is not usable.
        """
        p = self._protocol
        if not self.usable:
            return False
        p.detached = True
        p.scope = None  # type: ignore[assignment]  # read by uvicorn only before the accept
        p.queue.sink(listener)
        return True

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run the detached app's handling of a frame as a server task: uvicorn's shutdown waits for it."""
        p = self._protocol
        task = p.loop.create_task(coro)
        p.tasks.add(task)
        task.add_done_callback(p.tasks.discard)
        return task

    def resume_reading(self) -> None:
        """The detached app handled what it was given: read the next frames (paused after each message)."""
        p = self._protocol
        if p.read_paused and not p.disconnected:
            p.read_paused = False
            p.transport.resume_reading()


def _open(p: WebSocketsSansIOProtocol) -> bool:
    return not p.close_sent and not p.disconnected and p.conn.state is State.OPEN


class Inbox:
    """What uvicorn uses of ``asyncio.Queue`` (one consumer), on a list.

    A Queue is three deques and an Event: ~2.4 KB for each idle connection, for the handful of client
    frames this protocol ever receives.
    """

    __slots__ = ("_items", "_waiter", "_sink")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[Any], None] | None = None

    def sink(self, listener: Callable[[Any], None]) -> None:
        """From now on every item goes to ``listener`` at once (those waiting first, in order)."""
        self._sink = listener
        items, self._items = self._items, []
        for item in items:
            listener(item)

    def put_nowait(self, item: Any) -> None:
        sink = self._sink
        if sink is not None:
            sink(item)
            return
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


class _ServerProtocol(ServerProtocol):
    """websockets' server protocol, with a close in the middle of a fragmented message ending it normally.

    RFC 6455 §5.4 lets control frames arrive between fragments; websockets answers a close there with
    1002 ("incomplete fragmented message") where the peer's own code should be echoed (Autobahn 7.1.5).
    """

    def recv_frame(self, frame: Any) -> None:
        if frame.opcode is Opcode.CLOSE and self.current_size is not None:
            self.current_size = None  # the unfinished message is dropped with the connection
        super().recv_frame(frame)


class FonanaWSProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, plus the ``fonana.wire`` scope extension, kept lean and bounded.

    An idle connection is what a real-time server holds most of, so what the handshake leaves behind
    (request, response, their headers) is dropped once the socket is accepted.

    Every byte this protocol writes on its own (pongs, close frames, handshake refusals) counts against
    ``WS_SEND_BUFFER`` like the app's frames do: a client that sends pings and never reads the pongs is cut
    with 1013 instead of growing the transport's buffer without end. A socket that is closing is aborted
    ``CLOSE_GRACE`` after our close frame, whatever the peer does, so a refused or cut socket cannot stay
    to make the server hold its data.
    """

    # Every attribute uvicorn's protocol and this one set, as slots: uvicorn's class has none, and its
    # instance dict (over 30 keys: no key sharing) was 1.6 KB of every idle connection; slots are 8 B each.
    # The inherited __dict__ stays empty (it is only made if something sets an attribute not named here).
    __slots__ = (
        # uvicorn's, per server
        "config", "app", "loop", "logger", "root_path", "asgi_version", "app_state", "connections",
        "tasks", "default_headers", "close_timeout", "ping_interval", "ping_timeout",
        # uvicorn's, per connection
        "transport", "server", "client", "scheme", "queue", "handshake_initiated", "handshake_complete",
        "close_sent", "disconnected", "close_timer", "initial_response", "conn", "read_paused",
        "writable", "ping_timer", "pong_timer", "pending_ping_payload", "ping_sent_at", "last_ping_rtt",
        "frames", "curr_msg_data_type", "request", "response", "scope",
        # ours
        "_deadline", "_abort", "detached", "_ka_slot",
    )  # fmt: skip

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The app took the socket over (``Wire.detach``): its ASGI call returning does not close it.
        self.detached = False
        #: The keepalive wheel's slot this socket waits in (``transport.keepalive``), or None.
        self._ka_slot: int | None = None
        self.conn.__class__ = _ServerProtocol  # same state, one method more (uvicorn builds the object)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self._deadline: asyncio.TimerHandle | None = None
        self._abort: asyncio.TimerHandle | None = None

    # Keepalive: uvicorn's pings and pong deadlines, on one shared wheel instead of a timer per socket

    def schedule_ping(self) -> None:
        self._keepalive_in(max(0.0, (self.ping_interval or 0.0) - self.last_ping_rtt))

    def _keepalive_in(self, delay: float) -> None:
        assert self.ping_interval
        wheel = wheel_of(self.loop, self.ping_interval)
        if self._ka_slot is not None:
            wheel.discard(self, self._ka_slot)
        self._ka_slot = wheel.add(self, delay)

    def stop_keepalive(self) -> None:
        if self._ka_slot is not None:
            wheel_of(self.loop, self.ping_interval or 0.0).discard(self, self._ka_slot)
            self._ka_slot = None
        super().stop_keepalive()

    def keepalive_due(self) -> None:
        """The wheel's call: the next ping is due, or the last one went unanswered."""
        self._ka_slot = None
        if self.pending_ping_payload is not None and self.ping_timeout is not None:
            self.keepalive_timeout()
        else:
            self.send_keepalive_ping()

    def send_keepalive_ping(self) -> None:
        """uvicorn's ping, with the pong deadline (or the next ping) on the wheel."""
        if self.close_sent or self.transport.is_closing():
            return
        self.pending_ping_payload = struct.pack("!I", random.getrandbits(32))
        self.ping_sent_at = self.loop.time()
        self.conn.send_ping(self.pending_ping_payload)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self._keepalive_in(self.ping_timeout if self.ping_timeout is not None else self.ping_interval or 0.0)

    def handle_pong(self, event: Any) -> None:
        if self.pending_ping_payload is None or bytes(event.data) != self.pending_ping_payload:
            return  # unsolicited, or the answer to an earlier ping
        self.last_ping_rtt = self.loop.time() - self.ping_sent_at
        self.pending_ping_payload = None
        if self.ping_timeout is not None and self._ka_slot is not None:
            self.schedule_ping()  # the pong deadline is replaced by the next ping

    # Deadlines

    def arm_deadline(self, when: float) -> None:
        """Drop the socket at loop time ``when`` unless the app authenticated it by then."""
        self._deadline = self.loop.call_at(when, self._deadline_passed)

    def cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if not self.disconnected:
            count_refusal(self, "handshake_timeout")
            log.info("dropped client=%s cause=handshake_timeout", self.client[0] if self.client else "-")
            self.stop_keepalive()
            self.transport.abort()

    def _abort_soon(self) -> None:
        """A closing transport waits for its buffer to drain; a peer that does not read would keep it."""
        if self._abort is None and not self.disconnected:
            self._abort = self.loop.call_later(CLOSE_GRACE, self._abort_now)

    def _abort_now(self) -> None:
        if not self.disconnected:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_deadline()
        if self._abort is not None:
            self._abort.cancel()
            self._abort = None
        super().connection_lost(exc)

    # Bounded writes

    def cut(self, code: int, reason: str) -> None:
        """Close from the server side without waiting for the peer (see ``Wire.cut``)."""
        if self.disconnected or self.close_sent:
            return
        self.cancel_deadline()
        if not self.handshake_complete:
            self.transport.abort()
            return
        if self.conn.state is State.OPEN:  # the peer may have started closing: then no close frame from us
            self.conn.send_close(code, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.stop_keepalive()
        # The peer's close reply ends it at once (uvicorn's handle_close closes on close_timer).
        self.close_timer = self.loop.call_later(CLOSE_GRACE, self.transport.abort)

    def _over_limit(self) -> bool:
        if self.disconnected:
            return False
        services = services_of(self)
        limit = services.settings.send_buffer if services is not None else 1 << 20
        return self.transport.get_write_buffer_size() > limit

    def handle_ping(self) -> None:
        if self.close_sent or not self.handshake_complete:
            self.conn.data_to_send()  # no pong to a socket we are closing, or before our 101
            return
        super().handle_ping()
        if self._over_limit():
            count_refusal(self, "slow_consumer_pongs")
            log.info("slow consumer cut client=%s cause=unread_pongs", self.client[0] if self.client else "-")
            self.cut(1013, "Slow consumer: outbound buffer full")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        conn = self.conn
        if not self.handshake_initiated and conn.handshake_exc is not None and not self.disconnected:
            # websockets built a 414/431 for a request line or headers it will not parse; uvicorn never
            # writes it (it only answers requests that parsed).
            self.close_sent = True
            self.handshake_complete = True
            self.transport.write(b"".join(conn.data_to_send()))
            self.transport.close()
        if self.transport.is_closing():
            self._abort_soon()

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self._abort_soon()

    def send_receive_event_to_app(self) -> None:
        """uvicorn's, but invalid UTF-8 from a client is a one-line record, not an ERROR with a traceback."""
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return
        if self.curr_msg_data_type == "text":
            try:
                message = {"type": "websocket.receive", "text": data.decode()}
            except UnicodeDecodeError:
                log.info("protocol error client=%s: invalid UTF-8 in a text frame, closed 1007", self.client)
                self.conn.send_close(1007, "Invalid UTF-8")
                self.handle_parser_exception()
                self._abort_soon()
                return
        else:
            message = {"type": "websocket.receive", "bytes": data}
        self.queue.put_nowait(message)  # type: ignore[arg-type]
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = Wire(self)
            self.request = None

    async def run_asgi(self) -> None:
        """uvicorn's, except that a socket the app detached stays open when the app's call returns."""
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
            elif self.detached:
                return
        if self.close_timer is None:
            self.transport.close()

    def shutdown(self) -> None:
        """uvicorn's shutdown (close 1012), safe for sockets that are already closing or not reading.

        uvicorn sends 1012 to a connection whose peer already sent its close (``InvalidState`` raised in
        its loop over all connections: the rest never hear of the shutdown), and waits for a peer that
        stopped reading to drain its buffer until the graceful timeout. The app hears of the shutdown
        first (``Services.begin_shutdown``): the closes that follow are not users leaving.
        """
        services = services_of(self)
        if services is not None:
            services.begin_shutdown()
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
            self.server = None  # our own address: only the scope needed it
            scope = getattr(self, "scope", None)
            if scope is not None:
                # Read once, before the accept (the token is in the query string); an idle socket need
                # not keep its own copies for its whole life.
                scope["asgi"] = _ASGI
                scope["query_string"] = b""
                scope["subprotocols"] = _NO_SUBPROTOCOLS
            conn = self.conn
            if not conn.reader.buffer:
                # websockets' server parser generator keeps the handshake request (and its headers) in
                # its frame for the socket's whole life; past the handshake it only delegates to the
                # frame parser, so start that one directly. Nothing is buffered: a client may not send
                # frames before it has our 101.
                conn.parser = Protocol.parse(conn)
                next(conn.parser)
        elif message["type"] == "websocket.close" and self.close_timer is not None:
            # uvicorn waits 10 s for the peer's close reply, then close() waits for the buffer to drain.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(CLOSE_GRACE, self.transport.abort)


def services_of(protocol: Any) -> Any:
    """The ``Services`` of the app a uvicorn protocol serves (its settings and stats), or None.

    Read from the app rather than set on the class: in-process servers with other settings share the
    class, and ``--workers`` pickles the class by name.
    """
    app = getattr(protocol, "app", None)
    while app is not None and not hasattr(app, "state"):
        app = getattr(app, "app", None)
    return getattr(getattr(app, "state", None), "services", None)


def count_refusal(protocol: Any, cause: str) -> None:
    """Count a refusal made below the app in the app's ``Stats`` (``limit_refusals``)."""
    services = services_of(protocol)
    if services is not None:
        services.stats.limit_refusals[cause] += 1
