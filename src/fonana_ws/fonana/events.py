"""Every Fonana event of protocol §3, described once, in :data:`EVENTS`.

An entry (:class:`Event`) holds the event's type, a summary, its body fields (name, kind, doc,
required, Python keyword: :mod:`fonana_ws.fonana.fields`), who receives it, an example body and its
delivery rule: an async ``prepare_*`` function of the store and the checked fields that reads what the
event needs from the database (and, for a notification the caller asks the server to persist, writes
the row) and returns an :class:`Emission`, the event and where it goes. Everything else is generated
from the table, with the one rule set of ``fields`` checking every body:

- ``POST /api/events/<name>`` and its OpenAPI path (``web/events_api.py``);
- the :class:`Events` methods (``send_notification``, ``notify_new_post``, ...), real signatures and
  docstrings included, and ``Events.emit(name, **fields)`` for any of them;
- ``fonana-ws send <name>`` (``cli/fonana_ws_cli/send.py``): options named after the fields.

**Adding an event** is one entry in :data:`EVENTS` plus its ``prepare_*`` rule; the API guide's and
docs/protocol.md's event tables must list it (tests/unit/test_events_table.py holds them equal)::

    from fonana_ws.fonana.events import connect_events

    async with connect_events() as ev:  # its own broker and database connections
        await ev.send_notification("user-1", "LIKE_POST", "New like", "Bob liked your post", persist=True)
        await ev.update_post_likes("post-1", "user-2", is_liked=True)
        await ev.emit("post-deleted", postId="post-1")  # by route name, fields by JSON name

Inside the server, ``Events.from_services(services)`` shares the process's publisher and store.

Errors (the table of answers is :mod:`fonana_ws.fonana.errors`): ``PublishError`` (a ``ValueError``)
for bad input, naming the field; ``NotFound`` when a referenced user, post, notification or
conversation does not exist; ``Conflict`` when a notification id is taken by another user, or a message's
sender or reader is not a participant of the conversation; ``BrokerUnavailable`` when the broker is down.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from fonana_ws.broker import Broker
from fonana_ws.broker.history import HistoryLimits
from fonana_ws.config import Settings, load_settings
from fonana_ws.db import Store
from fonana_ws.db import notifications as sql
from fonana_ws.db.store import iso, utcnow
from fonana_ws.fonana.errors import Conflict, NotFound
from fonana_ws.fonana.fields import (
    AMOUNT,
    BOOLEAN,
    CHANGES,
    ID,
    IDS,
    JSON,
    LIST,
    NOTIFICATION_TYPE,
    PRICE,
    STRING,
    STRING_OR_NULL,
    TIMESTAMP,
    Field,
    check_body,
    record,
)
from fonana_ws.fonana.publisher import Publisher, PublishError
from fonana_ws.protocol.channels import ChannelError, parse_key

__all__ = [
    "BY_NAME",
    "EVENTS",
    "OTHER_EVENT_TYPES",
    "Conflict",
    "Emission",
    "Event",
    "Events",
    "NotFound",
    "connect_events",
]


@dataclass
class Emission:
    """An event and its targets; ``id`` is the broker event id once published."""

    event: dict[str, Any]
    channels: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    id: str | None = None


Rule = Callable[..., Awaitable[Emission]]


@dataclass(frozen=True)
class Event:
    """One entry of the table."""

    event: str  # the type it sends (post_liked)
    summary: str
    delivered_to: str
    fields: tuple[Field, ...]
    #: A body the event accepts: the OpenAPI example, the CLI's epilog, a unit test's input.
    example: dict[str, Any]
    #: ``rule(store, **checked fields by keyword) -> Emission``: the database reads and the targets.
    rule: Rule
    #: The :class:`Events` method.
    method: str
    #: What the rule refuses with besides bad input (the OpenAPI document lists their statuses).
    raises: tuple[type[Exception], ...] = (NotFound,)
    #: More of the body's JSON Schema: rules between fields, which the rule enforces (400).
    schema_rules: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """The route segment, the ``fonana-ws send`` subcommand and ``emit``'s name: ``post-liked``."""
        return self.event.replace("_", "-")

    def validate(self, body: Any) -> dict[str, Any]:
        """The rule's keyword arguments, or ``PublishError`` naming the field."""
        return check_body(self.fields, body)

    async def prepare(self, store: Store, body: Any) -> Emission:
        """Check ``body`` (the JSON body, fields by JSON name) and run the delivery rule."""
        return await self.rule(store, **self.validate(body))

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the body."""
        return {
            "type": "object",
            "required": [f.name for f in self.fields if f.required],
            "properties": {f.name: f.schema() for f in self.fields},
            "additionalProperties": False,
            **dict(self.schema_rules),
        }


async def _need_user(store: Store, name: str, user_id: str) -> None:
    if not await store.user_exists(user_id):
        raise NotFound(f"{name}: no user {user_id}")


async def _need_post(store: Store, name: str, post_id: str) -> None:
    if await store.get_post(post_id) is None:
        raise NotFound(f"{name}: no post {post_id}")


# -- the delivery rules: each gets the checked fields by keyword ---------------------------------------------


async def prepare_notification(
    store: Store,
    user_id: str,
    type: str,
    title: str,
    message: str,
    metadata: Any,
    persist: bool,
    notification_id: str | None,
    created_at: str | None,
) -> Emission:
    """``persist``: the server writes the ``notifications`` row (a new cuid-like id, or
    ``notification_id``) and the event carries the stored row; the same ``notification_id`` again reuses
    the row, never a second copy. Otherwise the caller wrote the row already (and passes its id and
    ``created_at``) or wants a notification that is not kept."""
    if created_at is not None and persist:
        raise PublishError("createdAt: a notification the server persists gets the time it is written")
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
    """Marks the notification read, checking it is the user's."""
    await _need_user(store, "userId", user_id)
    if not await sql.mark_read(store.q, user_id, notification_id):
        raise NotFound(f"notificationId: user {user_id} has no notification {notification_id}")
    event = {"type": "notification_read", "userId": user_id, "notificationId": notification_id}
    return Emission(event, users=[user_id])


