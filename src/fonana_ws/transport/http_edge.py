"""The HTTP edge: uvicorn's httptools protocol with deadlines and a size limit on what a client sends.

uvicorn times out a keep-alive connection between requests, but not a first request that never comes,
nor headers sent one line every few seconds (slowloris), nor a body that never ends; httptools holds a
header of any size. Each of those lets one client hold sockets and memory for as long as it likes, so
here every TCP connection must finish its request line and headers within ``head_timeout`` and
``max_head`` bytes, then its body within ``body_timeout``; an upgrade hands what is left of the head
deadline to the WebSocket protocol, which must see the socket authenticated by then.
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from fonana_ws.transport.wire import count_refusal, services_of

log = logging.getLogger("fonana_ws.http")


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded by the app's settings (defaults without a Fonana app)."""

    head_timeout: float = 10.0
    body_timeout: float = 31.0
    max_head: int = 32 * 1024

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        services = services_of(self)
        if services is not None:
            settings = services.settings
            self.head_timeout = settings.handshake_timeout
            # One second more than the app's own body timeout, so that a route reading its body answers
            # 408 itself; this one catches bodies that no route reads.
            self.body_timeout = settings.body_timeout + 1.0
            self.max_head = settings.max_header_size
        self._in_head = True
        self._head_bytes = 0
        self._line_done = False
        self._tail = b""
        self._timer = self.loop.call_later(self.head_timeout, self._head_expired)
        self._head_deadline = self.loop.time() + self.head_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if self._in_head and self._head_bytes + len(data) > self.max_head and not self._head_ends(data):
            # Refused before the parser sees it: httptools would buffer a header of any size.
            too_long_url = not self._line_done and b"\n" not in data[: self.max_head - self._head_bytes]
            cause = "url_too_long" if too_long_url else "headers_too_large"
            count_refusal(self, cause)
            log.info("refused client=%s cause=%s", self._peer(), cause)
            self._in_head = False
            self._answer(414 if too_long_url else 431, "request line or headers too large")
            return
        if self._in_head:
            self._head_bytes += len(data)
            self._line_done = self._line_done or b"\n" in data
            self._tail = data[-3:]
        super().data_received(data)

    def _head_ends(self, data: bytes) -> bool:
        """The blank line that ends the head is within the limit (what follows is the body)."""
        end = (self._tail + data).find(b"\r\n\r\n")
        return end != -1 and end + 4 - len(self._tail) <= self.max_head - self._head_bytes

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._line_done = False
        self._tail = b""
        self._cancel_timer()
        super().on_headers_complete()
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self._timer = self.loop.call_later(self.body_timeout, self._body_expired)

    def on_message_complete(self) -> None:
        self._cancel_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._timer is None:
            # The next request on this keep-alive connection gets a head deadline of its own.
            self._head_deadline = self.loop.time() + self.head_timeout
            self._timer = self.loop.call_later(self.head_timeout, self._head_expired)

    def handle_websocket_upgrade(self) -> None:
        self._cancel_timer()
        super().handle_websocket_upgrade()
        protocol = self.transport.get_protocol()
        arm = getattr(protocol, "arm_deadline", None)
        if arm is not None and not self.transport.is_closing():
            arm(self._head_deadline)

    def _head_expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and not self._in_head:
            return  # a request is being answered; its body deadline is the one that applies
        count_refusal(self, "head_timeout")
        log.info("dropped client=%s cause=head_timeout", self._peer())
        if self._head_bytes:
            self._answer(408, "request headers not received in time")
        else:
            self.transport.abort()  # nothing sent at all: nobody to answer

    def _body_expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        count_refusal(self, "body_timeout")
        log.info("dropped client=%s cause=body_timeout", self._peer())
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.response_complete = True
            self._answer(408, "request body not received in time")
        else:
            self.transport.abort()

    def _answer(self, status: int, message: str) -> None:
        body = message.encode()
        self.transport.write(
            b"".join(
                (
                    STATUS_LINE[status],
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                )
            )
        )
        self.transport.close()
        # close() waits for the buffer to drain: a client that does not read would keep the socket.
        self.loop.call_later(1.0, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _peer(self) -> str:
        return self.client[0] if self.client else "-"
