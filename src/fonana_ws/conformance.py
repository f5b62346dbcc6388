"""``/conformance/echo``: an authenticated echo for Autobahn Testsuite (``WS_CONFORMANCE_ECHO=1``).

Everything below the app is what ``/ws`` runs on: the same admission and token checks (a refusal closes
1008 ``Unauthorized: ...``), the same receive loop and inbound rate, and the same outbound path: a
``Connection`` with its byte-bounded backlog, written once per loop turn by the hub's ``Outbox`` (or
through ASGI ``send`` where the direct path is not usable). Frame handling (fragments, ping/pong, close,
UTF-8) is ``wire.FonanaWSProtocol``'s. The connection joins no channel and holds no per-user slot: it
only sends each message back as it came, text as text and binary as binary.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.websockets import WebSocket

from . import protocol
from .admission import origin_allowed
from .auth import AuthError, fingerprint, token_from_scope, verify_with
from .connection import Connection
from .endpoint import FonanaEndpoint
from .logs import lifecycle
from .net import client_address
from .wire import EXTENSION

log = logging.getLogger("fonana_ws.connection")


class EchoEndpoint(FonanaEndpoint):
    """``FonanaEndpoint``'s admission and receive loop; each message is echoed instead of parsed."""

    async def on_connect(self, websocket: WebSocket) -> None:
        services = self.services
        settings = services.settings
        raw_headers = self.scope["headers"]
        address = client_address(self.scope, settings.trusted_proxies)
        if settings.allowed_origins:
            origin = next((v.decode("latin-1") for k, v in raw_headers if k == b"origin"), None)
            if not origin_allowed(origin, settings.allowed_origins):
                await self.refuse_upgrade(
                    websocket, 403, "origin", "Origin not allowed", client=address, origin=origin
                )
                return
        if not await services.rate_limits.connect_allowed(address):
            await self.refuse_upgrade(
                websocket, 429, "connect_rate", "Too many connection attempts", client=address
            )
            return
        headers = {k.decode(): v.decode("latin-1") for k, v in raw_headers if k == b"authorization"}
        subprotocols = self.scope.get("subprotocols") or []
        token = token_from_scope(self.scope.get("query_string", b""), headers, subprotocols)
        accept_proto = "bearer" if "bearer" in subprotocols else None
        if accept_proto is None and token:
            accept_proto = next((p for p in subprotocols if p in (token, f"bearer.{token}")), None)
        user_id: str | None = None
        try:
            user_id, _claims = verify_with(settings, token)
            try:
                known = await services.store.user_exists(user_id)
            except Exception as exc:
                log.error("user lookup failed for %s: %s", user_id, exc)
                raise AuthError("database", "user lookup failed (database unavailable)") from None
            if not known:
                raise AuthError("unknown_user", "unknown user")
        except AuthError as exc:
            services.stats.auth_failures[exc.cause] += 1
            lifecycle(
                logging.INFO,
                "refused",
                user=user_id,
                client=address,
                cause=exc.cause,
                token=fingerprint(token) if token else "-",
                path="conformance",
            )
            await websocket.accept(subprotocol=accept_proto)
            await websocket.close(protocol.CLOSE_UNAUTHORIZED, exc.reason[:120])
            return
        await websocket.accept(subprotocol=accept_proto)
        self.scope["headers"] = []
        conn = Connection(websocket, user_id, services.hub.outbox, limit=settings.send_buffer, client=address)
        conn.on_slow = self._on_slow
        self.conn = conn
        wire = self.scope["extensions"].get(EXTENSION)
        if wire is not None:
            wire.authenticated()
        lifecycle(
            logging.INFO, "echo connected", conn=conn.id, user=user_id, client=address, direct=conn.direct
        )

    async def on_receive(self, websocket: WebSocket, data: Any) -> None:
        conn = self.conn
        assert conn is not None
        if self._over_rate(conn):
            return
        if isinstance(data, str):
            conn.send_text(data)
        else:
            conn.send_binary(data)

    async def on_disconnect(self, websocket: WebSocket, close_code: int) -> None:
        conn = self.conn
        if conn is None:
            return
        conn.detach()
        await self._release(conn)
        lifecycle(logging.INFO, "echo disconnected", conn=conn.id, user=conn.user_id, code=close_code)