async def prepare_notifications_cleared(store: Store, user_id: str) -> Emission:
    """Marks all of the user's unread notifications read."""
    await _need_user(store, "userId", user_id)
    await sql.clear(store.q, user_id)
    return Emission({"type": "notifications_cleared", "userId": user_id}, users=[user_id])


async def prepare_post_likes(store: Store, post_id: str, user_id: str, *, is_liked: bool) -> Emission:
    """``likesCount`` as ``posts`` has it now (the web app's transaction has committed)."""
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
    store: Store, post: dict[str, Any], subscriber_ids: list[str] | None
) -> Emission:
    """The event's five post fields come from the ``posts`` row, overridden by those ``post`` gives; one
    publish to ``creator_C`` and every ``feed_S`` (default: the creator's active paid subscribers)."""
    post_id = post["id"]
    stored = await sql.post_summary(store.q, post_id)
    if stored is None:
        raise NotFound(f"post.id: no post {post_id}")
    creator_id = stored.pop("creatorId")
    if post.get("creatorId", creator_id) != creator_id:
        raise PublishError(f"post.creatorId: post {post_id} belongs to {creator_id}")
    stored.update({k: v for k, v in post.items() if k in ("title", "type", "thumbnail", "createdAt")})
    if subscriber_ids is None:
        subscriber_ids = await sql.active_subscriber_ids(store.q, creator_id)
    event = {"type": "post_created", "creatorId": creator_id, "post": stored}
    return Emission(event, channels=[f"creator_{creator_id}", *(f"feed_{s}" for s in subscriber_ids)])


async def prepare_post_deleted(store: Store, post_id: str) -> Emission:
    """The row may already be gone, so it is not looked up."""
    return Emission({"type": "post_deleted", "postId": post_id}, channels=[f"post_{post_id}"])


async def prepare_comment_added(store: Store, post_id: str, comment: dict[str, Any]) -> Emission:
    """The comment's four fields; ``createdAt`` defaults to now."""
    shaped = {**comment, "createdAt": comment.get("createdAt") or iso(utcnow())}
    await _need_post(store, "postId", post_id)
    await _need_user(store, "comment.userId", shaped["userId"])
    return Emission(
        {"type": "comment_added", "postId": post_id, "comment": shaped}, channels=[f"post_{post_id}"]
    )


