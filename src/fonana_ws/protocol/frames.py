"""Frame shapes in and out (protocol §1–§2, §7.2). Knows nothing of sockets or the database."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from fonana_ws.protocol.channels import MAX_ID_LENGTH

INVALID_FORMAT = "Invalid message format"
ACCESS_DENIED = "Access denied to channel"
SUBSCRIBE_FAILED = "Failed to subscribe"
PRESENCE_FAILED = "Presence unavailable"
INVALID_TOKEN = "Invalid token"
TOKEN_EXPIRED = "Token expired"
OTHER_USER = "Unauthorized: token for another user"
#: A refresh frame's token: longer than any JWT the web app signs (a few hundred bytes).
MAX_TOKEN_LENGTH = 8192
CONNECTED_MESSAGE = "Successfully connected to WebSocket server"

#: Close codes. 1008 for auth refusals is the protocol's; the others are documented in the README.
CLOSE_UNAUTHORIZED = 1008
CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001
CLOSE_SERVICE_RESTART = 1012
CLOSE_SLOW_CONSUMER = 1013
CLOSE_DISCONNECTED = 4003
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_TOO_MANY_CONNECTIONS = 4008
CLOSE_RATE_LIMITED = 4029
RATE_LIMITED = "Rate limit exceeded"

#: How deep a client frame may nest (a CHANNEL object needs 2: the frame and the channel).
MAX_FRAME_DEPTH = 32
#: How deep an event may nest. orjson parses 1024 levels but encodes only 254: without a limit, a value
#: between the two fails only when it is sent (an HTTP 500, a WebSocket dropped mid-reply).
MAX_EVENT_DEPTH = 64


class FrameError(ValueError):
    """The frame is not one the protocol knows; answered with ``Invalid message format``."""


@dataclass(frozen=True, slots=True)
class ClientFrame:
    type: str
    channel: Any = None
    #: A typing frame's conversation (an integer id becomes its decimal string) and its ``isTyping``.
    conversation_id: str = ""
    is_typing: bool = False
    #: A subscribe frame's ``"presence": true``: send this socket the channel's join/leave (§7.4).
    presence: bool = False
    #: A refresh frame's token (§7.6).
    token: str = ""
    #: A subscribe frame's ``"since": {"offset": N, "epoch": E}`` (§7.8), as (N, E).
    since: tuple[int, str] | None = None


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Do objects and lists nest more than ``limit`` levels (``{}`` is 1, a scalar 0)?

    Iterative, so a value deep enough to break a recursive walk (or orjson's encoder) is measured all the
    same; a flat object costs one pass over its values.
    """
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > limit:
            return True
        for child in children:
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
    return False


