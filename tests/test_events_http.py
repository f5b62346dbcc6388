"""The typed HTTP endpoints: every event over ``POST /api/events/<name>`` with the server API key, the
validation reasons, 404 for unknown references, and an OpenAPI description that matches the routes."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from fonana_ws.db import demo
from fonana_ws.db import notifications as sql
from fonana_ws.fonana.errors import Conflict, NotFound
from fonana_ws.fonana.events import BY_NAME, EVENTS
from fonana_ws.web.app import create_app
from fonana_ws.web.events_api import OPENAPI_PATH, path

from .conftest import API_KEY, Server
from .test_events import silent, subscribe_notifications, watcher

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


async def post(server: Server, name: str, body: Any, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return await server.http.post(f"/api/events/{name}", content=body, headers=headers)
    return await server.http.post(f"/api/events/{name}", json=body, headers=headers)


async def test_every_endpoint_answers_202_and_delivers_its_event(server: Server) -> None:
    creator = await server.user("c", creator=True)
    user, fan = await server.user(), await server.user()
    post_id = await server.post(creator)
    await server.db.execute('UPDATE posts SET "likesCount" = 3 WHERE id = :id', {"id": post_id})
    await demo.insert_subscription(server.db, uuid.uuid4().hex, fan, creator)
    stored = await sql.insert_notification(server.db, user, "LIKE_POST", "t", "m")

    user_tab = await server.connect(user)
    creator_tab = await server.connect(creator)
    post_tab = await watcher(server, await server.user(), {"type": "post", "postId": post_id})
    following = await watcher(server, await server.user(), {"type": "creator", "id": creator})
    fan_feed = await watcher(server, fan, {"type": "feed", "userId": fan})
    comment = {"id": "k1", "userId": user, "content": "hi", "createdAt": "2024-01-02T03:04:05.678Z"}
    conversation = await server.conversation(user, fan)  # fan writes to user; fan_feed is fan's tab
    when = "2024-01-02T03:04:05.678Z"

    # name -> (body, the clients that must receive it, the exact event, or None: checked below)
    cases: dict[str, tuple[dict[str, Any], list, dict[str, Any] | None]] = {
        "notification": (
            {"userId": user, "type": "LIKE_POST", "title": "T", "message": "M", "metadata": {"a": 1}},
            [user_tab],
            None,
        ),
        "notification-read": (
            {"userId": user, "notificationId": stored["id"]},
            [user_tab],
            {"type": "notification_read", "userId": user, "notificationId": stored["id"]},
        ),
        "notifications-cleared": (
            {"userId": user},
            [user_tab],
            {"type": "notifications_cleared", "userId": user},
        ),
        "post-liked": (
            {"postId": post_id, "userId": user},
            [post_tab],
            {"type": "post_liked", "postId": post_id, "userId": user, "likesCount": 3},
        ),
        "post-unliked": (
            {"postId": post_id, "userId": user},
            [post_tab],
            {"type": "post_unliked", "postId": post_id, "userId": user, "likesCount": 3},
        ),
        "post-created": ({"post": post_id}, [following, fan_feed], None),
        "comment-added": (
            {"postId": post_id, "comment": comment},
            [post_tab],
            {"type": "comment_added", "postId": post_id, "comment": comment},
        ),
        "comment-deleted": (
            {"postId": post_id, "commentId": "k1"},
            [post_tab],
            {"type": "comment_deleted", "postId": post_id, "commentId": "k1"},
        ),
        "creator-updated": (
            {"creatorId": creator, "changes": {"avatar": "/a.png"}},
            [following],
            {"type": "creator_updated", "creatorId": creator, "data": {"avatar": "/a.png"}},
        ),
        "new-subscription": (
            {"creatorId": creator, "userId": fan},
            [creator_tab],
            {"type": "new_subscription", "creatorId": creator, "userId": fan},
        ),
        "feed-update": (
            {"userId": user, "posts": [{"id": post_id}]},
            [user_tab],
            {"type": "feed_update", "userId": user, "posts": [{"id": post_id}]},
        ),
        "new-message": (
            {"conversationId": conversation, "message": {"id": "m1", "senderId": fan, "createdAt": when}},
            [user_tab],
            {
                "type": "new_message",
                "conversationId": conversation,
                "message": {
                    "id": "m1",
                    "conversationId": conversation,
                    "senderId": fan,
                    "content": None,
                    "mediaUrl": None,
                    "mediaType": None,
                    "isPaid": False,
                    "price": None,
                    "createdAt": when,
                },
            },
        ),
        "message-read": (
            {"conversationId": conversation, "userId": fan, "messageIds": ["m1"]},
            [user_tab],
            {"type": "message_read", "conversationId": conversation, "userId": fan, "messageIds": ["m1"]},
        ),
        "tip-received": (
            {"creatorId": creator, "tip": {"id": "t1", "fromUserId": fan, "amount": 5, "createdAt": when}},
            [creator_tab],
            {
                "type": "tip_received",
                "creatorId": creator,
                "tip": {"id": "t1", "fromUserId": fan, "amount": 5, "message": None, "createdAt": when},
            },
        ),
        "post-deleted": ({"postId": post_id}, [post_tab], {"type": "post_deleted", "postId": post_id}),
    }
    assert set(cases) == set(BY_NAME), "every endpoint is exercised here"
    everyone = [user_tab, creator_tab, post_tab, following, fan_feed]
    for name, (body, receivers, expected) in cases.items():
        response = await post(server, name, body)
        assert response.status_code == 202, (name, response.text)
        answer = response.json()
        event = answer["event"]
        assert event["type"] == BY_NAME[name].event
        if expected is not None:
            assert event == expected, name
        if name == "notification":
            assert event["notification"]["metadata"] == {"a": 1} and answer["users"] == [user]
        if name == "post-created":
            assert event["creatorId"] == creator and event["post"]["id"] == post_id
            assert answer["channels"] == [f"creator_{creator}", f"feed_{fan}"]
        assert answer["ok"] is True and answer["id"]
        for client in receivers:
            assert await client.recv() == event, name
        await silent(*everyone, within=0.15)

    assert answer["channels"] == [f"post_{post_id}"] and answer["users"] == []


async def test_notification_over_http_persists_once_and_is_listed_later(server: Server) -> None:
    user = await server.user()
    body = {"userId": user, "type": "NEW_MESSAGE", "title": "Hi", "message": "M", "persist": True}
    response = await post(server, "notification", body)
    assert response.status_code == 202
    answer = response.json()
    notification = answer["event"]["notification"]
    assert answer["users"] == [user] and answer["channels"] == []
    assert notification == await sql.get_notification(server.db, notification["id"])
    _later, unread = await subscribe_notifications(server, user)
    assert unread == {"notifications": [notification], "count": 1}

    # persist false: the web app wrote the row; the server announces it and writes nothing
    body = {"userId": user, "type": "NEW_MESSAGE", "title": "Hi", "message": "M", "id": "web-row-1"}
    response = await post(server, "notification", body)
    assert response.status_code == 202 and response.json()["event"]["notification"]["id"] == "web-row-1"
    count = await server.db.fetch_val('SELECT COUNT(*) FROM notifications WHERE "userId" = :u', {"u": user})
    assert count == 1

    other = await server.user()
    taken = {"userId": other, "type": "NEW_MESSAGE", "title": "x", "message": "y", "persist": True}
    response = await post(server, "notification", {**taken, "id": notification["id"]})
    assert response.status_code == 409 and "another user" in response.json()["error"]


@pytest.mark.parametrize(
    ("name", "body", "reason"),
    [
        ("notification", b"not json", "not valid JSON"),
        ("notification", b"[1, 2]", "body must be a JSON object"),
        ("notification", {"type": "LIKE_POST", "title": "t", "message": "m"}, "userId is required"),
        (
            "notification",
            {"userId": "u", "type": "LIKE", "title": "t", "message": "m"},
            "type must be one of",
        ),
        ("notification", {"userId": "u", "type": "LIKE_POST", "title": 5, "message": "m"}, "title must be"),
        (
            "notification",
            {"userId": "u", "type": "LIKE_POST", "title": "t", "message": "m", "persist": "yes"},
            "persist",
        ),
        (
            "notification",
            {"userId": "u", "type": "LIKE_POST", "title": "t", "message": "m", "userid": "u"},
            "userid: unknown field",
        ),
        (
            "notification",
            {"userId": "u", "type": "LIKE_POST", "title": "t", "message": "m", "createdAt": "soon"},
            "createdAt",
        ),
        (
            "notification",
            {"userId": "x" * 201, "type": "LIKE_POST", "title": "t", "message": "m"},
            "userId must be an id of 1 to 200",
        ),
        (
            "notification",
            {"userId": 7, "type": "LIKE_POST", "title": "t", "message": "m"},
            "userId must be an id string",
        ),
        ("notification-read", {"userId": "u"}, "notificationId is required"),
        ("post-liked", {"postId": "", "userId": "u"}, "postId must be an id string"),
        ("post-created", {"post": []}, "post must be a post id or a post object"),
        ("post-created", {"post": {"title": "no id"}}, "post.id"),
        (
            "post-created",
            {"post": "p", "subscriberIds": ["a", 3]},
            "subscriberIds must be a list of id strings",
        ),
        ("comment-added", {"postId": "p", "comment": {"id": "k", "userId": "u"}}, "comment.content"),
        ("comment-added", {"postId": "p", "comment": "nice"}, "comment must be an object"),
        ("comment-deleted", {"postId": "p"}, "commentId is required"),
        ("creator-updated", {"creatorId": "c", "changes": {}}, "changes must be an object with at least one"),
        ("creator-updated", {"creatorId": "c", "data": {"a": 1}}, "data: unknown field"),
        ("new-subscription", {"creatorId": "c"}, "userId is required"),
        ("feed-update", {"userId": "u", "posts": "p1"}, "posts must be a list"),
    ],
)
async def test_validation_errors_name_the_field(server: Server, name: str, body: Any, reason: str) -> None:
    response = await post(server, name, body)
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"], response.json()


async def test_unknown_references_are_404(server: Server) -> None:
    creator = await server.user("c", creator=True)
    user, other = await server.user(), await server.user()
    post_id = await server.post(creator)
    theirs = await sql.insert_notification(server.db, other, "LIKE_POST", "t", "m")
    user_tab = await server.connect(user)
    cases = [
        (
            "notification",
            {"userId": "ghost", "type": "LIKE_POST", "title": "t", "message": "m"},
            "userId: no user ghost",
        ),
        ("notification-read", {"userId": user, "notificationId": theirs["id"]}, "notificationId"),
        ("notification-read", {"userId": user, "notificationId": "ghost"}, "notificationId"),
        ("notifications-cleared", {"userId": "ghost"}, "userId: no user"),
        ("post-liked", {"postId": "ghost", "userId": user}, "postId: no post ghost"),
        ("post-unliked", {"postId": post_id, "userId": "ghost"}, "userId: no user ghost"),
        ("post-created", {"post": "ghost"}, "post.id: no post ghost"),
        (
            "comment-added",
            {"postId": "ghost", "comment": {"id": "k", "userId": user, "content": "x"}},
            "postId",
        ),
        (
            "comment-added",
            {"postId": post_id, "comment": {"id": "k", "userId": "ghost", "content": "x"}},
            "comment.userId",
        ),
        ("comment-deleted", {"postId": "ghost", "commentId": "k"}, "postId: no post"),
        ("creator-updated", {"creatorId": "ghost", "changes": {"a": 1}}, "creatorId: no user"),
        ("new-subscription", {"creatorId": "ghost", "userId": user}, "creatorId: no user"),
        ("new-subscription", {"creatorId": creator, "userId": "ghost"}, "userId: no user"),
        ("feed-update", {"userId": "ghost", "posts": []}, "userId: no user"),
        (
            "new-message",
            {"conversationId": "ghost", "message": {"id": "m", "senderId": user}},
            "conversationId: no conversation ghost",
        ),
        (
            "message-read",
            {"conversationId": "ghost", "userId": user, "messageIds": ["m"]},
            "conversationId: no conversation ghost",
        ),
        (
            "tip-received",
            {"creatorId": "ghost", "tip": {"id": "t", "fromUserId": user, "amount": 1}},
            "creatorId: no user",
        ),
        (
            "tip-received",
            {"creatorId": creator, "tip": {"id": "t", "fromUserId": "ghost", "amount": 1}},
            "tip.fromUserId: no user ghost",
        ),
    ]
    for name, body, reason in cases:
        response = await post(server, name, body)
        assert response.status_code == 404, (name, response.text)
        assert reason in response.json()["error"], (name, response.json())
    assert (await sql.get_notification(server.db, theirs["id"]))["isRead"] is False
    await silent(user_tab)
    # a deleted post is announced although its row is gone
    assert (await post(server, "post-deleted", {"postId": "ghost"})).status_code == 202


async def test_the_api_key_is_required(server: Server) -> None:
    user = await server.user()
    for endpoint in EVENTS:
        missing = await post(server, endpoint.name, {"userId": user}, key=None)
        assert missing.status_code == 401 and "API key" in missing.json()["error"]
        wrong = await post(server, endpoint.name, {"userId": user}, key="wrong-" + API_KEY)
        assert wrong.status_code == 401
    assert (
        await post(server, "feed-update", {"userId": user, "posts": []}, key=server.settings.jwt_secret)
    ).status_code == 401


async def test_openapi_describes_every_route(server: Server) -> None:
    response = await server.http.get(OPENAPI_PATH)
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    app: Any = create_app(server.settings)  # not started: only its routes are read
    while not hasattr(app, "routes"):  # the Starlette app inside any wrapper
        app = app.app
    posted = {
        r.path
        for r in app.routes
        if isinstance(r, Route) and r.path.startswith("/api/") and "POST" in (r.methods or ())
    }
    assert posted == {p for p, ops in doc["paths"].items() if "post" in ops}
    others = {"/api/publish", "/api/publish/batch", "/api/users/{id}/disconnect", "/api/access/revoke"}
    assert {path(e) for e in EVENTS} | others == posted
    for endpoint in EVENTS:
        operation = doc["paths"][path(endpoint)]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert set(schema["properties"]) == {f.name for f in endpoint.fields}
        assert set(schema["required"]) == {f.name for f in endpoint.fields if f.required}
        assert schema["additionalProperties"] is False
        assert endpoint.event in operation["description"]
        assert {"202", "400", "401"} <= set(operation["responses"])
        # 404 and 409 where the delivery rule can answer them: post-deleted looks nothing up (above)
        assert ("404" in operation["responses"]) == (NotFound in endpoint.raises), endpoint.name
        assert ("409" in operation["responses"]) == (Conflict in endpoint.raises), endpoint.name
        # the documented example is a body the endpoint accepts
        example = operation["requestBody"]["content"]["application/json"]["example"]
        endpoint.validate(example)