async def prepare_comment_deleted(store: Store, post_id: str, comment_id: str) -> Emission:
    await _need_post(store, "postId", post_id)
    event = {"type": "comment_deleted", "postId": post_id, "commentId": comment_id}
    return Emission(event, channels=[f"post_{post_id}"])


async def prepare_creator_updated(store: Store, creator_id: str, changes: dict[str, Any]) -> Emission:
    """The changed fields go out as the event's ``data``."""
    await _need_user(store, "creatorId", creator_id)
    event = {"type": "creator_updated", "creatorId": creator_id, "data": changes}
    return Emission(event, channels=[f"creator_{creator_id}"])


async def prepare_new_subscription(store: Store, creator_id: str, user_id: str) -> Emission:
    """To the creator's connections, never the public ``creator_C``: anyone may join that channel."""
    await _need_user(store, "creatorId", creator_id)
    await _need_user(store, "userId", user_id)
    event = {"type": "new_subscription", "creatorId": creator_id, "userId": user_id}
    return Emission(event, users=[creator_id])


async def prepare_feed_update(store: Store, user_id: str, posts: list[Any]) -> Emission:
    await _need_user(store, "userId", user_id)
    return Emission({"type": "feed_update", "userId": user_id, "posts": posts}, users=[user_id])


async def _other_participant(store: Store, conversation_id: str, name: str, user_id: str) -> str:
    """The participant of the conversation who is not ``user_id`` (named ``name`` in the body)."""
    participants = await store.conversation_participants(conversation_id)
    if participants is None:
        raise NotFound(f"conversationId: no conversation {conversation_id}")
    from_user, to_user = participants
    if user_id not in participants:
        raise Conflict(f"{name}: user {user_id} is not a participant of conversation {conversation_id}")
    return to_user if user_id == from_user else from_user


async def prepare_new_message(store: Store, conversation_id: str, message: dict[str, Any]) -> Emission:
    """To ``conversation_C`` and the other participant's user topic: one publish, so a connection on both
    routes gets it once, and the sender's own tabs only through the channel. A paid message goes out with
    ``content`` and ``mediaUrl`` null whoever calls: it is unlocked through the web app, never here."""
    other = await _other_participant(store, conversation_id, "message.senderId", message["senderId"])
    paid = message.get("isPaid", False)
    shaped = {
        "id": message["id"],
        "conversationId": conversation_id,  # the body's, never a member: two values could disagree
        "senderId": message["senderId"],
        "content": None if paid else message.get("content"),
        "mediaUrl": None if paid else message.get("mediaUrl"),
        "mediaType": message.get("mediaType"),
        "isPaid": paid,
        "price": message.get("price"),
        "createdAt": message.get("createdAt") or iso(utcnow()),
    }
    event = {"type": "new_message", "conversationId": conversation_id, "message": shaped}
    return Emission(event, channels=[f"conversation_{conversation_id}"], users=[other])


async def prepare_message_read(
    store: Store, conversation_id: str, user_id: str, message_ids: list[str]
) -> Emission:
    """Announced, not written: the web app marked the rows read (the tables are its own)."""
    other = await _other_participant(store, conversation_id, "userId", user_id)
    event = {
        "type": "message_read",
        "conversationId": conversation_id,
        "userId": user_id,
        "messageIds": message_ids,
    }
    return Emission(event, channels=[f"conversation_{conversation_id}"], users=[other])


async def prepare_tip_received(store: Store, creator_id: str, tip: dict[str, Any]) -> Emission:
    """To the creator's connections only: a tip is the creator's news, not the conversation's."""
    await _need_user(store, "creatorId", creator_id)
    await _need_user(store, "tip.fromUserId", tip["fromUserId"])
    shaped = {
        "id": tip["id"],
        "fromUserId": tip["fromUserId"],
        "amount": tip["amount"],
        "message": tip.get("message"),
        "createdAt": tip.get("createdAt") or iso(utcnow()),
    }
    return Emission({"type": "tip_received", "creatorId": creator_id, "tip": shaped}, users=[creator_id])


# -- the table ----------------------------------------------------------------------------------------------

USER = Field("userId", ID, "the user (every connection of this user receives the event)")
POST_ID = Field("postId", ID, "the post")
CREATOR = Field("creatorId", ID, "the creator")

