"""Protocol §2: every channel type allowed and refused, replies, unread notifications, bad frames."""

from __future__ import annotations

import json
from datetime import timedelta

import websockets

from fonana_ws.db import demo
from fonana_ws.db.store import utcnow

from .conftest import Server, make_settings, running


async def add_notification(
    server: Server, user: str, nid: str, *, read: bool = False, minutes_ago: int = 0
) -> None:
    await server.db.execute(
        """INSERT INTO notifications (id, "userId", type, title, message, "isRead", metadata, "createdAt")
           VALUES (:id, :user, 'LIKE_POST', 'Liked', 'Someone liked your post', :read, :meta, :at)""",
        {
            "id": nid,
            "user": user,
            "read": read,
            "meta": json.dumps({"postId": "p1"}),
            "at": utcnow() - timedelta(minutes=minutes_ago),
        },
    )


async def test_own_notifications_and_feed_only(server: Server) -> None:
    me, other = await server.user(), await server.user()
    client = await server.connect(me)
    for kind in ("notifications", "feed"):
        channel = {"type": kind, "userId": me}
        assert await client.subscribe(channel) == {
            "type": "subscribed",
            "data": {"channel": channel, "channelKey": f"{kind}_{me}"},
        }
        theirs = {"type": kind, "userId": other}
        assert await client.subscribe(theirs) == {
            "type": "error",
            "data": {"message": "Access denied to channel", "channel": theirs},
        }


async def test_creator_channel_open_to_any_user(server: Server) -> None:
    client = await server.connect(await server.user())
    channel = {"type": "creator", "id": "someone"}
    reply = await client.subscribe(channel)
    assert reply["type"] == "subscribed" and reply["data"]["channelKey"] == "creator_someone"


async def test_post_access_rules(server: Server) -> None:
    creator = await server.user("c", creator=True)
    open_post = await server.post(creator)
    locked = await server.post(creator, locked=True)
    tiered = await server.post(creator, tier="premium")
    subscriber, buyer, expired, pending, outsider = [await server.user() for _ in range(5)]
    await demo.insert_subscription(server.db, f"s-{subscriber}", subscriber, creator)
    await demo.insert_subscription(server.db, f"s-{expired}", expired, creator, valid_for=timedelta(days=-1))
    await demo.insert_subscription(server.db, f"s-{pending}", pending, creator, status="PENDING")
    await server.db.execute(
        """INSERT INTO post_purchases (id, "postId", "userId", "paymentStatus", "purchasedAt")
           VALUES (:id, :post, :user, 'COMPLETED', :now)""",
        {"id": f"pp-{buyer}", "post": locked, "user": buyer, "now": utcnow()},
    )

    async def allowed(user: str, post: str) -> bool:
        client = await server.connect(user)
        reply = await client.subscribe({"type": "post", "postId": post})
        await client.close()
        if reply["type"] == "error":
            assert reply["data"]["message"] == "Access denied to channel"
            return False
        assert reply["data"]["channelKey"] == f"post_{post}"
        return True

    assert await allowed(outsider, open_post)
    assert not await allowed(outsider, locked)
    assert not await allowed(outsider, tiered)
    assert await allowed(creator, locked)
    assert await allowed(subscriber, locked)
    assert await allowed(subscriber, tiered)
    assert await allowed(buyer, locked)
    assert not await allowed(buyer, tiered)  # the purchase is of the other post
    assert not await allowed(expired, locked)
    assert not await allowed(pending, locked)
    assert not await allowed(outsider, "no-such-post")


async def test_subscribe_twice_and_unsubscribe_never_joined(server: Server) -> None:
    user = await server.user()
    client = await server.connect(user)
    channel = {"type": "creator", "id": f"twice-{user}"}
    assert (await client.subscribe(channel))["type"] == "subscribed"
    assert (await client.subscribe(channel))["type"] == "subscribed"
    key = f"creator_twice-{user}"
    assert len(server.services.hub.by_key[key]) == 1
    other = {"type": "creator", "id": "never-joined"}
    await client.send({"type": "unsubscribe", "channel": other})
    assert await client.recv() == {
        "type": "unsubscribed",
        "data": {"channel": other, "channelKey": "creator_never-joined"},
    }