def parse_frame(text: str | bytes) -> ClientFrame:
    """Parse a client frame; raise ``FrameError`` for anything but a known, well-formed one."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise FrameError("not JSON") from None
    if not isinstance(data, dict):
        raise FrameError("not a JSON object")
    if nested_deeper_than(data, MAX_FRAME_DEPTH):
        raise FrameError(f"nested deeper than {MAX_FRAME_DEPTH} levels")
    kind = data.get("type")
    if kind == "ping":
        return ClientFrame("ping")
    if kind in ("subscribe", "unsubscribe", "presence"):
        if "channel" not in data:
            raise FrameError("no channel")
        presence = data.get("presence", False) if kind == "subscribe" else False
        if not isinstance(presence, bool):
            raise FrameError("presence must be true or false")
        since = _since(data["since"]) if kind == "subscribe" and "since" in data else None
        return ClientFrame(kind, data["channel"], presence=presence, since=since)
    if kind == "typing":
        return _typing_frame(data)
    if kind == "refresh":
        token = data.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise FrameError(f"token must be a string of 1 to {MAX_TOKEN_LENGTH} characters")
        return ClientFrame("refresh", token=token)
    raise FrameError("unknown type")


def _since(value: Any) -> tuple[int, str]:
    """``{"offset": N, "epoch": E}``: N a whole number of at most 2**53 (what a browser counts exactly),
    E a string of 1 to 64 characters."""
    if not isinstance(value, dict):
        raise FrameError("since must be an object")
    offset, epoch = value.get("offset"), value.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= 2**53:
        raise FrameError("since.offset must be a whole number")
    if not isinstance(epoch, str) or not 1 <= len(epoch) <= 64:
        raise FrameError("since.epoch must be a string of 1 to 64 characters")
    return offset, epoch


def _typing_frame(data: dict[str, Any]) -> ClientFrame:
    """``{"type":"typing","conversationId":C,"isTyping":true|false}`` (protocol §7.2)."""
    conversation = data.get("conversationId")
    if isinstance(conversation, bool) or not isinstance(conversation, str | int):
        raise FrameError("conversationId must be a string or an integer")
    conversation = str(conversation)
    if not conversation or len(conversation) > MAX_ID_LENGTH:
        raise FrameError(f"conversationId must be 1 to {MAX_ID_LENGTH} characters")
    is_typing = data.get("isTyping")
    if not isinstance(is_typing, bool):
        raise FrameError("isTyping must be true or false")
    return ClientFrame("typing", conversation_id=conversation, is_typing=is_typing)


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def iso(epoch: float) -> str:
    """Epoch seconds as ISO 8601 with milliseconds and ``Z``, as the web app's ``Date.toISOString()``."""
    at = datetime.fromtimestamp(epoch, UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def connected(user_id: str, expires_at: float | None = None) -> str:
    """The first frame; ``expiresAt`` when the token has an ``exp`` (protocol §7.6)."""
    data: dict[str, Any] = {"userId": user_id, "message": CONNECTED_MESSAGE}
    if expires_at is not None:
        data["expiresAt"] = iso(expires_at)
    return dumps({"type": "connected", "data": data})


def refreshed(expires_at: float | None) -> str:
    return dumps({"type": "refreshed", "data": {"expiresAt": iso(expires_at) if expires_at else None}})


PONG = dumps({"type": "pong"})


def subscribed(
    channel: Any,
    key: str,
    position: tuple[str, int] | None = None,
    recovered: bool | None = None,
) -> str:
    """``subscribed``; for a channel with history also its ``offset`` and ``epoch`` (protocol §7.8) and,
    for a subscribe that asked to recover, whether it could."""
    data: dict[str, Any] = {"channel": channel, "channelKey": key}
    if position is not None:
        data["offset"] = position[1]
        data["epoch"] = position[0]
    if recovered is not None:
        data["recovered"] = recovered
    return dumps({"type": "subscribed", "data": data})


def unsubscribed(channel: Any, key: str) -> str:
    return dumps({"type": "unsubscribed", "data": {"channel": channel, "channelKey": key}})


def error(message: str, channel: Any = None, **extra: Any) -> str:
    """An error frame; it echoes ``channel`` only when that can be encoded (never raises for it)."""
    data: dict[str, Any] = {"message": message}
    if channel is not None and not nested_deeper_than(channel, MAX_FRAME_DEPTH):
        data["channel"] = channel
    data.update(extra)
    try:
        return dumps({"type": "error", "data": data})
    except TypeError:  # orjson.JSONEncodeError: a value JSON has no form for
        data.pop("channel", None)
        return dumps({"type": "error", "data": data})


def conversation_channel(conversation_id: str) -> dict[str, str]:
    """The CHANNEL a typing refusal names (protocol §7.2): the conversation's, as §7.1 spells it."""
    return {"type": "conversation", "id": conversation_id}


def typing_event(conversation_id: str, user_id: str, is_typing: bool) -> dict[str, Any]:
    """What the other participant's connections receive (protocol §7.2)."""
    return {"type": "typing", "conversationId": conversation_id, "userId": user_id, "isTyping": is_typing}


def user_status(user_id: str, online: bool, last_seen: float | None) -> dict[str, Any]:
    """A user's online status (protocol §7.3); ``last_seen`` in epoch seconds, sent as ISO 8601 with
    milliseconds and ``Z`` (as the web app's ``Date.toISOString()``), or null."""
    seen = iso(last_seen) if last_seen is not None else None
    return {"type": "user_status", "userId": user_id, "online": online, "lastSeen": seen}


def presence_user(user_id: str, profile: tuple[str | None, str | None] | None) -> dict[str, Any]:
    """One user as presence frames name them (protocol §7.4); ``profile`` is (nickname, avatar)."""
    nickname, avatar = profile or (None, None)
    return {"userId": user_id, "nickname": nickname, "avatar": avatar}


def presence(channel: Any, key: str, count: int, users: list[dict[str, Any]], truncated: bool) -> str:
    """The answer to a ``presence`` query (protocol §7.4)."""
    data = {"channel": channel, "channelKey": key, "count": count, "users": users, "truncated": truncated}
    return dumps({"type": "presence", "data": data})


def presence_join(key: str, user: dict[str, Any]) -> dict[str, Any]:
    return {"type": "presence_join", "data": {"channelKey": key, "user": user}}


def presence_leave(key: str, user_id: str) -> dict[str, Any]:
    return {"type": "presence_leave", "data": {"channelKey": key, "userId": user_id}}


def presence_count(key: str, count: int) -> dict[str, Any]:
    return {"type": "presence_count", "data": {"channelKey": key, "count": count}}


def unread_notifications(notifications: list[dict[str, Any]]) -> str:
    return dumps(
        {
            "type": "unread_notifications",
            "data": {"notifications": notifications, "count": len(notifications)},
        }
    )


# -- server-to-client WebSocket frames, built once per event (RFC 6455 §5.2) ---------------------------


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