POST = record(
    "post",
    "the post (a whole post object is fine); fields not given come from the posts row",
    (
        Field("id", ID, "the post id"),
        Field("creatorId", ID, "checked against the post's creator", required=False),
        Field("title", STRING, "instead of the posts row's title", required=False),
        Field("type", STRING, "instead of the posts row's type", required=False),
        Field("thumbnail", STRING_OR_NULL, "instead of the posts row's thumbnail", required=False),
        Field("createdAt", TIMESTAMP, "instead of the posts row's createdAt", required=False),
    ),
    or_id=True,
)
COMMENT = record(
    "comment",
    "the comment",
    (
        Field("id", ID, "the comment id"),
        Field("userId", ID, "the comment's author"),
        Field("content", STRING, "the comment's text"),
        Field("createdAt", TIMESTAMP, "when it was written; default: now", required=False),
    ),
)
CONVERSATION = Field("conversationId", ID, "the conversation")
MESSAGE = record(
    "message",
    "the message (a whole Message row is fine: its conversationId is the body's)",
    (
        Field("id", ID, "the message id"),
        Field("senderId", ID, "who sent it: a participant of the conversation"),
        Field("content", STRING_OR_NULL, "the text (sent as null when isPaid)", required=False),
        Field("mediaUrl", STRING_OR_NULL, "the attachment (sent as null when isPaid)", required=False),
        Field("mediaType", STRING_OR_NULL, "the attachment's type", required=False),
        Field("isPaid", BOOLEAN, "a paid message: content and mediaUrl go out null", required=False),
        Field("price", PRICE, "the price of a paid message", required=False),
        Field("createdAt", TIMESTAMP, "when it was written; default: now", required=False),
    ),
)
TIP = record(
    "tip",
    "the tip",
    (
        Field("id", ID, "the tip id"),
        Field("fromUserId", ID, "who tipped"),
        Field("amount", AMOUNT, "how much"),
        Field("message", STRING_OR_NULL, "the tipper's note", required=False),
        Field("createdAt", TIMESTAMP, "when it was given; default: now", required=False),
    ),
)

