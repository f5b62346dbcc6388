"""CHANNEL objects and their keys (protocol §2); who may join one is ``fonana.policy``."""

from __future__ import annotations

import re
from typing import Any

#: Channel type -> the CHANNEL field that carries its id.
ID_FIELDS = {
    "notifications": "userId",
    "feed": "userId",
    "creator": "id",
    "post": "postId",
    "conversation": "id",
    "status": "userId",
}
#: The key of each type as the error texts spell it: notifications_U, ..., status_U.
KEY_FORMS = ("notifications_U", "feed_U", "creator_C", "post_P", "conversation_C", "status_U")
KEY_RE = re.compile(rf"^({'|'.join(ID_FIELDS)})_(.+)$", re.S)
MAX_ID_LENGTH = 200
#: The channel types whose present users are counted and can be asked for (protocol §7.4).
PRESENCE_TYPES = ("creator", "post", "conversation")
_PRESENCE_PREFIXES = tuple(f"{kind}_" for kind in PRESENCE_TYPES)


class ChannelError(ValueError):
    """A CHANNEL object that is not well formed."""


def channel_key(channel: Any) -> str:
    """The key of a CHANNEL object, e.g. ``{"type": "post", "postId": "p1"}`` -> ``post_p1``."""
    if not isinstance(channel, dict):
        raise ChannelError("channel must be an object")
    kind = channel.get("type")
    if kind not in ID_FIELDS:
        raise ChannelError("unknown channel type")
    value = channel.get(ID_FIELDS[kind])
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ChannelError(f"channel needs {ID_FIELDS[kind]}")
    value = str(value)
    if not value or len(value) > MAX_ID_LENGTH:
        raise ChannelError(f"channel {ID_FIELDS[kind]} must be 1 to {MAX_ID_LENGTH} characters")
    return f"{kind}_{value}"


def parse_key(key: str) -> tuple[str, str]:
    """``post_p1`` -> ``("post", "p1")``; raise ``ChannelError`` for a key no channel has."""
    match = KEY_RE.match(key) if isinstance(key, str) else None
    if match is None or len(match.group(2)) > MAX_ID_LENGTH:
        raise ChannelError(f"channel key must be {', '.join(KEY_FORMS[:-1])} or {KEY_FORMS[-1]}")
    return match.group(1), match.group(2)


def channel_type(key: str) -> str:
    return key.split("_", 1)[0]


def has_presence(key: str) -> bool:
    """Is ``key`` a channel with presence (a creator, post or conversation channel)?"""
    return key.startswith(_PRESENCE_PREFIXES)
