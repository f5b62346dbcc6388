"""Disconnect a user everywhere (protocol §7.7): one control message on the user's own broker topic, and
the handler that closes that user's local connections with 4003 in every process that has one.

The user's topic is the right carrier: every process holding a connection of the user is subscribed to
it already (``Hub.add_connection``), and a process without one receives nothing and owes nothing. The
message is a ``"control"`` envelope, so no socket ever receives it.
"""

from __future__ import annotations

import logging
from typing import Any

from fonana_ws.broker import Broker
from fonana_ws.fanout.hub import Hub
from fonana_ws.logs import lifecycle
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol.frames import CLOSE_DISCONNECTED

KIND = "disconnect"
#: The close reason the client sees (protocol §7.10); the caller's reason goes to the log only.
DISCONNECTED = "Disconnected by the server"
#: Longest reason a caller may give (it is logged on every process with a connection of the user).
MAX_REASON = 200


def message(user_id: str, reason: str | None = None) -> tuple[str, str]:
    """The ``(broker topic, envelope)`` that disconnects ``user_id`` everywhere."""
    event: dict[str, Any] = {"type": KIND, "userId": user_id}
    if reason:
        event["reason"] = reason
    return env.user_channel(user_id), env.encode(event, env.new_event_id(), control=KIND, user=user_id)


async def disconnect_everywhere(broker: Broker, user_id: str, reason: str | None = None) -> None:
    """Ask every process to close ``user_id``'s connections. Raises ``BrokerUnavailable`` when the
    broker is down (then no process was asked)."""
    await broker.publish_many([message(user_id, reason)])


def install(hub: Hub) -> None:
    """Make ``hub`` act on the disconnect messages it receives (any process's, its own included)."""
    hub.controls[KIND] = lambda event: close_user(hub, event)


def close_user(hub: Hub, event: dict[str, Any]) -> int:
    """Close every local connection of the event's user with 4003; how many were closed."""
    user_id = event.get("userId")
    if not isinstance(user_id, str):
        return 0
    reason = event.get("reason")
    reason = reason[:MAX_REASON] if isinstance(reason, str) else None
    closed = 0
    for conn in list(hub.by_user.get(user_id, ())):  # a copy: the endpoint may forget one meanwhile
        if conn.closed:
            continue
        closed += 1
        lifecycle(
            logging.INFO,
            "server disconnect",
            conn=conn.id,
            user=user_id,
            client=conn.client,
            reason=reason,
        )
        conn.close_reason = "disconnected by the server"
        conn.cut(CLOSE_DISCONNECTED, DISCONNECTED)
    return closed
