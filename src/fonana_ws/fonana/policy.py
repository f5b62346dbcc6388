"""Who may join which channel (protocol §2, §7.1): the access policy, asked once per subscribe."""

from __future__ import annotations

from fonana_ws.db import Store
from fonana_ws.protocol.channels import parse_key

#: A decision: True (allowed), False, or the epoch seconds until which it is allowed (a locked post seen
#: through a subscription, which ends at its ``validUntil``); truthy means allowed.
Access = bool | float


async def may_subscribe(store: Store, user_id: str, key: str) -> Access:
    """The access policy: may ``user_id`` join the channel ``key``?

    A post's or a conversation's answer, yes or no, is remembered in ``store.access`` for a few seconds
    (``AccessCache``): a client repeating a subscribe costs the database one check per TTL. Failures are
    not remembered.
    """
    kind, ident = parse_key(key)
    if kind in ("notifications", "feed"):
        return ident == user_id
    if kind in ("creator", "status"):
        return True  # a status is for any authenticated user to watch (protocol §7.3)
    cached = store.access.get(user_id, key)
    if cached is not None:
        return cached
    if kind == "conversation":
        allowed = await _is_participant(store, user_id, ident)
    else:
        allowed = await _may_see_post(store, user_id, ident)
    store.access.put(user_id, key, allowed)
    return allowed


async def _is_participant(store: Store, user_id: str, conversation_id: str) -> bool:
    """One of the row's two users; no such conversation is refused, exactly like a locked post."""
    participants = await store.conversation_participants(conversation_id)
    return participants is not None and user_id in participants


async def _may_see_post(store: Store, user_id: str, post_id: str) -> Access:
    post = await store.get_post(post_id)
    if post is None:
        return False
    creator = str(post["creatorId"])
    if creator == user_id:
        return True
    if not post["isLocked"] and not post["minSubscriptionTier"]:
        return True
    if await store.has_purchase(user_id, post_id):
        return True  # bought: for good, whatever becomes of the subscription
    until = await store.subscription_until(user_id, creator)
    return until if until is not None else False
