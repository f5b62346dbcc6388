"""CHANNEL objects, their keys, and who may subscribe (protocol §2)."""

from __future__ import annotations

import re
from typing import Any

from .db import Store

#: Channel type -> the CHANNEL field that carries its id.
ID_FIELDS = {"notifications": "userId", "feed": "userId", "creator": "id", "post": "postId"}
KEY_RE = re.compile(r"^(notifications|feed|creator|post)_(.+)$", re.S)
MAX_ID_LENGTH = 200


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
        raise ChannelError("channel key must be notifications_U, feed_U, creator_C or post_P")
    return match.group(1), match.group(2)


def channel_type(key: str) -> str:
    return key.split("_", 1)[0]


async def may_subscribe(store: Store, user_id: str, key: str) -> bool:
    """The access policy: may ``user_id`` join the channel ``key``?

    A post's answer, yes or no, is remembered in ``store.access`` for a few seconds (``AccessCache``): a
    client repeating a subscribe costs the database one check per TTL. Failures are not remembered.
    """
    kind, ident = parse_key(key)
    if kind in ("notifications", "feed"):
        return ident == user_id
    if kind == "creator":
        return True
    cached = store.access.get(user_id, key)
    if cached is not None:
        return cached
    allowed = await _may_see_post(store, user_id, ident)
    store.access.put(user_id, key, allowed)
    return allowed


async def _may_see_post(store: Store, user_id: str, post_id: str) -> bool:
    post = await store.get_post(post_id)
    if post is None:
        return False
    creator = str(post["creatorId"])
    if creator == user_id:
        return True
    if not post["isLocked"] and not post["minSubscriptionTier"]:
        return True
    if await store.has_active_subscription(user_id, creator):
        return True
    return await store.has_purchase(user_id, post_id)
