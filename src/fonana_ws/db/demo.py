"""Demo rows for the embedded default: enough to see every access rule work at once."""

from __future__ import annotations

from datetime import timedelta

import databases

from fonana_ws.db.store import utcnow

CREATOR = "demo-creator"
SUBSCRIBER = "demo-subscriber"
OUTSIDER = "demo-outsider"
OPEN_POST = "demo-post-open"
LOCKED_POST = "demo-post-locked"

DEMO_USERS = {
    CREATOR: "a creator with an open and a locked post",
    SUBSCRIBER: "a paying subscriber of the creator (may see the locked post)",
    OUTSIDER: "a user with no subscription (refused the locked post)",
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


async def seed_demo(db: databases.Database) -> bool:
    """Add the demo users once; returns True when it added them."""
    if await db.fetch_val("SELECT 1 FROM users WHERE id = :id", {"id": CREATOR}) is not None:
        return False
    await insert_user(db, CREATOR, is_creator=True)
    await insert_user(db, SUBSCRIBER)
    await insert_user(db, OUTSIDER)
    await insert_post(db, OPEN_POST, CREATOR)
    await insert_post(db, LOCKED_POST, CREATOR, locked=True, tier="basic")
    await insert_subscription(db, "demo-subscription", SUBSCRIBER, CREATOR)
    return True
