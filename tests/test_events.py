"""The Python events API: every event of protocol §3 reaches exactly the connections the protocol names,
with the exact shape, and nobody else; notifications are written once and read back by later connections."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from fonana_ws.db import demo
from fonana_ws.db import notifications as sql
from fonana_ws.fonana.events import Conflict, Events, NotFound, connect_events
from fonana_ws.fonana.publisher import PublishError

from .conftest import REDIS_URL, Client, Server, make_settings, need_service, redis_reachable, running

CUID = re.compile(r"^c[0-9a-z]{24}$")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def events(server: Server) -> Events:
    return Events.from_services(server.services)


async def silent(*clients: Client, within: float = 0.3) -> None:
    """None of ``clients`` receives anything within ``within`` seconds."""
    await asyncio.gather(*(c.nothing(within) for c in clients))


async def watcher(server: Server, user: str, channel: dict[str, Any]) -> Client:
    client = await server.connect(user)
    reply = await client.subscribe(channel)
    assert reply["type"] == "subscribed", reply
    return client


async def count_notifications(server: Server, user: str) -> int:
    return await server.db.fetch_val('SELECT COUNT(*) FROM notifications WHERE "userId" = :u', {"u": user})


async def set_post(server: Server, post_id: str, **columns: Any) -> None:
    sets = ", ".join(f'"{name}" = :{name}' for name in columns)
    await server.db.execute(f"UPDATE posts SET {sets} WHERE id = :id", {"id": post_id, **columns})


async def subscribe_notifications(server: Server, user: str) -> tuple[Client, dict[str, Any] | None]:
    """A new connection of ``user`` subscribed to ``notifications_U``, and its unread_notifications frame."""
    client = await server.connect(user)
    assert (await client.subscribe({"type": "notifications", "userId": user}))["type"] == "subscribed"
    try:
        frame = await client.recv(0.5)
    except TimeoutError:
        return client, None
    assert frame["type"] == "unread_notifications", frame
    return client, frame["data"]


# -- notifications ------------------------------------------------------------------------------------------


async def test_notification_reaches_every_connection_of_the_user_and_nobody_else(server: Server) -> None:
    user, other = await server.user(), await server.user()
    bare = await server.connect(user)
    subscribed = await watcher(server, user, {"type": "notifications", "userId": user})
    others = await watcher(server, other, {"type": "notifications", "userId": other})
    other_bare = await server.connect(other)

    sent = await events(server).send_notification(
        user, "LIKE_POST", "New like", "Bob liked your post", {"postId": "p1", "n": 2}
    )

    notification = sent.event["notification"]
    assert sent.event == {
        "type": "notification",
        "userId": user,
        "notification": {
            "id": notification["id"],
            "userId": user,
            "type": "LIKE_POST",
            "title": "New like",
            "message": "Bob liked your post",
            "isRead": False,
            "metadata": {"postId": "p1", "n": 2},
            "createdAt": notification["createdAt"],
        },
    }
    assert CUID.match(notification["id"]) and ISO.match(notification["createdAt"])
    assert sent.users == [user] and sent.channels == []
    assert await bare.recv() == sent.event
    assert await subscribed.recv() == sent.event
    await silent(bare, subscribed, others, other_bare)
    # not persisted: the caller did not ask, so no row exists
    assert await count_notifications(server, user) == 0


async def test_persisted_notification_is_written_once_and_listed_unread_later(server: Server) -> None:
    user = await server.user()
    tab = await server.connect(user)
    ev = events(server)
    sent = await ev.send_notification(
        user, "TIP_RECEIVED", "Tip", "You got 5 SOL", {"amount": 5, "from": "bob"}, persist=True
    )
    notification = sent.event["notification"]
    assert CUID.match(notification["id"])
    assert await tab.recv() == sent.event
    # the event carries the stored row, exactly
    assert await sql.get_notification(server.db, notification["id"]) == notification
    assert notification["metadata"] == {"amount": 5, "from": "bob"} and notification["isRead"] is False
    assert await count_notifications(server, user) == 1

    # a later connection gets it as unread on subscribing to notifications_U
    _later, unread = await subscribe_notifications(server, user)
    assert unread == {"notifications": [notification], "count": 1}

    # sending again with the same id (a retry) reuses the row: never a second copy
    again = await ev.send_notification(
        user, "TIP_RECEIVED", "Tip", "retry", persist=True, notification_id=notification["id"]
    )
    assert again.event["notification"] == notification
    assert await count_notifications(server, user) == 1
    assert await tab.recv() == again.event


async def test_a_row_the_web_app_wrote_is_announced_not_copied(server: Server) -> None:
    user, other = await server.user(), await server.user()
    # the web app wrote this row (Prisma)
    row = await sql.insert_notification(
        server.db, user, "NEW_MESSAGE", "Message", "Hi", None, notification_id="cweb1" + uuid.uuid4().hex[:20]
    )
    tab = await server.connect(user)
    sent = await events(server).send_notification(
        user,
        "NEW_MESSAGE",
        "Message",
        "Hi",
        persist=False,
        notification_id=row["id"],
        created_at=row["createdAt"],
    )
    assert sent.event["notification"] == row
    assert await tab.recv() == sent.event
    assert await count_notifications(server, user) == 1

    # another user's notification id cannot be reused for this one
    with pytest.raises(Conflict, match="another user"):
        await events(server).send_notification(
            other, "NEW_MESSAGE", "x", "y", persist=True, notification_id=row["id"]
        )
    assert await count_notifications(server, other) == 0
    await silent(tab)


async def test_mark_read_checks_the_owner(server: Server) -> None:
    user, other = await server.user(), await server.user()
    ev = events(server)
    keep = (await ev.send_notification(user, "LIKE_POST", "a", "b", persist=True)).event["notification"]
    target = (await ev.send_notification(user, "LIKE_POST", "c", "d", persist=True)).event["notification"]
    mine, theirs = await server.connect(user), await server.connect(other)

    with pytest.raises(NotFound, match="notificationId"):
        await ev.mark_notification_read(other, target["id"])
    with pytest.raises(NotFound, match="notificationId"):
        await ev.mark_notification_read(user, "no-such-notification")
    with pytest.raises(NotFound, match="userId"):
        await ev.mark_notification_read("no-such-user", target["id"])
    assert (await sql.get_notification(server.db, target["id"]))["isRead"] is False
    await silent(mine, theirs)

    sent = await ev.mark_notification_read(user, target["id"])
    assert sent.event == {"type": "notification_read", "userId": user, "notificationId": target["id"]}
    assert sent.users == [user] and sent.channels == []
    assert await mine.recv() == sent.event
    await silent(mine, theirs)
    _later, unread = await subscribe_notifications(server, user)
    assert unread == {"notifications": [keep], "count": 1}


async def test_clear_marks_all_unread_of_that_user_only(server: Server) -> None:
    user, other = await server.user(), await server.user()
    ev = events(server)
    for i in range(3):
        await ev.send_notification(user, "LIKE_POST", f"t{i}", "m", persist=True)
    theirs = (await ev.send_notification(other, "LIKE_POST", "t", "m", persist=True)).event["notification"]
    mine, other_tab = await server.connect(user), await server.connect(other)

    sent = await ev.clear_notifications(user)
    assert sent.event == {"type": "notifications_cleared", "userId": user}
    assert sent.users == [user] and sent.channels == []
    assert await mine.recv() == sent.event
    await silent(mine, other_tab)
    later, unread = await subscribe_notifications(server, user)
    assert unread is None
    _other_later, other_unread = await subscribe_notifications(server, other)
    assert other_unread == {"notifications": [theirs], "count": 1}
    with pytest.raises(NotFound, match="userId"):
        await ev.clear_notifications("no-such-user")


# -- posts and comments -------------------------------------------------------------------------------------


async def test_post_liked_and_unliked_reach_post_subscribers_with_the_stored_count(server: Server) -> None:
    creator = await server.user("c", creator=True)
    post, other_post = await server.post(creator), await server.post(creator)
    liker = await server.user()
    watching = await watcher(server, await server.user(), {"type": "post", "postId": post})
    elsewhere = await watcher(server, await server.user(), {"type": "post", "postId": other_post})
    liker_tab = await server.connect(liker)
    creator_tab = await server.connect(creator)
    ev = events(server)

    await set_post(server, post, likesCount=7)
    liked = await ev.update_post_likes(post, liker, True)
    assert liked.event == {"type": "post_liked", "postId": post, "userId": liker, "likesCount": 7}
    assert liked.channels == [f"post_{post}"] and liked.users == []
    assert await watching.recv() == liked.event

    await set_post(server, post, likesCount=6)
    unliked = await ev.update_post_likes(post, liker, False)
    assert unliked.event == {"type": "post_unliked", "postId": post, "userId": liker, "likesCount": 6}
    assert await watching.recv() == unliked.event
    await silent(watching, elsewhere, liker_tab, creator_tab)

    with pytest.raises(NotFound, match="postId"):
        await ev.update_post_likes("no-such-post", liker, True)
    with pytest.raises(NotFound, match="userId"):
        await ev.update_post_likes(post, "no-such-user", True)
    with pytest.raises(PublishError, match="isLiked"):
        await ev.update_post_likes(post, liker, "yes")  # type: ignore[arg-type]


async def test_post_created_reaches_the_creator_channel_and_paid_subscriber_feeds_once(
    server: Server,
) -> None:
    creator = await server.user("c", creator=True)
    post = await server.post(creator)
    created = datetime(2024, 1, 2, 3, 4, 5, 678000)
    await set_post(server, post, title="Hello", type="image", thumbnail="/t/1.jpg", createdAt=created)
    paid, expired, pending, inactive, follower = [await server.user() for _ in range(5)]
    await demo.insert_subscription(server.db, uuid.uuid4().hex, paid, creator)
    await demo.insert_subscription(
        server.db, uuid.uuid4().hex, expired, creator, valid_for=timedelta(days=-1)
    )
    await demo.insert_subscription(server.db, uuid.uuid4().hex, pending, creator, status="PENDING")
    await demo.insert_subscription(server.db, uuid.uuid4().hex, inactive, creator, active=False)

    # the paid subscriber on both routes (creator_C and feed_S) in one tab, feed only in another
    both = await watcher(server, paid, {"type": "creator", "id": creator})
    assert (await both.subscribe({"type": "feed", "userId": paid}))["type"] == "subscribed"
    feed_only = await watcher(server, paid, {"type": "feed", "userId": paid})
    paid_bare = await server.connect(paid)
    following = await watcher(server, follower, {"type": "creator", "id": creator})
    unpaid_feeds = [
        await watcher(server, u, {"type": "feed", "userId": u}) for u in (expired, pending, inactive)
    ]
    creator_bare = await server.connect(creator)

    sent = await events(server).notify_new_post(post)
    assert sent.event == {
        "type": "post_created",
        "creatorId": creator,
        "post": {
            "id": post,
            "title": "Hello",
            "type": "image",
            "thumbnail": "/t/1.jpg",
            "createdAt": "2024-01-02T03:04:05.678Z",
        },
    }
    assert sent.channels == [f"creator_{creator}", f"feed_{paid}"] and sent.users == []
    for client in (both, feed_only, following):
        assert await client.recv() == sent.event
    await silent(both, feed_only, following, paid_bare, creator_bare, *unpaid_feeds)


async def test_post_created_with_given_subscribers_and_a_post_object(server: Server) -> None:
    creator = await server.user("c", creator=True)
    post = await server.post(creator)
    paid, chosen = await server.user(), await server.user()
    await demo.insert_subscription(server.db, uuid.uuid4().hex, paid, creator)
    paid_feed = await watcher(server, paid, {"type": "feed", "userId": paid})
    chosen_feed = await watcher(server, chosen, {"type": "feed", "userId": chosen})
    ev = events(server)

    # a whole post object: the event keeps exactly the five fields, overrides win over the row
    sent = await ev.notify_new_post(
        {"id": post, "creatorId": creator, "thumbnail": None, "title": "T", "isLocked": True, "content": "x"},
        subscriber_ids=[chosen],
    )
    assert set(sent.event["post"]) == {"id", "title", "type", "thumbnail", "createdAt"}
    assert sent.event["post"]["title"] == "T" and sent.event["post"]["thumbnail"] is None
    assert sent.event["post"]["type"] == "text" and ISO.match(sent.event["post"]["createdAt"])
    assert sent.channels == [f"creator_{creator}", f"feed_{chosen}"]
    assert await chosen_feed.recv() == sent.event
    await silent(paid_feed)

    with pytest.raises(NotFound, match="post.id"):
        await ev.notify_new_post("no-such-post")
    with pytest.raises(PublishError, match="post.creatorId"):
        await ev.notify_new_post({"id": post, "creatorId": paid})
    with pytest.raises(PublishError, match="subscriberIds"):
        await ev.notify_new_post(post, subscriber_ids=chosen)  # type: ignore[arg-type]


async def test_post_and_comment_events_reach_post_subscribers_only(server: Server) -> None:
    creator = await server.user("c", creator=True)
    post, other_post = await server.post(creator), await server.post(creator)
    commenter = await server.user()
    watching = await watcher(server, commenter, {"type": "post", "postId": post})
    elsewhere = await watcher(server, await server.user(), {"type": "post", "postId": other_post})
    follower = await watcher(server, await server.user(), {"type": "creator", "id": creator})
    ev = events(server)

    added = await ev.notify_new_comment(
        post,
        {
            "id": "42",
            "userId": commenter,
            "content": "Nice!",
            "createdAt": "2024-05-06T09:08:09+02:00",
            "x": 1,
        },
    )
    assert added.event == {
        "type": "comment_added",
        "postId": post,
        "comment": {
            "id": "42",
            "userId": commenter,
            "content": "Nice!",
            "createdAt": "2024-05-06T07:08:09.000Z",
        },
    }
    assert added.channels == [f"post_{post}"]
    assert await watching.recv() == added.event

    defaulted = await ev.notify_new_comment(post, {"id": "k2", "userId": commenter, "content": ""})
    assert ISO.match(defaulted.event["comment"]["createdAt"])
    assert await watching.recv() == defaulted.event

    deleted = await ev.notify_comment_deleted(post, "42")
    assert deleted.event == {"type": "comment_deleted", "postId": post, "commentId": "42"}
    assert await watching.recv() == deleted.event

    gone = await ev.notify_post_deleted(post)
    assert gone.event == {"type": "post_deleted", "postId": post} and gone.channels == [f"post_{post}"]
    assert await watching.recv() == gone.event
    await silent(watching, elsewhere, follower)

    with pytest.raises(NotFound, match="postId"):
        await ev.notify_new_comment("no-such-post", {"id": "k", "userId": commenter, "content": "x"})
    with pytest.raises(NotFound, match="comment.userId"):
        await ev.notify_new_comment(post, {"id": "k", "userId": "no-such-user", "content": "x"})
    with pytest.raises(PublishError, match="comment.content"):
        await ev.notify_new_comment(post, {"id": "k", "userId": commenter})
    with pytest.raises(PublishError, match="comment.createdAt"):
        await ev.notify_new_comment(
            post, {"id": "k", "userId": commenter, "content": "x", "createdAt": "soon"}
        )
    # One rule for ids, the HTTP API's: strings (the Python API took a number here and sent "42").
    with pytest.raises(PublishError, match="comment.id must be an id string"):
        await ev.notify_new_comment(post, {"id": 42, "userId": commenter, "content": "x"})
    with pytest.raises(NotFound, match="postId"):
        await ev.notify_comment_deleted("no-such-post", "k")


# -- creators, subscriptions, feeds, anything ---------------------------------------------------------------


async def test_creator_updated_reaches_the_creator_channel(server: Server) -> None:
    creator, other_creator = await server.user("c", creator=True), await server.user("c", creator=True)
    following = await watcher(server, await server.user(), {"type": "creator", "id": creator})
    other_following = await watcher(server, await server.user(), {"type": "creator", "id": other_creator})
    creator_bare = await server.connect(creator)
    ev = events(server)

    sent = await ev.notify_creator_update(creator, {"nickname": "new", "isVerified": True})
    assert sent.event == {
        "type": "creator_updated",
        "creatorId": creator,
        "data": {"nickname": "new", "isVerified": True},
    }
    assert sent.channels == [f"creator_{creator}"] and sent.users == []
    assert await following.recv() == sent.event
    await silent(following, other_following, creator_bare)
    with pytest.raises(PublishError, match="changes"):
        await ev.notify_creator_update(creator, {})
    with pytest.raises(NotFound, match="creatorId"):
        await ev.notify_creator_update("no-such-user", {"a": 1})


async def test_new_subscription_reaches_only_the_creator(server: Server) -> None:
    creator = await server.user("c", creator=True)
    subscriber = await server.user()
    creator_following = await watcher(server, creator, {"type": "creator", "id": creator})
    creator_bare = await server.connect(creator)
    # anyone may subscribe to creator_C: a non-creator there must not learn who subscribed
    snooper = await watcher(server, await server.user(), {"type": "creator", "id": creator})
    subscriber_tab = await watcher(server, subscriber, {"type": "creator", "id": creator})

    sent = await events(server).notify_new_subscription(creator, subscriber)
    assert sent.event == {"type": "new_subscription", "creatorId": creator, "userId": subscriber}
    assert sent.users == [creator] and sent.channels == []
    assert await creator_following.recv() == sent.event
    assert await creator_bare.recv() == sent.event
    await silent(creator_following, creator_bare, snooper, subscriber_tab)
    with pytest.raises(NotFound, match="userId"):
        await events(server).notify_new_subscription(creator, "no-such-user")
    with pytest.raises(NotFound, match="creatorId"):
        await events(server).notify_new_subscription("no-such-user", subscriber)


async def test_feed_update_reaches_every_connection_of_the_user(server: Server) -> None:
    user, other = await server.user(), await server.user()
    bare = await server.connect(user)
    feed = await watcher(server, user, {"type": "feed", "userId": user})
    other_feed = await watcher(server, other, {"type": "feed", "userId": other})
    posts = [{"id": "p1", "title": "One"}, {"id": "p2", "title": "Two"}]

    sent = await events(server).update_user_feed(user, posts)
    assert sent.event == {"type": "feed_update", "userId": user, "posts": posts}
    assert sent.users == [user] and sent.channels == []
    assert await bare.recv() == sent.event
    assert await feed.recv() == sent.event
    await silent(bare, feed, other_feed)
    with pytest.raises(PublishError, match="posts must be a list"):
        await events(server).update_user_feed(user, {"id": "p1"})  # type: ignore[arg-type]


async def test_generic_publish_for_events_without_a_function(server: Server) -> None:
    creator, user = await server.user("c", creator=True), await server.user()
    following = await watcher(server, user, {"type": "creator", "id": creator})
    stranger = await server.connect(await server.user())
    ev = events(server)

    earnings = {"type": "earnings_updated", "amount": 5}
    sent = await ev.publish(user, earnings)  # a user id
    assert sent.users == [user] and sent.channels == [] and sent.id
    assert await following.recv() == earnings
    update = {"type": "post_updated", "creatorId": creator}
    sent = await ev.publish(f"creator_{creator}", update)  # a channel key
    assert sent.channels == [f"creator_{creator}"] and sent.users == []
    assert await following.recv() == update
    sale = {"type": "flash_sale_created", "creatorId": creator}
    await ev.publish_to(sale, channel=f"creator_{creator}", user=user)  # two routes, one delivery
    assert await following.recv() == sale
    await silent(following, stranger)
    with pytest.raises(PublishError, match="channel or a user"):
        await ev.publish_to({"type": "x"})
    with pytest.raises(PublishError, match="channel"):
        await ev.publish_to({"type": "x"}, channel="bogus")


async def test_emit_by_route_name_is_the_method(server: Server) -> None:
    """``emit(name, **fields)`` takes the HTTP body's JSON names and checks them the same way."""
    user = await server.user()
    tab = await server.connect(user)
    ev = events(server)
    sent = await ev.emit("notification", userId=user, type="NEW_MESSAGE", title="t", message="m", id="n-1")
    assert sent.event["notification"]["id"] == "n-1" and sent.users == [user] and sent.id
    assert await tab.recv() == sent.event
    with pytest.raises(PublishError, match="user_id: unknown field"):
        await ev.emit("notifications-cleared", user_id=user)
    with pytest.raises(PublishError, match="no-such-event: no such event"):
        await ev.emit("no-such-event", userId=user)
    with pytest.raises(TypeError):  # the generated methods have real signatures
        await ev.clear_notifications(user, "extra")  # type: ignore[call-arg]
    await silent(tab)


