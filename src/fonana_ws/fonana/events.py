"""Every Fonana event of protocol §3, one function each: the Python API behind the HTTP API and the CLI.

Each ``prepare_*`` function checks its input, reads what the event needs from the database (and, for a
notification the caller asks the server to persist, writes the row) and returns an :class:`Emission`:
the event and where it goes. :class:`Events` publishes emissions through a :class:`Publisher`::

    from fonana_ws.fonana.events import connect_events

    async with connect_events() as ev:  # its own broker and database connections
        await ev.send_notification("user-1", "LIKE_POST", "New like", "Bob liked your post", persist=True)
        await ev.update_post_likes("post-1", "user-2", is_liked=True)

Inside the server, ``Events.from_services(services)`` shares the process's publisher and store.

Errors: ``PublishError`` (a ``ValueError``) for bad input, naming the field; :class:`NotFound` when a
referenced user, post or notification does not exist; :class:`Conflict` when a notification id is
taken by another user; ``BrokerUnavailable`` when the broker is down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from fonana_ws.broker import Broker
from fonana_ws.config import Settings, load_settings
from fonana_ws.db import Store
from fonana_ws.db import notifications as sql
from fonana_ws.db.schema import NOTIFICATION_TYPES
from fonana_ws.db.store import iso, utcnow
from fonana_ws.fonana.publisher import Publisher, PublishError
from fonana_ws.protocol.channels import MAX_ID_LENGTH, ChannelError, parse_key
from fonana_ws.protocol.frames import MAX_EVENT_DEPTH, nested_deeper_than

__all__ = [
    "Conflict",
    "Emission",
    "Events",
    "NotFound",
    "connect_events",
]


class NotFound(LookupError):
    """A user, post or notification the event refers to does not exist; the message names the field."""


class Conflict(Exception):
    """The request contradicts a stored row (a notification id that belongs to another user)."""


@dataclass
class Emission:
    """An event and its targets; ``id`` is the broker event id once published."""

    event: dict[str, Any]
    channels: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    id: str | None = None


# -- input checks (messages name the JSON field, as the HTTP API reports them) ----------------------------


def _id(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PublishError(f"{name} must be an id string")
    text = str(value)
    if not text or len(text) > MAX_ID_LENGTH:
        raise PublishError(f"{name} must be an id of 1 to {MAX_ID_LENGTH} characters")
    return text


def _text(name: str, value: Any, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise PublishError(f"{name} must be a string")
    return value


def _timestamp(name: str, value: Any) -> str:
    """An ISO 8601 timestamp (string or datetime) in the protocol's form, e.g. 2024-01-02T03:04:05.678Z."""
    if isinstance(value, datetime | str):
        try:
            return iso(value) or ""
        except ValueError:
            pass
    raise PublishError(f"{name} must be an ISO 8601 timestamp such as 2024-01-02T03:04:05.000Z")


def _json(name: str, value: Any) -> Any:
    if nested_deeper_than(value, MAX_EVENT_DEPTH):
        raise PublishError(f"{name} is nested deeper than {MAX_EVENT_DEPTH} levels")
    try:
        orjson.dumps(value)
    except TypeError:
        raise PublishError(
            f"{name} must be JSON (objects, lists, strings, numbers, booleans, null)"
        ) from None
    return value


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise PublishError(f"{name} must be an object")
    return dict(value)


async def _need_user(store: Store, name: str, user_id: str) -> None:
    if not await store.user_exists(user_id):
        raise NotFound(f"{name}: no user {user_id}")


async def _need_post(store: Store, name: str, post_id: str) -> None:
    if await store.get_post(post_id) is None:
        raise NotFound(f"{name}: no post {post_id}")


# -- notifications ------------------------------------------------------------------------------------


