"""The few queries the server runs, the same SQL on SQLite and PostgreSQL.

Columns keep Prisma's camelCase, so every one is quoted. Timestamps are naive UTC, as Prisma stores them
in ``TIMESTAMP(3)`` columns.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fonana_ws.db.schema import create_schema
from fonana_ws.db.user_lookup import PostgresUsers, UserLookup

UNREAD_LIMIT = 20

#: The web app's tables and columns this server reads (``fonana-ws doctor`` checks they exist).
SERVER_READS: dict[str, tuple[str, ...]] = {
    "users": ("id",),
    "posts": (
        "id",
        "creatorId",
        "title",
        "type",
        "thumbnail",
        "isLocked",
        "minSubscriptionTier",
        "likesCount",
        "createdAt",
    ),
    "subscriptions": ("userId", "creatorId", "isActive", "paymentStatus", "validUntil"),
    "post_purchases": ("userId", "postId", "paymentStatus"),
    "notifications": ("id", "userId", "type", "title", "message", "isRead", "metadata", "createdAt"),
    # A Prisma model without @@map: the name is quoted here, so that doctor's query keeps its case.
    '"Conversation"': ("id", "fromUserId", "toUserId"),
    # Online status (protocol §7.3): a missing table would make every user look hidden.
    "user_settings": ("userId", "showOnlineStatus"),
}


#: What queries run on: the ``Database`` (its pool) or one of its ``Connection``s; same query methods.
if TYPE_CHECKING:
    import databases

    Queries = databases.Database | databases.core.Connection


def is_postgres(q: Queries) -> bool:
    """Only the PostgreSQL side runs on the ``Database`` itself (SQLite shares a ``Connection``)."""
    # A Database has a url, a Connection (inside a transaction) does not: the same test as isinstance
    # without importing databases (and SQLAlchemy, ~150 ms) at module level.
    url = getattr(q, "url", None)
    return url is not None and url.dialect == "postgresql"


def utcnow() -> datetime:
    """Naive UTC now, the way Prisma writes ``TIMESTAMP(3)`` columns."""
    return datetime.now(UTC).replace(tzinfo=None)


def epoch(value: Any) -> float:
    """A timestamp column (naive UTC, as Prisma writes them; or aware; SQLite may give text) as epoch
    seconds."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def iso(value: Any) -> str | None:
    """ISO 8601 with milliseconds and ``Z``, as the web app's ``Date.toISOString()`` prints."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def notification_row(row: Any) -> dict[str, Any]:
    """A ``notifications`` row as the NOTIFICATION object of protocol §3."""
    r = dict(row._mapping)
    metadata = r.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            pass
    return {
        "id": str(r["id"]),
        "userId": str(r["userId"]),
        "type": str(r["type"]),
        "title": r["title"],
        "message": r["message"],
        "isRead": bool(r["isRead"]),
        "metadata": metadata,
        "createdAt": iso(r["createdAt"]),
    }


class AccessCache:
    """Access decisions, allowed and denied, remembered for ``ttl`` seconds: ``(user, key) -> bool``.

    A subscribe to a post costs up to three queries (post, subscription, purchase) and a client may send
    the same one again and again; with this, the same user and key cost one round per ``ttl`` whatever
    the rate. The price is that a change of access (a purchase, a cancelled subscription) reaches new
    subscribes up to ``ttl`` seconds late. Every entry lives ``ttl`` seconds, so insertion order is expiry
    order: at ``size`` entries the oldest (the next to expire) goes first.
    """

    def __init__(self, ttl: float = 5.0, size: int = 10_000) -> None:
        self.ttl = ttl
        self.size = size
        #: (user, key) -> (monotonic expiry, decision), oldest first. A decision is ``fonana.policy``'s
        #: ``Access``: True, False, or the epoch seconds until which a subscription allows.
        self._entries: OrderedDict[tuple[str, str], tuple[float, bool | float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user_id: str, key: str) -> bool | float | None:
        """The remembered decision, or None when there is none (or it expired)."""
        entry = self._entries.get((user_id, key))
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[(user_id, key)]
            return None
        return entry[1]

    def put(self, user_id: str, key: str, allowed: bool | float) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        entry = (user_id, key)
        self._entries.pop(entry, None)
        self._entries[entry] = (time.monotonic() + self.ttl, allowed)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, user_id: str | None = None, key: str | None = None) -> None:
        """Drop the decisions about one user, or one key, or one user's of one key (all without either)."""
        if user_id is None and key is None:
            self._entries.clear()
            return
        for entry in [
            e for e in self._entries if (user_id is None or e[0] == user_id) and (key is None or e[1] == key)
        ]:
            del self._entries[entry]