async def test_input_is_checked_before_anything_is_written(server: Server) -> None:
    user = await server.user()
    ev = events(server)
    cases = [
        (ev.send_notification(user, "LIKE", "t", "m"), "type must be one of"),
        (ev.send_notification({"id": user}, "LIKE_POST", "t", "m"), "userId"),  # type: ignore[arg-type]
        (ev.send_notification(user, "LIKE_POST", 5, "m"), "title"),  # type: ignore[arg-type]
        (
            ev.send_notification(
                user, "LIKE_POST", "t", "m", persist=True, created_at="2024-01-01T00:00:00Z"
            ),
            "createdAt",
        ),
        (ev.send_notification(user, "LIKE_POST", "t", "m", {"when": datetime.now}), "metadata"),
        (ev.send_notification(user, "LIKE_POST", "t", "m", persist="yes"), "persist"),  # type: ignore[arg-type]
        (ev.send_notification("x" * 201, "LIKE_POST", "t", "m"), "userId"),
        (ev.mark_notification_read(user, ""), "notificationId"),
        (ev.notify_new_post(["p"]), "post"),  # type: ignore[arg-type]
    ]
    for call, reason in cases:
        with pytest.raises(PublishError, match=reason):
            await call
    with pytest.raises(NotFound, match="userId"):
        await ev.send_notification("no-such-user", "LIKE_POST", "t", "m", persist=True)
    assert await count_notifications(server, user) == 0


async def test_connect_events_publishes_from_outside_the_server(tmp_path) -> None:
    """Another Python service: its own broker and database connections reach the server's clients."""
    if (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    settings = make_settings(tmp_path, None, BROADCAST_URL=REDIS_URL)
    async with running(settings) as srv:
        creator, fan = await srv.user("c", creator=True), await srv.user()
        post = await srv.post(creator)
        await demo.insert_subscription(srv.db, uuid.uuid4().hex, fan, creator)
        fan_tab = await watcher(srv, fan, {"type": "feed", "userId": fan})
        creator_tab = await srv.connect(creator)
        async with connect_events(settings) as ev:
            assert ev.publisher is not srv.services.publisher
            created = await ev.notify_new_post(post)
            note = await ev.send_notification(creator, "NEW_SUBSCRIBER", "New fan", "hi", persist=True)
        assert await fan_tab.recv() == created.event
        assert await creator_tab.recv() == note.event
        _later, unread = await subscribe_notifications(srv, creator)
        assert unread == {"notifications": [note.event["notification"]], "count": 1}