async def prepare_notification(
    store: Store,
    user_id: str,
    type: str,
    title: str,
    message: str,
    metadata: Any = None,
    persist: bool = False,
    *,
    notification_id: str | None = None,
    created_at: str | datetime | None = None,
) -> Emission:
    """``notification`` to every connection of the user.

    ``persist=True``: the server writes the ``notifications`` row (a new cuid-like id, or
    ``notification_id``) and the event carries the stored row. Sending again with the same
    ``notification_id`` reuses the row: never a second copy. ``persist=False``: the caller already wrote
    the row (pass its ``notification_id`` and ``created_at``) or wants a notification that is not kept.
    """
    user_id = _id("userId", user_id)
    if not sql.is_notification_type(type):
        raise PublishError(f"type must be one of {', '.join(NOTIFICATION_TYPES)}")
    title = _text("title", title) or ""
    message = _text("message", message) or ""
    metadata = _json("metadata", metadata)
    if not isinstance(persist, bool):
        raise PublishError("persist must be true or false")
    if notification_id is not None:
        notification_id = _id("id", notification_id)
    if created_at is not None:
        if persist:
            raise PublishError("createdAt: a notification the server persists gets the time it is written")
        created_at = _timestamp("createdAt", created_at)
    await _need_user(store, "userId", user_id)
    if persist:
        stored = await sql.get_notification(store.q, notification_id) if notification_id else None
        if stored is not None and stored["userId"] != user_id:
            raise Conflict(f"id: notification {notification_id} belongs to another user")
        notification = stored or await sql.insert_notification(
            store.q, user_id, type, title, message, metadata, notification_id=notification_id
        )
    else:
        notification = {
            "id": notification_id or sql.new_id(),
            "userId": user_id,
            "type": type,
            "title": title,
            "message": message,
            "isRead": False,
            "metadata": metadata,
            "createdAt": created_at or iso(utcnow()),
        }
    return Emission(
        {"type": "notification", "userId": user_id, "notification": notification}, users=[user_id]
    )


async def prepare_notification_read(store: Store, user_id: str, notification_id: str) -> Emission:
    """Mark the user's notification read (checking it is theirs); ``notification_read`` to the user."""
    user_id = _id("userId", user_id)
    notification_id = _id("notificationId", notification_id)
    await _need_user(store, "userId", user_id)
    if not await sql.mark_read(store.q, user_id, notification_id):
        raise NotFound(f"notificationId: user {user_id} has no notification {notification_id}")
    event = {"type": "notification_read", "userId": user_id, "notificationId": notification_id}
    return Emission(event, users=[user_id])


async def prepare_notifications_cleared(store: Store, user_id: str) -> Emission:
    """Mark all of the user's unread notifications read; ``notifications_cleared`` to the user."""
    user_id = _id("userId", user_id)
    await _need_user(store, "userId", user_id)
    await sql.clear(store.q, user_id)
    return Emission({"type": "notifications_cleared", "userId": user_id}, users=[user_id])


# -- posts and comments -----------------------------------------------------------------------------------


async def prepare_post_likes(store: Store, post_id: str, user_id: str, is_liked: bool) -> Emission:
    """``post_liked`` / ``post_unliked`` to ``post_P``, with ``likesCount`` as ``posts`` has it now."""
    post_id = _id("postId", post_id)
    user_id = _id("userId", user_id)
    if not isinstance(is_liked, bool):
        raise PublishError("isLiked must be true or false")
    likes = await sql.likes_count(store.q, post_id)
    if likes is None:
        raise NotFound(f"postId: no post {post_id}")
    await _need_user(store, "userId", user_id)
    event = {
        "type": "post_liked" if is_liked else "post_unliked",
        "postId": post_id,
        "userId": user_id,
        "likesCount": likes,
    }
    return Emission(event, channels=[f"post_{post_id}"])


async def prepare_post_created(
    store: Store, post: str | Mapping[str, Any], subscriber_ids: Iterable[str] | None = None
) -> Emission:
    """``post_created`` to ``creator_C`` and the ``feed_S`` of each subscriber, in one publish.

    ``post`` is a post id or an object with ``id`` (a whole post object is fine): the fields the event
    carries come from the ``posts`` row, overridden by ``title``/``type``/``thumbnail``/``createdAt``
    when given. ``subscriber_ids`` defaults to the creator's active paid subscribers.
    """
    given = {"id": post} if isinstance(post, str | int) and not isinstance(post, bool) else post
    given = _mapping("post", given)
    post_id = _id("post.id", given.get("id"))
    stored = await sql.post_summary(store.q, post_id)
    if stored is None:
        raise NotFound(f"post.id: no post {post_id}")
    creator_id = stored.pop("creatorId")
    if given.get("creatorId") is not None and _id("post.creatorId", given["creatorId"]) != creator_id:
        raise PublishError(f"post.creatorId: post {post_id} belongs to {creator_id}")
    for name in ("title", "type"):
        if name in given:
            stored[name] = _text(f"post.{name}", given[name])
    if "thumbnail" in given:
        stored["thumbnail"] = _text("post.thumbnail", given["thumbnail"], optional=True)
    if given.get("createdAt") is not None:
        stored["createdAt"] = _timestamp("post.createdAt", given["createdAt"])
    if subscriber_ids is None:
        subscribers = await sql.active_subscriber_ids(store.q, creator_id)
    else:
        if isinstance(subscriber_ids, str | bytes | Mapping) or not isinstance(subscriber_ids, Iterable):
            raise PublishError("subscriberIds must be a list of user ids")
        subscribers = [_id(f"subscriberIds[{i}]", s) for i, s in enumerate(subscriber_ids)]
    event = {"type": "post_created", "creatorId": creator_id, "post": stored}
    return Emission(event, channels=[f"creator_{creator_id}", *(f"feed_{s}" for s in subscribers)])


