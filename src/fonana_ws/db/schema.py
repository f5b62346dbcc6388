"""The tables of protocol §4 and §7.11, for the embedded default and the tests only.

Against the web app's PostgreSQL the server never creates or alters these tables: Prisma owns them.
The DDL follows what Prisma generates (quoted camelCase columns, TIMESTAMP(3), enum types on PostgreSQL)
so that the tests exercise the same SQL that production runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import databases

PAYMENT_STATUSES = ("PENDING", "PROCESSING", "COMPLETED", "FAILED", "REFUNDED")
NOTIFICATION_TYPES = (
    "LIKE_POST",
    "LIKE_COMMENT",
    "COMMENT_POST",
    "REPLY_COMMENT",
    "NEW_SUBSCRIBER",
    "POST_PURCHASE",
    "MESSAGE_PURCHASE",
    "SUBSCRIPTION_PURCHASE",
    "TIP_RECEIVED",
    "POST_SALE",
    "SYSTEM_ANNOUNCEMENT",
    "NEW_MESSAGE",
    "NEW_POST_FROM_SUBSCRIPTION",
)


def _tables(ts: str, pay: str, ntype: str, jsonb: str, boolean: str) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS users (
            id TEXT PRIMARY KEY, wallet TEXT NOT NULL UNIQUE, nickname TEXT UNIQUE, "fullName" TEXT,
            name TEXT, email TEXT, avatar TEXT, "isCreator" {boolean} NOT NULL DEFAULT false,
            "isVerified" {boolean} NOT NULL DEFAULT false,
            "createdAt" {ts} NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" {ts} NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS posts (
            id TEXT PRIMARY KEY, "creatorId" TEXT NOT NULL REFERENCES users(id), title TEXT NOT NULL,
            content TEXT NOT NULL DEFAULT '', type TEXT NOT NULL DEFAULT 'text', thumbnail TEXT,
            "mediaUrl" TEXT, "isLocked" {boolean} NOT NULL DEFAULT false, "minSubscriptionTier" TEXT,
            "likesCount" INTEGER NOT NULL DEFAULT 0, "commentsCount" INTEGER NOT NULL DEFAULT 0,
            "viewsCount" INTEGER NOT NULL DEFAULT 0,
            "createdAt" {ts} NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" {ts} NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS subscriptions (
            id TEXT PRIMARY KEY, "userId" TEXT NOT NULL REFERENCES users(id),
            "creatorId" TEXT NOT NULL REFERENCES users(id), plan TEXT NOT NULL DEFAULT 'basic',
            price DOUBLE PRECISION NOT NULL DEFAULT 0, "isActive" {boolean} NOT NULL DEFAULT true,
            "validUntil" {ts} NOT NULL, "paymentStatus" {pay} NOT NULL DEFAULT 'PENDING',
            "createdAt" {ts} NOT NULL DEFAULT CURRENT_TIMESTAMP, UNIQUE ("userId", "creatorId"))""",
        f"""CREATE TABLE IF NOT EXISTS post_purchases (
            id TEXT PRIMARY KEY, "postId" TEXT NOT NULL REFERENCES posts(id),
            "userId" TEXT NOT NULL REFERENCES users(id), "paymentStatus" {pay} NOT NULL DEFAULT 'PENDING',
            "purchasedAt" {ts} NOT NULL DEFAULT CURRENT_TIMESTAMP, UNIQUE ("userId", "postId"))""",
        f"""CREATE TABLE IF NOT EXISTS notifications (
            id TEXT PRIMARY KEY, "userId" TEXT NOT NULL REFERENCES users(id), type {ntype} NOT NULL,
            title TEXT NOT NULL, message TEXT NOT NULL, "isRead" {boolean} NOT NULL DEFAULT false,
            metadata {jsonb}, "createdAt" {ts} NOT NULL DEFAULT CURRENT_TIMESTAMP)""",
        'CREATE INDEX IF NOT EXISTS "notifications_userId_isRead_idx" ON notifications ("userId", "isRead")',
        # Prisma models without @@map keep their model name: "Conversation" and "Message", quoted.
        f"""CREATE TABLE IF NOT EXISTS "Conversation" (
            id TEXT PRIMARY KEY, "fromUserId" TEXT NOT NULL REFERENCES users(id),
            "toUserId" TEXT NOT NULL REFERENCES users(id), "lastMessageAt" {ts},
            "createdAt" {ts} NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" {ts} NOT NULL,
            UNIQUE ("fromUserId", "toUserId"))""",
        f"""CREATE TABLE IF NOT EXISTS "Message" (
            id TEXT PRIMARY KEY, "conversationId" TEXT NOT NULL REFERENCES "Conversation"(id),
            "senderId" TEXT NOT NULL REFERENCES users(id), content TEXT, "mediaUrl" TEXT, "mediaType" TEXT,
            "isPaid" {boolean} NOT NULL DEFAULT false, price DOUBLE PRECISION,
            "isRead" {boolean} NOT NULL DEFAULT false,
            "createdAt" {ts} NOT NULL DEFAULT CURRENT_TIMESTAMP, metadata {jsonb})""",
        'CREATE INDEX IF NOT EXISTS "Message_conversationId_idx" ON "Message" ("conversationId")',
        f"""CREATE TABLE IF NOT EXISTS user_settings (
            id TEXT PRIMARY KEY, "userId" TEXT NOT NULL UNIQUE REFERENCES users(id),
            "showOnlineStatus" {boolean} NOT NULL DEFAULT true,
            "allowMessages" {boolean} NOT NULL DEFAULT true)""",
    ]


async def create_schema(db: databases.Database) -> None:
    """Create the web app's tables as Prisma would (idempotent); for the embedded default and tests."""
    if db.url.dialect == "postgresql":
        for name, values in (("PaymentStatus", PAYMENT_STATUSES), ("NotificationType", NOTIFICATION_TYPES)):
            labels = ", ".join(f"'{v}'" for v in values)
            await db.execute(
                f"""DO $$ BEGIN CREATE TYPE "{name}" AS ENUM ({labels});
                EXCEPTION WHEN duplicate_object THEN NULL; END $$"""
            )
        statements = _tables("TIMESTAMP(3)", '"PaymentStatus"', '"NotificationType"', "JSONB", "BOOLEAN")
    else:
        statements = _tables("TIMESTAMP", "TEXT", "TEXT", "TEXT", "BOOLEAN")
    for statement in statements:
        await db.execute(statement)
