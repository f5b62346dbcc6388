"""The SQL behind the typed events: notifications (insert, read, clear) and the reads events need.

The same SQL runs on SQLite and PostgreSQL: camelCase columns are quoted, and the two PostgreSQL-only
column types of ``notifications`` (the ``"NotificationType"`` enum and ``metadata`` JSONB) get a
``CAST`` only when the dialect is PostgreSQL. Timestamps are naive UTC, as Prisma stores them.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

from fonana_ws.db.schema import NOTIFICATION_TYPES
from fonana_ws.db.store import is_postgres, iso, notification_row, utcnow

if TYPE_CHECKING:
    from fonana_ws.db.store import Queries

_COLUMNS = 'id, "userId", type, title, message, "isRead", metadata, "createdAt"'
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_counter = itertools.count(secrets.randbelow(36**4))


def _base36(n: int, width: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = _B36[r] + out
    return out.rjust(width, "0")[-width:]


_FINGERPRINT = _base36(os.getpid() % 1296, 2) + _base36(sum(socket.gethostname().encode()) % 1296, 2)


def new_id() -> str:
    """A cuid-like id (``c`` + time + counter + host fingerprint + random: 25 lowercase characters)."""
    return (
        "c"
        + _base36(int(time.time() * 1000), 8)
        + _base36(next(_counter) % 36**4, 4)
        + _FINGERPRINT
        + _base36(secrets.randbelow(36**8), 8)
    )


def is_notification_type(value: Any) -> bool:
    return isinstance(value, str) and value in NOTIFICATION_TYPES


async def get_notification(db: Queries, notification_id: str) -> dict[str, Any] | None:
    """The NOTIFICATION object of one row, or None."""
    row = await db.fetch_one(f"SELECT {_COLUMNS} FROM notifications WHERE id = :id", {"id": notification_id})
    return notification_row(row) if row is not None else None


async def insert_notification(
    db: Queries,
    user_id: str,
    type: str,
    title: str,
    message: str,
    metadata: Any = None,
    *,
    notification_id: str | None = None,
) -> dict[str, Any]:
    """Write one ``notifications`` row and return it as stored (the NOTIFICATION object)."""
    if not is_notification_type(type):
        raise ValueError(f"type must be one of {', '.join(NOTIFICATION_TYPES)}")
    pg = is_postgres(db)
    type_sql = 'CAST(:type AS "NotificationType")' if pg else ":type"
    meta_sql = "CAST(:meta AS JSONB)" if pg else ":meta"
    notification_id = notification_id or new_id()
    await db.execute(
        f"""INSERT INTO notifications (id, "userId", type, title, message, "isRead", metadata, "createdAt")
            VALUES (:id, :user, {type_sql}, :title, :message, FALSE, {meta_sql}, :now)""",
        {
            "id": notification_id,
            "user": user_id,
            "type": type,
            "title": title,
            "message": message,
            "meta": json.dumps(metadata) if metadata is not None else None,
            "now": utcnow(),
        },
    )
    stored = await get_notification(db, notification_id)
    assert stored is not None
    return stored


async def mark_read(db: Queries, user_id: str, notification_id: str) -> bool:
    """Mark one of ``user_id``'s notifications read; False when there is no such row for that user."""
    owner = await db.fetch_val('SELECT "userId" FROM notifications WHERE id = :id', {"id": notification_id})
    if owner is None or str(owner) != user_id:
        return False
    await db.execute(
        'UPDATE notifications SET "isRead" = TRUE WHERE id = :id AND "userId" = :user',
        {"id": notification_id, "user": user_id},
    )
    return True


async def clear(db: Queries, user_id: str) -> int:
    """Mark every unread notification of ``user_id`` read; returns how many were unread."""
    where = 'WHERE "userId" = :user AND "isRead" = FALSE'
    count = await db.fetch_val(f"SELECT COUNT(*) FROM notifications {where}", {"user": user_id})
    await db.execute(f'UPDATE notifications SET "isRead" = TRUE {where}', {"user": user_id})
    return int(count or 0)


async def likes_count(db: Queries, post_id: str) -> int | None:
    """``posts.likesCount`` of a post, or None when there is no such post."""
    row = await db.fetch_one('SELECT "likesCount" FROM posts WHERE id = :id', {"id": post_id})
    return int(row._mapping["likesCount"] or 0) if row is not None else None


async def post_summary(db: Queries, post_id: str) -> dict[str, Any] | None:
    """The post as ``post_created`` carries it, plus ``creatorId``; None when there is no such post."""
    row = await db.fetch_one(
        'SELECT id, "creatorId", title, type, thumbnail, "createdAt" FROM posts WHERE id = :id',
        {"id": post_id},
    )
    if row is None:
        return None
    r = row._mapping
    return {
        "id": str(r["id"]),
        "creatorId": str(r["creatorId"]),
        "title": r["title"],
        "type": r["type"],
        "thumbnail": r["thumbnail"],
        "createdAt": iso(r["createdAt"]),
    }


async def active_subscriber_ids(db: Queries, creator_id: str) -> list[str]:
    """The users with an active, paid, unexpired subscription to ``creator_id`` (protocol §2's rule)."""
    rows = await db.fetch_all(
        """SELECT DISTINCT "userId" FROM subscriptions WHERE "creatorId" = :creator AND "isActive" = TRUE
           AND "paymentStatus" = 'COMPLETED' AND "validUntil" > :now
           ORDER BY "userId"
        """,
        {"creator": creator_id, "now": utcnow()},
    )
    return [str(r._mapping["userId"]) for r in rows]
