"""The operator commands' reads: a user or an open post to test with, one user's row, schema probes.

Kept with the rest of the SQL (``db/``) rather than in the CLI, so that one place knows the web app's
column names and quoting. Plain reads: the caller bounds them in time and words their failures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fonana_ws.db.store import Store


async def rows(store: Store, sql: str, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows as dicts."""
    return [dict(r._mapping) for r in await store.db.fetch_all(sql, values or {})]


async def find_user(
    store: Store, *, creator: bool = False, nickname: str | None = None
) -> dict[str, Any] | None:
    """A user to test with: by nickname, or a creator (one with posts first), or anyone (non-creators
    first). Ordered by id, so the same database gives the same answer."""
    where, values = [], {}
    if nickname is not None:
        where.append("u.nickname = :nickname")
        values["nickname"] = nickname
    if creator:
        where.append('u."isCreator" = TRUE')
    cond = " AND ".join(where) or "TRUE"
    base = f'SELECT u.id, u.nickname, u."isCreator" AS creator FROM users u WHERE {cond}'
    if creator:
        with_posts = ' AND EXISTS (SELECT 1 FROM posts p WHERE p."creatorId" = u.id)'
        found = await rows(store, base + with_posts + " ORDER BY u.id LIMIT 1", values)
        if found:
            return found[0]
    found = await rows(store, base + ' ORDER BY u."isCreator", u.id LIMIT 1', values)
    return found[0] if found else None


async def find_open_post(store: Store, creator: str | None = None) -> dict[str, Any] | None:
    """A post anyone may subscribe to (not locked, no tier), the given creator's first if any."""
    sql = (
        'SELECT id, "creatorId" AS creator FROM posts '
        'WHERE "isLocked" = FALSE AND "minSubscriptionTier" IS NULL'
    )
    if creator is not None:
        found = await rows(
            store, sql + ' AND "creatorId" = :creator ORDER BY id LIMIT 1', {"creator": creator}
        )
        if found:
            return found[0]
    found = await rows(store, sql + " ORDER BY id LIMIT 1")
    return found[0] if found else None


async def user_row(store: Store, user_id: str) -> dict[str, Any] | None:
    found = await rows(
        store,
        'SELECT id, nickname, wallet, "isCreator" AS creator FROM users WHERE id = :id',
        {"id": user_id},
    )
    return found[0] if found else None


async def probe(store: Store, table: str, columns: tuple[str, ...] = ()) -> None:
    """Raise the driver's error unless ``table`` (and each of ``columns``) can be read; reads no row.

    ``table`` is written as the server's queries write it (``users``, ``"Conversation"``).
    """
    cols = ", ".join(f'"{c}"' for c in columns) or "1"
    await store.db.fetch_all(f"SELECT {cols} FROM {table} WHERE 1 = 0")
