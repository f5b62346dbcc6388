"""Demo rows for the embedded default: enough to see every access rule work at once (and, in tests, the
helpers that insert rows of each table)."""

from __future__ import annotations

from datetime import timedelta

import databases

from fonana_ws.db.store import utcnow

CREATOR = "demo-creator"
SUBSCRIBER = "demo-subscriber"
OUTSIDER = "demo-outsider"
OPEN_POST = "demo-post-open"
LOCKED_POST = "demo-post-locked"
CONVERSATION = "demo-conversation"

DEMO_USERS = {
    CREATOR: f"a creator with an open and a locked post, in {CONVERSATION}",
    SUBSCRIBER: f"a paying subscriber of the creator (may see the locked post), in {CONVERSATION}",
    OUTSIDER: "a user with no subscription (refused the locked post and the conversation)",
}


async def insert_user(db: databases.Database, user_id: str, *, is_creator: bool = False) -> None:
    await db.execute(
        """INSERT INTO users (id, wallet, nickname, name, "isCreator", "isVerified", "createdAt", "updatedAt")
           VALUES (:id, :wallet, :nickname, :name, :creator, FALSE, :now, :now)""",
        {
            "id": user_id,
            "wallet": f"wallet-{user_id}",
            "nickname": user_id,
            "name": user_id,
            "creator": is_creator,
            "now": utcnow(),
        },
    )


async def insert_post(
    db: databases.Database, post_id: str, creator_id: str, *, locked: bool = False, tier: str | None = None
) -> None:
    await db.execute(
        """INSERT INTO posts (id, "creatorId", title, content, type, "isLocked", "minSubscriptionTier",
           "likesCount", "createdAt", "updatedAt")
           VALUES (:id, :creator, :title, '', 'text', :locked, :tier, 0, :now, :now)""",
        {
            "id": post_id,
            "creator": creator_id,
            "title": f"Post {post_id}",
            "locked": locked,
            "tier": tier,
            "now": utcnow(),
        },
    )


async def insert_subscription(
    db: databases.Database,
    sub_id: str,
    user_id: str,
    creator_id: str,
    *,
    status: str = "COMPLETED",
    active: bool = True,
    valid_for: timedelta = timedelta(days=30),
) -> None:
    await db.execute(
        """INSERT INTO subscriptions (id, "userId", "creatorId", plan, price, "isActive", "validUntil",
           "paymentStatus", "createdAt")
           VALUES (:id, :user, :creator, 'basic', 5.0, :active, :until, :status, :now)""",
        {
            "id": sub_id,
            "user": user_id,
            "creator": creator_id,
            "active": active,
            "until": utcnow() + valid_for,
            "status": status,
            "now": utcnow(),
        },
    )


async def insert_conversation(
    db: databases.Database, conversation_id: str, from_user: str, to_user: str
) -> None:
    await db.execute(
        """INSERT INTO "Conversation"
           (id, "fromUserId", "toUserId", "lastMessageAt", "createdAt", "updatedAt")
           VALUES (:id, :from_user, :to_user, :now, :now, :now)""",
        {"id": conversation_id, "from_user": from_user, "to_user": to_user, "now": utcnow()},
    )


async def insert_message(
    db: databases.Database,
    message_id: str,
    conversation_id: str,
    sender_id: str,
    content: str | None,
    *,
    media_url: str | None = None,
    price: float | None = None,
) -> None:
    """A ``"Message"`` row; a ``price`` makes it a paid message."""
    await db.execute(
        """INSERT INTO "Message"
           (id, "conversationId", "senderId", content, "mediaUrl", "mediaType", "isPaid", price, "isRead",
           "createdAt")
           VALUES (:id, :conversation, :sender, :content, :media, :media_type, :paid, :price, FALSE, :now)""",
        {
            "id": message_id,
            "conversation": conversation_id,
            "sender": sender_id,
            "content": content,
            "media": media_url,
            "media_type": "image" if media_url else None,
            "paid": price is not None,
            "price": price,
            "now": utcnow(),
        },
    )


async def seed_demo(db: databases.Database) -> bool:
    """Add the demo rows once; returns True when it added any.

    The conversation is checked on its own: an embedded database seeded before it existed gains it.
    """
    added = False
    if await db.fetch_val("SELECT 1 FROM users WHERE id = :id", {"id": CREATOR}) is None:
        await insert_user(db, CREATOR, is_creator=True)
        await insert_user(db, SUBSCRIBER)
        await insert_user(db, OUTSIDER)
        await insert_post(db, OPEN_POST, CREATOR)
        await insert_post(db, LOCKED_POST, CREATOR, locked=True, tier="basic")
        await insert_subscription(db, "demo-subscription", SUBSCRIBER, CREATOR)
        added = True
    if await db.fetch_val('SELECT 1 FROM "Conversation" WHERE id = :id', {"id": CONVERSATION}) is None:
        await insert_conversation(db, CONVERSATION, SUBSCRIBER, CREATOR)
        await insert_message(db, "demo-message-1", CONVERSATION, SUBSCRIBER, "Loved the open post!")
        await insert_message(
            db, "demo-message-2", CONVERSATION, CREATOR, "The full set", media_url="/demo/set.jpg", price=2.5
        )
        added = True
    return added