class Store:
    """The server's view of the web app's database."""

    def __init__(
        self,
        url: str,
        *,
        user_cache_ttl: float = 60.0,
        user_cache_size: int = 100_000,
        access_cache_ttl: float = 5.0,
        access_cache_size: int = 10_000,
    ) -> None:
        self.url = url
        import databases  # here, not at module level: the CLI's commands that never open a store skip it

        self.db = databases.Database(url)
        self._user_ttl = user_cache_ttl
        self._user_cache_size = user_cache_size
        #: user id -> monotonic time until which it is known to exist (positive answers only).
        self._known_users: dict[str, float] = {}
        #: Access decisions of ``fonana.policy.may_subscribe`` (0 s: every subscribe asks the database).
        self.access = AccessCache(access_cache_ttl, access_cache_size)
        #: user id -> (hides their online status, monotonic expiry): ``hidden_status``'s short cache.
        self._hidden: dict[str, tuple[bool, float]] = {}
        #: user -> ((nickname, avatar) or None for no such user, monotonic expiry): ``profiles``.
        self._profiles: dict[str, tuple[tuple[str | None, str | None] | None, float]] = {}
        #: Where queries run: the pool (PostgreSQL), or one shared connection (SQLite; see ``connect``).
        self.q: Queries = self.db
        #: PostgreSQL's user lookups on a small asyncpg pool of their own (a prepared statement, no
        #: SQLAlchemy compile per connect); SQLite's through ``q``. Either way batched (``UserLookup``).
        self._pg_users = PostgresUsers(url) if self.dialect == "postgresql" else None
        self.users = UserLookup(self._pg_users.fetch if self._pg_users else self._sqlite_users)
        #: Who hides their online status: asked at every user's online/offline, batched the same way.
        self.hiders = UserLookup(self._pg_users.fetch_hidden if self._pg_users else self._sqlite_hiders)

    @property
    def dialect(self) -> str:
        return self.db.url.dialect

    async def connect(self) -> None:
        await self.db.connect()
        if self.dialect == "sqlite":
            # `databases` gives every asyncio task its own connection; on SQLite that is a new thread and
            # a file open for each WebSocket (~1 ms a connect). SQLite serializes writes anyway: share one.
            shared = self.db.connection()
            await shared.__aenter__()
            self.q = shared
        if self._pg_users is not None:
            await self._pg_users.open()

    async def disconnect(self) -> None:
        if self._pg_users is not None:
            await self._pg_users.close()
        if self.q is not self.db:
            await self.q.__aexit__(None, None, None)
            self.q = self.db
        await self.db.disconnect()

    async def create_schema(self) -> None:
        await create_schema(self.db)

    async def ping(self) -> None:
        """Raise if the database cannot answer a query."""
        await self.q.fetch_val("SELECT 1")

    async def user_exists(self, user_id: str) -> bool:
        """Is there such a user? Every connect asks, so a yes is remembered for ``user_cache_ttl`` seconds.

        Reconnect storms and many tabs ask about the same users again and again; the lookup is the
        costliest part of a connect (~200 µs through ``databases``, and on SQLite a worker thread
        competing for the GIL). A no is never remembered: a user the web app just created connects at once.
        """
        now = time.monotonic()
        if self._known_users.get(user_id, 0.0) > now:
            return True
        found = await self.users.exists(user_id)
        if found and self._user_ttl > 0:
            if len(self._known_users) >= self._user_cache_size:
                self._known_users = {u: t for u, t in self._known_users.items() if t > now}
                if len(self._known_users) >= self._user_cache_size:
                    self._known_users.clear()
            self._known_users[user_id] = now + self._user_ttl
        return found

    async def _sqlite_users(self, user_ids: Sequence[str]) -> set[str]:
        marks = ", ".join(f":u{i}" for i in range(len(user_ids)))
        rows = await self.q.fetch_all(
            f"SELECT id FROM users WHERE id IN ({marks})", {f"u{i}": u for i, u in enumerate(user_ids)}
        )
        return {row[0] for row in rows}

    async def _sqlite_hiders(self, user_ids: Sequence[str]) -> set[str]:
        names = {f"u{i}": user for i, user in enumerate(user_ids)}
        rows = await self.q.fetch_all(
            'SELECT "userId" FROM user_settings WHERE "showOnlineStatus" = FALSE AND "userId" IN ('
            + ", ".join(f":{name}" for name in names)
            + ")",
            names,
        )
        return {str(r._mapping["userId"]) for r in rows}

    async def get_post(self, post_id: str) -> dict[str, Any] | None:
        row = await self.q.fetch_one(
            """SELECT id, "creatorId", "isLocked", "minSubscriptionTier", "likesCount"
               FROM posts WHERE id = :id""",
            {"id": post_id},
        )
        return dict(row._mapping) if row is not None else None

    async def has_active_subscription(self, user_id: str, creator_id: str) -> bool:
        row = await self.q.fetch_val(
            """SELECT 1 FROM subscriptions WHERE "userId" = :user AND "creatorId" = :creator
               AND "isActive" = TRUE AND "paymentStatus" = 'COMPLETED' AND "validUntil" > :now""",
            {"user": user_id, "creator": creator_id, "now": utcnow()},
        )
        return row is not None

    async def subscription_until(self, user_id: str, creator_id: str) -> float | None:
        """When the user's active, paid subscription to the creator ends (epoch seconds), or None."""
        value = await self.q.fetch_val(
            """SELECT "validUntil" FROM subscriptions WHERE "userId" = :user AND "creatorId" = :creator
               AND "isActive" = TRUE AND "paymentStatus" = 'COMPLETED' AND "validUntil" > :now""",
            {"user": user_id, "creator": creator_id, "now": utcnow()},
        )
        return epoch(value) if value is not None else None

    async def post_access(self, post_id: str, user_ids: list[str]) -> dict[str, bool | float]:
        """The §2 rule for many users of one post, in two queries (the post, then all users at once):
        user -> True (creator, open post, or a purchase), False, or the epoch seconds until which their
        subscription allows. No such post: False for everyone."""
        post = await self.get_post(post_id)
        users = list(dict.fromkeys(user_ids))
        if post is None:
            return dict.fromkeys(users, False)
        creator = str(post["creatorId"])
        if not post["isLocked"] and not post["minSubscriptionTier"]:
            return dict.fromkeys(users, True)
        names = {f"u{i}": user for i, user in enumerate(users)}
        rows = await self.q.fetch_all(
            """SELECT u.id,
                (SELECT max(s."validUntil") FROM subscriptions s WHERE s."userId" = u.id
                 AND s."creatorId" = :creator AND s."isActive" = TRUE AND s."paymentStatus" = 'COMPLETED'
                 AND s."validUntil" > :now) AS until,
                EXISTS (SELECT 1 FROM post_purchases b WHERE b."userId" = u.id AND b."postId" = :post
                 AND b."paymentStatus" = 'COMPLETED') AS bought
               FROM users u WHERE u.id IN ("""
            + ", ".join(f":{n}" for n in names)
            + ")",
            {**names, "creator": creator, "post": post_id, "now": utcnow()},
        )
        found: dict[str, bool | float] = dict.fromkeys(users, False)
        for row in rows:
            r = row._mapping
            user = str(r["id"])
            if user == creator or r["bought"]:
                found[user] = True
            elif r["until"] is not None:
                found[user] = epoch(r["until"])
        return found

    async def has_purchase(self, user_id: str, post_id: str) -> bool:
        row = await self.q.fetch_val(
            """SELECT 1 FROM post_purchases WHERE "userId" = :user AND "postId" = :post
               AND "paymentStatus" = 'COMPLETED'""",
            {"user": user_id, "post": post_id},
        )
        return row is not None

    async def conversation_participants(self, conversation_id: str) -> tuple[str, str] | None:
        """``(fromUserId, toUserId)`` of a ``"Conversation"`` row, or None when there is no such row.

        Not cached here: the channel policy caches its decision in ``access`` (5 s), and a deleted
        conversation must stop being joinable.
        """
        row = await self.q.fetch_one(
            'SELECT "fromUserId", "toUserId" FROM "Conversation" WHERE id = :id', {"id": conversation_id}
        )
        if row is None:
            return None
        r = row._mapping
        return str(r["fromUserId"]), str(r["toUserId"])

    async def hidden_status(self, user_ids: list[str], *, ttl: float = 5.0) -> set[str]:
        """Those of ``user_ids`` whose ``user_settings.showOnlineStatus`` is false (protocol §7.3).

        No row means shown. Each answer is remembered ``ttl`` seconds: every status change and snapshot
        asks, and a user who flips the setting is obeyed within 5 s. At most 10,000 answers are kept.
        """
        now = time.monotonic()
        hidden: set[str] = set()
        ask: list[str] = []
        for user in dict.fromkeys(user_ids):
            cached = self._hidden.get(user)
            if cached is not None and cached[1] > now:
                if cached[0]:
                    hidden.add(user)
            else:
                ask.append(user)
        if ask:
            answers = await asyncio.gather(*(self.hiders.exists(user) for user in ask))
            found = {user for user, hides in zip(ask, answers, strict=True) if hides}
            hidden |= found
            if len(self._hidden) + len(ask) > 10_000:
                self._hidden = {u: v for u, v in self._hidden.items() if v[1] > now}
                if len(self._hidden) + len(ask) > 10_000:
                    self._hidden.clear()
            for user in ask:
                self._hidden[user] = (user in found, now + ttl)
        return hidden

    async def profiles(
        self, user_ids: list[str], *, ttl: float = 60.0
    ) -> dict[str, tuple[str | None, str | None]]:
        """user -> (nickname, avatar) for those of ``user_ids`` that exist (presence frames, §7.4).

        Remembered ``ttl`` seconds, at most 10,000: the users of a busy channel join and leave again and
        again, and a new nickname may show a minute late.
        """
        now = time.monotonic()
        found: dict[str, tuple[str | None, str | None]] = {}
        ask: list[str] = []
        for user in dict.fromkeys(user_ids):
            cached = self._profiles.get(user)
            if cached is not None and cached[1] > now:
                if cached[0] is not None:
                    found[user] = cached[0]
            else:
                ask.append(user)
        if not ask:
            return found
        names = {f"u{i}": user for i, user in enumerate(ask)}
        rows = await self.q.fetch_all(
            "SELECT id, nickname, avatar FROM users WHERE id IN (" + ", ".join(f":{n}" for n in names) + ")",
            names,
        )
        fetched = {str(r._mapping["id"]): (r._mapping["nickname"], r._mapping["avatar"]) for r in rows}
        if len(self._profiles) + len(ask) > 10_000:
            self._profiles = {u: v for u, v in self._profiles.items() if v[1] > now}
            if len(self._profiles) + len(ask) > 10_000:
                self._profiles.clear()
        for user in ask:
            self._profiles[user] = (fetched.get(user), now + ttl)
        return {**found, **fetched}

    async def unread_notifications(self, user_id: str, limit: int = UNREAD_LIMIT) -> list[dict[str, Any]]:
        rows = await self.q.fetch_all(
            """SELECT id, "userId", type, title, message, "isRead", metadata, "createdAt" FROM notifications
               WHERE "userId" = :user AND "isRead" = FALSE ORDER BY "createdAt" DESC, id DESC LIMIT :limit""",
            {"user": user_id, "limit": limit},
        )
        return [notification_row(r) for r in rows]
