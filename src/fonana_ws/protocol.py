"""Frame shapes in and out (protocol §1–§2). Knows nothing of sockets or the database."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

INVALID_FORMAT = "Invalid message format"
ACCESS_DENIED = "Access denied to channel"
SUBSCRIBE_FAILED = "Failed to subscribe"
CONNECTED_MESSAGE = "Successfully connected to WebSocket server"

#: Close codes. 1008 for auth refusals is the protocol's; the others are documented in the README.
CLOSE_UNAUTHORIZED = 1008
CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001
CLOSE_SERVICE_RESTART = 1012
CLOSE_SLOW_CONSUMER = 1013
CLOSE_TOO_MANY_CONNECTIONS = 4008
CLOSE_RATE_LIMITED = 4029
RATE_LIMITED = "Rate limit exceeded"


class FrameError(ValueError):
    """The frame is not one the protocol knows; answered with ``Invalid message format``."""


@dataclass(frozen=True, slots=True)
class ClientFrame:
    type: str
    channel: Any = None


def parse_frame(text: str | bytes) -> ClientFrame:
    """Parse a client frame; raise ``FrameError`` for anything but a known, well-formed one."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise FrameError("not JSON") from None
    if not isinstance(data, dict):
        raise FrameError("not a JSON object")
    kind = data.get("type")
    if kind == "ping":
        return ClientFrame("ping")
    if kind in ("subscribe", "unsubscribe"):
        if "channel" not in data:
            raise FrameError("no channel")
        return ClientFrame(kind, data["channel"])
    raise FrameError("unknown type")


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def connected(user_id: str) -> str:
    return dumps({"type": "connected", "data": {"userId": user_id, "message": CONNECTED_MESSAGE}})


PONG = dumps({"type": "pong"})


def subscribed(channel: Any, key: str) -> str:
    return dumps({"type": "subscribed", "data": {"channel": channel, "channelKey": key}})


def unsubscribed(channel: Any, key: str) -> str:
    return dumps({"type": "unsubscribed", "data": {"channel": channel, "channelKey": key}})


def error(message: str, channel: Any = None, **extra: Any) -> str:
    data: dict[str, Any] = {"message": message}
    if channel is not None:
        data["channel"] = channel
    data.update(extra)
    return dumps({"type": "error", "data": data})


def unread_notifications(notifications: list[dict[str, Any]]) -> str:
    return dumps(
        {
            "type": "unread_notifications",
            "data": {"notifications": notifications, "count": len(notifications)},
        }
    )