async def prepare_post_deleted(store: Store, post_id: str) -> Emission:
    """``post_deleted`` to ``post_P`` (the row may already be gone, so it is not looked up)."""
    post_id = _id("postId", post_id)
    return Emission({"type": "post_deleted", "postId": post_id}, channels=[f"post_{post_id}"])


async def prepare_comment_added(store: Store, post_id: str, comment: Mapping[str, Any]) -> Emission:
    """``comment_added`` to ``post_P``; ``comment`` has ``id``, ``userId``, ``content``, ``createdAt``."""
    post_id = _id("postId", post_id)
    given = _mapping("comment", comment)
    shaped = {
        "id": _id("comment.id", given.get("id")),
        "userId": _id("comment.userId", given.get("userId")),
        "content": _text("comment.content", given.get("content")),
        "createdAt": _timestamp("comment.createdAt", given["createdAt"])
        if given.get("createdAt") is not None
        else iso(utcnow()),
    }
    await _need_post(store, "postId", post_id)
    await _need_user(store, "comment.userId", shaped["userId"])
    return Emission(
        {"type": "comment_added", "postId": post_id, "comment": shaped}, channels=[f"post_{post_id}"]
    )


async def prepare_comment_deleted(store: Store, post_id: str, comment_id: str) -> Emission:
    """``comment_deleted`` to ``post_P``."""
    post_id = _id("postId", post_id)
    comment_id = _id("commentId", comment_id)
    await _need_post(store, "postId", post_id)
    event = {"type": "comment_deleted", "postId": post_id, "commentId": comment_id}
    return Emission(event, channels=[f"post_{post_id}"])


# -- creators, subscriptions, feeds -----------------------------------------------------------------------


async def prepare_creator_updated(store: Store, creator_id: str, changes: Mapping[str, Any]) -> Emission:
    """``creator_updated`` with the changed fields under ``data``, to ``creator_C``."""
    creator_id = _id("creatorId", creator_id)
    data = _json("changes", _mapping("changes", changes))
    if not data:
        raise PublishError("changes must name at least one changed field")
    await _need_user(store, "creatorId", creator_id)
    event = {"type": "creator_updated", "creatorId": creator_id, "data": data}
    return Emission(event, channels=[f"creator_{creator_id}"])


async def prepare_new_subscription(store: Store, creator_id: str, user_id: str) -> Emission:
    """``new_subscription`` to the creator's connections only (never the public ``creator_C``)."""
    creator_id = _id("creatorId", creator_id)
    user_id = _id("userId", user_id)
    await _need_user(store, "creatorId", creator_id)
    await _need_user(store, "userId", user_id)
    event = {"type": "new_subscription", "creatorId": creator_id, "userId": user_id}
    return Emission(event, users=[creator_id])


async def prepare_feed_update(store: Store, user_id: str, posts: list[Any]) -> Emission:
    """``feed_update`` with ``posts`` to every connection of the user."""
    user_id = _id("userId", user_id)
    if not isinstance(posts, list | tuple):
        raise PublishError("posts must be a list")
    posts = _json("posts", list(posts))
    await _need_user(store, "userId", user_id)
    return Emission({"type": "feed_update", "userId": user_id, "posts": posts}, users=[user_id])


# -- the API object -----------------------------------------------------------------------------------------


