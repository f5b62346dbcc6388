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

from fonana_ws.logs import lifecycle
from fonana_ws.web.endpoint import FonanaEndpoint

log = logging.getLogger("fonana_ws.connection")


class EchoEndpoint(FonanaEndpoint):
    """``FonanaEndpoint``'s admission and receive loop; each message is echoed instead of parsed."""

    log_path = "conformance"

    async def on_connect(self, websocket: WebSocket) -> None:
        admitted = await self.admit(websocket)
        if admitted is None:
            return
        user_id, _, address = admitted
        self.conn = conn = await self.accept(websocket, admitted)
        self.authenticated()
        lifecycle(
            logging.INFO, "echo connected", conn=conn.id, user=user_id, client=address, direct=conn.direct
        )

    async def on_receive(self, websocket: WebSocket | None, data: Any) -> None:
        conn = self.conn
        assert conn is not None
        if self._over_rate(conn):
            return
        if isinstance(data, str):
            conn.send_text(data)
        else:
            conn.send_binary(data)

    async def on_disconnect(self, websocket: WebSocket | None, close_code: int) -> None:
        conn = self.conn
        if conn is None:
            return
        conn.detach()
        await self._release(conn)
        lifecycle(logging.INFO, "echo disconnected", conn=conn.id, user=conn.user_id, code=close_code)