EVENTS: tuple[Event, ...] = (
    Event(
        "notification",
        "Send a notification (optionally persisting the notifications row)",
        "every connection of the user (which covers notifications_U)",
        (
            Field("userId", ID, "the recipient"),
            Field("type", NOTIFICATION_TYPE, "the notification type", cli_default="SYSTEM_ANNOUNCEMENT"),
            Field("title", STRING, "the title"),
            Field("message", STRING, "the text"),
            Field("metadata", JSON, "any JSON the web app attaches (e.g. postId)", required=False),
            Field(
                "persist",
                BOOLEAN,
                "true: the server writes the notifications row (the event carries the stored row); "
                "false (default): the caller wrote it already or it is not kept",
                required=False,
                default=False,
            ),
            Field(
                "id",
                ID,
                "the notification id: the row the web app wrote (persist false), or the id to write "
                "(persist true; sending again reuses the row). Default: a new cuid-like id",
                required=False,
                keyword="notification_id",
                keyword_only=True,
            ),
            Field(
                "createdAt",
                TIMESTAMP,
                "the row's createdAt (persist false only: refused with persist true); default: now",
                required=False,
                keyword_only=True,
            ),
        ),
        {"userId": "U", "type": "LIKE_POST", "title": "New like", "message": "Bob liked your post"},
        prepare_notification,
        "send_notification",
        raises=(NotFound, Conflict),
        # createdAt with persist true is refused: the row the server writes gets the time it is written.
        schema_rules=(
            ("not", {"required": ["persist", "createdAt"], "properties": {"persist": {"const": True}}}),
        ),
    ),
    Event(
        "notification_read",
        "Mark one of the user's notifications read",
        "every connection of the user",
        (USER, Field("notificationId", ID, "a notification of that user")),
        {"userId": "U", "notificationId": "N"},
        prepare_notification_read,
        "mark_notification_read",
    ),
    Event(
        "notifications_cleared",
        "Mark all of the user's unread notifications read",
        "every connection of the user",
        (USER,),
        {"userId": "U"},
        prepare_notifications_cleared,
        "clear_notifications",
    ),
    Event(
        "post_liked",
        "A user liked a post (likesCount is read from posts)",
        "post_P",
        (POST_ID, Field("userId", ID, "who liked it")),
        {"postId": "P", "userId": "U"},
        partial(prepare_post_likes, is_liked=True),
        "notify_post_liked",
    ),
    Event(
        "post_unliked",
        "A user took back a like (likesCount is read from posts)",
        "post_P",
        (POST_ID, Field("userId", ID, "who unliked it")),
        {"postId": "P", "userId": "U"},
        partial(prepare_post_likes, is_liked=False),
        "notify_post_unliked",
    ),
    Event(
        "post_created",
        "A creator published a post",
        "creator_C and the feed_S of each active paid subscriber S",
        (
            Field("post", POST, "the post id, or the post object"),
            Field(
                "subscriberIds",
                IDS,
                "whose feeds receive it; default: the creator's active paid subscribers",
                required=False,
            ),
        ),
        {"post": {"id": "P", "thumbnail": "https://cdn.example/p.jpg"}},
        prepare_post_created,
        "notify_new_post",
    ),
    Event(
        "post_deleted",
        "A post was deleted",
        "post_P",
        (POST_ID,),
        {"postId": "P"},
        prepare_post_deleted,
        "notify_post_deleted",
        raises=(),  # announced although the row is gone: nothing is looked up
    ),
    Event(
        "comment_added",
        "A comment was added to a post",
        "post_P",
        (POST_ID, Field("comment", COMMENT, "the comment")),
        {"postId": "P", "comment": {"id": "K", "userId": "U", "content": "Nice!"}},
        prepare_comment_added,
        "notify_new_comment",
    ),
    Event(
        "comment_deleted",
        "A comment was deleted",
        "post_P",
        (POST_ID, Field("commentId", ID, "the comment")),
        {"postId": "P", "commentId": "K"},
        prepare_comment_deleted,
        "notify_comment_deleted",
    ),
    Event(
        "creator_updated",
        "A creator's public profile changed",
        "creator_C",
        (CREATOR, Field("changes", CHANGES, "the changed fields; the event carries them as data")),
        {"creatorId": "C", "changes": {"nickname": "new-name"}},
        prepare_creator_updated,
        "notify_creator_update",
    ),
    Event(
        "new_subscription",
        "A user subscribed to a creator",
        "the creator only (every connection of the creator; never the public creator_C)",
        (CREATOR, Field("userId", ID, "the new subscriber")),
        {"creatorId": "C", "userId": "U"},
        prepare_new_subscription,
        "notify_new_subscription",
    ),
    Event(
        "feed_update",
        "New content for a user's feed",
        "every connection of the user (which covers feed_U)",
        (USER, Field("posts", LIST, "the posts, as the feed shows them")),
        {"userId": "U", "posts": [{"id": "P", "title": "Hello"}]},
        prepare_feed_update,
        "update_user_feed",
    ),
    Event(
        "new_message",
        "A message was sent in a conversation (a paid one without its content and mediaUrl)",
        "conversation_C and every connection of the other participant",
        (CONVERSATION, Field("message", MESSAGE, "the message")),
        {"conversationId": "C", "message": {"id": "M", "senderId": "U", "content": "Hi!"}},
        prepare_new_message,
        "notify_new_message",
        raises=(NotFound, Conflict),
    ),
    Event(
        "message_read",
        "A participant read messages of a conversation",
        "conversation_C and every connection of the other participant",
        (
            CONVERSATION,
            Field("userId", ID, "the reader: a participant of the conversation"),
            Field("messageIds", IDS, "the messages read"),
        ),
        {"conversationId": "C", "userId": "U", "messageIds": ["M"]},
        prepare_message_read,
        "notify_message_read",
        raises=(NotFound, Conflict),
    ),
    Event(
        "tip_received",
        "A creator received a tip",
        "every connection of the creator",
        (CREATOR, Field("tip", TIP, "the tip")),
        {"creatorId": "C", "tip": {"id": "T", "fromUserId": "U", "amount": 5}},
        prepare_tip_received,
        "notify_tip_received",
    ),
)

BY_NAME: dict[str, Event] = {e.name: e for e in EVENTS}

#: What the browser client also listens for, with no entry above: these go out as they are published,
#: through :meth:`Events.publish` / ``POST /api/publish`` / ``fonana-ws send raw``.
OTHER_EVENT_TYPES: tuple[str, ...] = (
    "subscription_cancelled",
    "earnings_updated",
    "flash_sale_created",
    "flash_sale_ended",
    "post_updated",
    "post_purchased",
    "subscription_updated",
)