async def test_no_events_after_unsubscribe_or_refusal(server: Server) -> None:
    creator = await server.user("c", creator=True)
    locked = await server.post(creator, locked=True)
    outsider = await server.user()
    client = await server.connect(outsider)
    refused = await client.subscribe({"type": "post", "postId": locked})
    assert refused["type"] == "error"
    channel = {"type": "creator", "id": creator}
    await client.subscribe(channel)
    assert (
        await server.publish({"channel": f"post_{locked}", "event": {"type": "post_liked"}})
    ).status_code == 202
    assert (
        await server.publish({"channel": f"creator_{creator}", "event": {"type": "creator_updated"}})
    ).status_code == 202
    assert (await client.recv())["type"] == "creator_updated"
    await client.send({"type": "unsubscribe", "channel": channel})
    assert (await client.recv())["type"] == "unsubscribed"
    await server.publish({"channel": f"creator_{creator}", "event": {"type": "creator_updated"}})
    await client.nothing(0.4)


async def test_unread_notifications_newest_first_at_most_20_once_per_connection(server: Server) -> None:
    user = await server.user()
    for i in range(25):
        await add_notification(server, user, f"n-{user}-{i:02d}", minutes_ago=100 - i)
    await add_notification(server, user, f"n-{user}-read", read=True)
    client = await server.connect(user)
    channel = {"type": "notifications", "userId": user}
    await client.subscribe(channel)
    frame = await client.recv_type("unread_notifications")
    items = frame["data"]["notifications"]
    assert frame["data"]["count"] == len(items) == 20
    assert items[0]["id"] == f"n-{user}-24" and items[-1]["id"] == f"n-{user}-05"
    first = items[0]
    assert set(first) == {"id", "userId", "type", "title", "message", "isRead", "metadata", "createdAt"}
    assert first["isRead"] is False and first["metadata"] == {"postId": "p1"} and first["type"] == "LIKE_POST"
    assert first["createdAt"].endswith("Z") and "T" in first["createdAt"]
    # a second subscribe on the same connection does not resend them
    await client.send({"type": "unsubscribe", "channel": channel})
    await client.recv_type("unsubscribed")
    await client.subscribe(channel)
    await client.nothing(0.3)
    # a new connection gets them again
    second = await server.connect(user)
    await second.subscribe(channel)
    assert (await second.recv_type("unread_notifications"))["data"]["count"] == 20


async def test_no_unread_frame_when_none(server: Server) -> None:
    user = await server.user()
    client = await server.connect(user)
    await client.subscribe({"type": "notifications", "userId": user})
    await client.nothing(0.3)


async def test_bad_frames_get_an_error_and_the_connection_stays(server: Server) -> None:
    client = await server.connect(await server.user())
    invalid = {"type": "error", "data": {"message": "Invalid message format"}}
    for frame in ["not json", "[1,2]", '"text"', '{"type":"dance"}', '{"no":"type"}', '{"type":"subscribe"}']:
        await client.send(frame)
        assert await client.recv() == invalid, frame
    for channel in [{"type": "nope"}, {"type": "post"}, {"type": "post", "postId": {"x": 1}}, "post_1", None]:
        await client.send({"type": "subscribe", "channel": channel})
        reply = await client.recv()
        assert reply["type"] == "error" and reply["data"]["message"] == "Invalid message format", reply
    await client.ws.send(b"\x00\x01binary")
    assert await client.recv() == invalid
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}


async def test_oversized_frame_closes_with_1009(server: Server) -> None:
    client = await server.connect(await server.user())
    await client.send("x" * (server.settings.max_message_size + 1))
    try:
        await client.recv()
        raise AssertionError("still open")
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 1009


async def test_subscriptions_per_connection_are_capped(tmp_path) -> None:
    async with running(make_settings(tmp_path, None, WS_MAX_SUBSCRIPTIONS="3")) as srv:
        client = await srv.connect(await srv.user())
        for i in range(3):
            assert (await client.subscribe({"type": "creator", "id": f"cap{i}"}))["type"] == "subscribed"
        assert (await client.subscribe({"type": "creator", "id": "cap0"}))[
            "type"
        ] == "subscribed"  # again: ok
        over = {"type": "creator", "id": "cap3"}
        assert await client.subscribe(over) == {
            "type": "error",
            "data": {
                "message": "Failed to subscribe",
                "channel": over,
                "reason": "subscription limit (3) reached",
            },
        }
        assert "creator_cap3" not in srv.services.hub.by_key
        await client.send({"type": "unsubscribe", "channel": {"type": "creator", "id": "cap1"}})
        await client.recv_type("unsubscribed")
        assert (await client.subscribe(over))["type"] == "subscribed"  # room again