class Events:
    """One method per Fonana event; each prepares the event and publishes it, returning the Emission."""

    def __init__(self, publisher: Publisher, store: Store) -> None:
        self.publisher = publisher
        self.store = store

    @classmethod
    def from_services(cls, services: Any) -> Events:
        """The events API of a running server (``request.app.state.services``)."""
        return cls(services.publisher, services.store)

    async def emit(self, emission: Emission) -> Emission:
        if nested_deeper_than(emission.event, MAX_EVENT_DEPTH):
            raise PublishError(f"event is nested deeper than {MAX_EVENT_DEPTH} levels")
        event_id = await self.publisher.publish(
            emission.event, channels=emission.channels, users=emission.users
        )
        return replace(emission, id=event_id)

    async def send_notification(
        self,
        user_id: str,
        type: str,
        title: str,
        message: str,
        metadata: Any = None,
        persist: bool = False,
        *,
        notification_id: str | None = None,
        created_at: str | datetime | None = None,
    ) -> Emission:
        return await self.emit(
            await prepare_notification(
                self.store,
                user_id,
                type,
                title,
                message,
                metadata,
                persist,
                notification_id=notification_id,
                created_at=created_at,
            )
        )

    async def mark_notification_read(self, user_id: str, notification_id: str) -> Emission:
        return await self.emit(await prepare_notification_read(self.store, user_id, notification_id))

    async def clear_notifications(self, user_id: str) -> Emission:
        return await self.emit(await prepare_notifications_cleared(self.store, user_id))

    async def update_post_likes(self, post_id: str, user_id: str, is_liked: bool) -> Emission:
        return await self.emit(await prepare_post_likes(self.store, post_id, user_id, is_liked))

    async def notify_new_post(
        self, post: str | Mapping[str, Any], subscriber_ids: Iterable[str] | None = None
    ) -> Emission:
        return await self.emit(await prepare_post_created(self.store, post, subscriber_ids))

    async def notify_post_deleted(self, post_id: str) -> Emission:
        return await self.emit(await prepare_post_deleted(self.store, post_id))

    async def notify_new_comment(self, post_id: str, comment: Mapping[str, Any]) -> Emission:
        return await self.emit(await prepare_comment_added(self.store, post_id, comment))

    async def notify_comment_deleted(self, post_id: str, comment_id: str) -> Emission:
        return await self.emit(await prepare_comment_deleted(self.store, post_id, comment_id))

    async def notify_creator_update(self, creator_id: str, changes: Mapping[str, Any]) -> Emission:
        return await self.emit(await prepare_creator_updated(self.store, creator_id, changes))

    async def notify_new_subscription(self, creator_id: str, user_id: str) -> Emission:
        return await self.emit(await prepare_new_subscription(self.store, creator_id, user_id))

    async def update_user_feed(self, user_id: str, posts: list[Any]) -> Emission:
        return await self.emit(await prepare_feed_update(self.store, user_id, posts))

    async def publish(self, target: str, event: dict[str, Any]) -> Emission:
        """Any event (``earnings_updated``, ``post_updated``, ...) to a channel key or a user.

        ``target`` is a channel key when it is one (``notifications_U``, ``feed_U``, ``creator_C``,
        ``post_P``), else a user id. ``publish_to`` says which explicitly, and takes both at once.
        """
        try:
            parse_key(target)
        except ChannelError:
            return await self.publish_to(event, user=target)
        return await self.publish_to(event, channel=target)

    async def publish_to(
        self, event: dict[str, Any], *, channel: str | None = None, user: str | None = None
    ) -> Emission:
        """Any event to a channel key and/or a user; a connection reached both ways receives it once."""
        emission = Emission(
            event, channels=[channel] if channel is not None else [], users=[user] if user is not None else []
        )
        return await self.emit(emission)


@asynccontextmanager
async def connect_events(settings: Settings | None = None) -> AsyncIterator[Events]:
    """``async with connect_events() as ev``: the events API on its own broker and database connections.

    For Python services outside the server. With the ``memory://`` broker nothing leaves this process:
    set ``BROADCAST_URL`` (or ``REDIS_URL``) to the broker the server uses.
    """
    settings = settings or load_settings()
    store = Store(settings.database_url)
    broker = Broker(settings.broadcast_url)
    await store.connect()
    try:
        await broker.connect()
        try:
            yield Events(Publisher(broker, max_event_size=settings.max_event_size), store)
        finally:
            await broker.disconnect()
    finally:
        await store.disconnect()