# -- the Python API -----------------------------------------------------------------------------------------


class Events:
    """The events API: one method per entry of :data:`EVENTS` (generated from it, below), ``emit`` for
    any entry by name, ``publish``/``publish_to`` for any other event. Each returns the Emission."""

    def __init__(self, publisher: Publisher, store: Store) -> None:
        self.publisher = publisher
        self.store = store

    @classmethod
    def from_services(cls, services: Any) -> Events:
        """The events API of a running server (``request.app.state.services``)."""
        return cls(services.publisher, services.store)

    async def emit(self, name: str, /, **fields: Any) -> Emission:
        """The event ``name`` (``post-liked``: the route name) with its body ``fields`` by JSON name,
        checked, prepared and published as ``POST /api/events/<name>`` does."""
        if name not in BY_NAME:
            raise PublishError(f"{name}: no such event (expected {', '.join(BY_NAME)})")
        return await self.deliver(await BY_NAME[name].prepare(self.store, fields))

    async def deliver(self, emission: Emission) -> Emission:
        """Publish a prepared emission; the returned copy carries the event id."""
        event_id = await self.publisher.publish(
            emission.event, channels=emission.channels, users=emission.users
        )
        return replace(emission, id=event_id)

    async def update_post_likes(self, post_id: str, user_id: str, is_liked: bool) -> Emission:
        """``post_liked`` (``is_liked``) or ``post_unliked`` to ``post_P``, with the stored likesCount."""
        name = "post-liked" if BOOLEAN.check("isLiked", is_liked) else "post-unliked"
        return await self.emit(name, postId=post_id, userId=user_id)

    async def publish(self, target: str, event: dict[str, Any]) -> Emission:
        """Any event (``earnings_updated``, ``post_updated``, ...) to a channel key or a user.

        ``target`` is a channel key when it is one (``notifications_U``, ``feed_U``, ``creator_C``,
        ``post_P``, ``conversation_C``), else a user id. ``publish_to`` says which explicitly, and takes
        both at once.
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
        return await self.deliver(emission)


def _method(entry: Event) -> Callable[..., Awaitable[Emission]]:
    """The :class:`Events` method of an entry: its fields as parameters, by Python keyword."""
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in entry.fields:
        annotation = f.kind.annotation
        if not f.required and f.default is None:  # None stands for absent
            annotation = annotation | None
        parameters.append(
            inspect.Parameter(
                f.keyword,
                inspect.Parameter.KEYWORD_ONLY if f.keyword_only else inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=inspect.Parameter.empty if f.required else f.default,
                annotation=annotation,
            )
        )
    signature = inspect.Signature(parameters, return_annotation=Emission)

    async def method(self: Events, *args: Any, **kwargs: Any) -> Emission:
        given = signature.bind(self, *args, **kwargs).arguments
        fields = {f.name: given[f.keyword] for f in entry.fields if given.get(f.keyword) is not None}
        return await self.emit(entry.name, **fields)

    method.__name__ = entry.method
    method.__qualname__ = f"Events.{entry.method}"
    method.__signature__ = signature  # type: ignore[attr-defined]
    method.__doc__ = describe(entry)
    return method


def describe(entry: Event) -> str:
    """The docstring of an entry: what it sends to whom, each argument, ``POST`` body name included."""
    lines = [f"{entry.summary}: ``{entry.event}`` to {entry.delivered_to}.", ""]
    for f in entry.fields:
        optional = "" if f.required else ", optional"
        lines.append(f"``{f.keyword}`` (JSON ``{f.name}``{optional}): {f.doc}.")
    lines += ["", f"Same as ``Events.emit({entry.name!r}, ...)`` and ``POST /api/events/{entry.name}``."]
    return "\n".join(lines)


for _entry in EVENTS:
    setattr(Events, _entry.method, _method(_entry))


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
            limits = HistoryLimits(settings.history_size, settings.history_ttl)
            yield Events(Publisher(broker, max_event_size=settings.max_event_size, history=limits), store)
        finally:
            await broker.disconnect()
    finally:
        await store.disconnect()
