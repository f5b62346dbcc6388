"""Direct messages (protocol §7.1): the conversation channel's access rule, and new_message, message_read
and tip_received delivered to the channel and the other participant's connections, each exactly once."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fonana_ws.db import demo
from fonana_ws.fonana.events import Events

from .conftest import API_KEY, Client, Server
from .test_events import silent, watcher

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
WHEN = "2024-01-02T03:04:05.678Z"


async def post(server: Server, name: str, body: Any) -> httpx.Response:
    return await server.http.post(f"/api/events/{name}", json=body, headers=HEADERS)


def channel(conversation_id: str) -> dict[str, str]:
    return {"type": "conversation", "id": conversation_id}


def message(message_id: str, sender: str, **fields: Any) -> dict[str, Any]:
    return {"id": message_id, "senderId": sender, **fields}


async def stats(server: Server) -> dict[str, Any]:
    response = await server.http.get("/stats")
    assert response.status_code == 200
    return response.json()


# -- the channel ------------------------------------------------------------------------------------------


async def test_each_participant_may_join_and_nobody_else(server: Server) -> None:
    alice, bob, carol = await server.user(), await server.user(), await server.user()
    conversation = await server.conversation(alice, bob)
    for user in (alice, bob):
        client = await server.connect(user)
        assert await client.subscribe(channel(conversation)) == {
            "type": "subscribed",
            "data": {"channel": channel(conversation), "channelKey": f"conversation_{conversation}"},
        }
    outsider = await server.connect(carol)
    for refused in (channel(conversation), channel("cv-no-such-conversation")):
        assert await outsider.subscribe(refused) == {
            "type": "error",
            "data": {"message": "Access denied to channel", "channel": refused},
        }
    # a participant is refused an unknown conversation too, like a locked post
    insider = await server.connect(alice)
    assert (await insider.subscribe(channel("cv-ghost")))["data"]["message"] == "Access denied to channel"
    # both answers are remembered for the access cache's TTL, as for posts
    access = server.services.store.access
    key = f"conversation_{conversation}"
    assert access.get(alice, key) is True and access.get(bob, key) is True and access.get(carol, key) is False


async def test_the_demo_conversation_is_between_the_demo_subscriber_and_creator(server: Server) -> None:
    await demo.seed_demo(server.db)  # the embedded default did it at start; on PostgreSQL, here
    assert await demo.seed_demo(server.db) is False  # once
    store = server.services.store
    assert await store.conversation_participants(demo.CONVERSATION) == (demo.SUBSCRIBER, demo.CREATOR)
    assert await store.conversation_participants("cv-ghost") is None
    rows = await server.db.fetch_all(
        'SELECT "senderId", "isPaid", price FROM "Message" WHERE "conversationId" = :c ORDER BY id',
        {"c": demo.CONVERSATION},
    )
    assert [tuple(r._mapping.values()) for r in rows] == [
        (demo.SUBSCRIBER, False, None),
        (demo.CREATOR, True, 2.5),
    ]
    for user, allowed in ((demo.SUBSCRIBER, True), (demo.CREATOR, True), (demo.OUTSIDER, False)):
        reply = await (await server.connect(user)).subscribe(channel(demo.CONVERSATION))
        assert reply["type"] == ("subscribed" if allowed else "error"), (user, reply)


# -- new_message --------------------------------------------------------------------------------------------


async def test_new_message_reaches_each_connection_once_and_only_the_participants(server: Server) -> None:
    alice, bob, carol = await server.user(), await server.user(), await server.user()
    conversation = await server.conversation(alice, bob)
    alice_open = await watcher(server, alice, channel(conversation))  # the sender's other tab, chat open
    alice_plain = await server.connect(alice)
    bob_open = await watcher(server, bob, channel(conversation))  # both routes reach it: once
    bob_plain = await server.connect(bob)
    carol_tab = await server.connect(carol)
    everyone = [alice_open, alice_plain, bob_open, bob_plain, carol_tab]
    before = (await stats(server))["totals"]["messages_relayed"]

    response = await post(
        server,
        "new-message",
        {"conversationId": conversation, "message": message("m1", alice, content="Hi Bob", createdAt=WHEN)},
    )
    assert response.status_code == 202, response.text
    answer = response.json()
    event = {
        "type": "new_message",
        "conversationId": conversation,
        "message": {
            "id": "m1",
            "conversationId": conversation,
            "senderId": alice,
            "content": "Hi Bob",
            "mediaUrl": None,
            "mediaType": None,
            "isPaid": False,
            "price": None,
            "createdAt": WHEN,
        },
    }
    assert answer["event"] == event
    assert answer["channels"] == [f"conversation_{conversation}"] and answer["users"] == [bob]
    for client in (alice_open, bob_open, bob_plain):
        assert await client.recv() == event
    await silent(*everyone, within=0.4)  # nobody a second copy; alice's plain tab and carol nothing

    # the other way round: the recipient is the row's fromUserId
    reply = {"conversationId": conversation, "message": message("m2", bob, content="Hi Alice")}
    response = await post(server, "new-message", reply)
    assert response.status_code == 202 and response.json()["users"] == [alice]
    event = response.json()["event"]
    assert event["message"]["senderId"] == bob and event["message"]["createdAt"]
    for client in (alice_open, alice_plain, bob_open):
        assert await client.recv() == event
    await silent(*everyone, within=0.4)
    assert (await stats(server))["totals"]["messages_relayed"] == before + 2


async def test_a_paid_message_goes_out_without_content_whoever_calls(server: Server) -> None:
    alice, bob = await server.user(), await server.user()
    conversation = await server.conversation(alice, bob)
    bob_tab = await server.connect(bob)
    paid = message(
        "m-paid",
        alice,
        content="the secret",
        mediaUrl="/media/secret.jpg",
        mediaType="image",
        isPaid=True,
        price=2.5,
        createdAt=WHEN,
        # a whole Message row: what the event does not carry is ignored, conversationId is the body's
        conversationId="cv-something-else",
        isRead=False,
        metadata={"a": 1},
    )
    response = await post(server, "new-message", {"conversationId": conversation, "message": paid})
    assert response.status_code == 202, response.text
    expected = {
        "id": "m-paid",
        "conversationId": conversation,
        "senderId": alice,
        "content": None,
        "mediaUrl": None,
        "mediaType": "image",
        "isPaid": True,
        "price": 2.5,
        "createdAt": WHEN,
    }
    assert response.json()["event"]["message"] == expected
    assert (await bob_tab.recv())["message"] == expected

    # the Python API applies the same rule
    emission = await Events.from_services(server.services).notify_new_message(conversation, paid)
    assert emission.event["message"] == expected and emission.users == [bob]
    assert (await bob_tab.recv())["message"] == expected

    # and so does every other route: /api/publish with an event the caller shaped itself, and the
    # Python publisher the CLI's `send raw --broker` uses
    raw = {"type": "new_message", "conversationId": conversation, "message": paid}
    response = await server.publish({"user": bob, "event": raw})
    assert response.status_code == 202, response.text
    got = await bob_tab.recv()
    assert got["message"]["content"] is None and got["message"]["mediaUrl"] is None, got
    assert got["message"]["price"] == 2.5 and got["message"]["isPaid"] is True
    await Events.from_services(server.services).publish(bob, raw)
    got = await bob_tab.recv()
    assert got["message"]["content"] is None and got["message"]["mediaUrl"] is None, got
    await silent(bob_tab)


# -- message_read and tip_received ------------------------------------------------------------------------


async def test_message_read_goes_to_the_channel_and_the_other_participant(server: Server) -> None:
    alice, bob, carol = await server.user(), await server.user(), await server.user()
    conversation = await server.conversation(alice, bob)
    alice_plain = await server.connect(alice)
    bob_open = await watcher(server, bob, channel(conversation))
    bob_plain = await server.connect(bob)
    carol_tab = await server.connect(carol)
    body = {"conversationId": conversation, "userId": bob, "messageIds": ["m1", "m2"]}
    response = await post(server, "message-read", body)
    assert response.status_code == 202, response.text
    event = {
        "type": "message_read",
        "conversationId": conversation,
        "userId": bob,
        "messageIds": ["m1", "m2"],
    }
    assert response.json()["event"] == event and response.json()["users"] == [alice]
    assert await alice_plain.recv() == event
    assert await bob_open.recv() == event  # the reader's tab with the chat open: through the channel
    await silent(alice_plain, bob_open, bob_plain, carol_tab)


async def test_tip_received_goes_to_every_connection_of_the_creator_only(server: Server) -> None:
    creator, fan = await server.user("c", creator=True), await server.user()
    first, second, fan_tab = (
        await server.connect(creator),
        await server.connect(creator),
        await server.connect(fan),
    )
    following = await watcher(server, fan, {"type": "creator", "id": creator})
    tip = {
        "id": "t1",
        "fromUserId": fan,
        "amount": 5,
        "message": "thanks!",
        "createdAt": "2024-01-02T05:04:05+02:00",
    }
    response = await post(server, "tip-received", {"creatorId": creator, "tip": tip})
    assert response.status_code == 202, response.text
    event = {
        "type": "tip_received",
        "creatorId": creator,
        "tip": {
            "id": "t1",
            "fromUserId": fan,
            "amount": 5,
            "message": "thanks!",
            "createdAt": "2024-01-02T03:04:05.000Z",
        },
    }
    assert response.json()["event"] == event and response.json()["users"] == [creator]
    assert response.json()["channels"] == []
    assert await first.recv() == event
    assert await second.recv() == event
    await silent(first, second, fan_tab, following)

    # the optional fields: message null, createdAt now
    response = await post(
        server, "tip-received", {"creatorId": creator, "tip": {"id": "t2", "fromUserId": fan, "amount": 0.5}}
    )
    assert response.status_code == 202, response.text
    sent = response.json()["event"]["tip"]
    assert sent["message"] is None and sent["amount"] == 0.5 and sent["createdAt"].endswith("Z")


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "body", "reason"),
    [
        ("new-message", {"message": {"id": "m", "senderId": "u"}}, "conversationId is required"),
        ("new-message", {"conversationId": "c"}, "message is required"),
        (
            "new-message",
            {"conversationId": "c", "message": "m"},
            "message must be an object with id and senderId",
        ),
        ("new-message", {"conversationId": "c", "message": {"id": "m"}}, "message.senderId is required"),
        (
            "new-message",
            {"conversationId": 5, "message": {"id": "m", "senderId": "u"}},
            "conversationId must be an id string",
        ),
        (
            "new-message",
            {"conversationId": "c", "message": {"id": "m", "senderId": "u", "isPaid": "yes"}},
            "message.isPaid must be true or false",
        ),
        (
            "new-message",
            {"conversationId": "c", "message": {"id": "m", "senderId": "u", "price": -1}},
            "message.price must be a number of 0 or more, or null",
        ),
        (
            "new-message",
            {"conversationId": "c", "message": {"id": "m", "senderId": "u", "content": 7}},
            "message.content must be a string or null",
        ),
        (
            "new-message",
            {"conversationId": "c", "message": {"id": "m", "senderId": "u", "createdAt": "now"}},
            "message.createdAt must be an ISO 8601 timestamp",
        ),
        (
            "new-message",
            {"conversationId": "c", "message": {"id": "m", "senderId": "u"}, "recipientId": "v"},
            "recipientId: unknown field",
        ),
        ("message-read", {"conversationId": "c", "userId": "u"}, "messageIds is required"),
        ("message-read", {"conversationId": "c", "messageIds": ["m"]}, "userId is required"),
        (
            "message-read",
            {"conversationId": "c", "userId": "u", "messageIds": "m"},
            "messageIds must be a list of id strings",
        ),
        ("tip-received", {"tip": {"id": "t", "fromUserId": "u", "amount": 1}}, "creatorId is required"),
        ("tip-received", {"creatorId": "c", "tip": {"id": "t", "fromUserId": "u"}}, "tip.amount is required"),
        (
            "tip-received",
            {"creatorId": "c", "tip": {"id": "t", "fromUserId": "u", "amount": 0}},
            "tip.amount must be a number above 0",
        ),
        (
            "tip-received",
            {"creatorId": "c", "tip": {"id": "t", "fromUserId": "u", "amount": "5"}},
            "tip.amount must be a number above 0",
        ),
        ("tip-received", {"creatorId": "c", "tip": {"id": "t", "amount": 1}}, "tip.fromUserId is required"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(server: Server, name: str, body: Any, reason: str) -> None:
    response = await post(server, name, body)
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"], response.json()


async def test_unknown_references_are_404_and_outsiders_409(server: Server) -> None:
    alice, bob, carol = await server.user(), await server.user(), await server.user()
    conversation = await server.conversation(alice, bob)
    watchers: list[Client] = [
        await watcher(server, alice, channel(conversation)),
        await server.connect(bob),
        await server.connect(carol),
    ]
    cases = [
        (
            "new-message",
            {"conversationId": "cv-ghost", "message": message("m", alice)},
            404,
            "conversationId: no conversation cv-ghost",
        ),
        (
            "message-read",
            {"conversationId": "cv-ghost", "userId": alice, "messageIds": ["m"]},
            404,
            "conversationId: no conversation cv-ghost",
        ),
        (
            "new-message",
            {"conversationId": conversation, "message": message("m", carol)},
            409,
            f"message.senderId: user {carol} is not a participant of conversation {conversation}",
        ),
        (
            "message-read",
            {"conversationId": conversation, "userId": carol, "messageIds": ["m"]},
            409,
            f"userId: user {carol} is not a participant of conversation {conversation}",
        ),
        (
            "tip-received",
            {"creatorId": "ghost", "tip": {"id": "t", "fromUserId": alice, "amount": 1}},
            404,
            "creatorId: no user ghost",
        ),
        (
            "tip-received",
            {"creatorId": bob, "tip": {"id": "t", "fromUserId": "ghost", "amount": 1}},
            404,
            "tip.fromUserId: no user ghost",
        ),
    ]
    for name, body, status, reason in cases:
        response = await post(server, name, body)
        assert response.status_code == status, (name, response.text)
        assert response.json() == {"error": reason}, name
    await silent(*watchers)


# -- metrics ----------------------------------------------------------------------------------------------


async def test_metrics_count_messages_and_conversation_subscriptions(server: Server) -> None:
    alice, bob = await server.user(), await server.user()
    conversation = await server.conversation(alice, bob)
    before = await stats(server)
    tab = await watcher(server, alice, channel(conversation))
    # any route counts: here /api/publish with a new_message the caller shaped itself
    raw = {"type": "new_message", "conversationId": conversation, "message": {"senderId": bob}}
    publish = await server.publish({"channel": f"conversation_{conversation}", "event": raw})
    assert publish.status_code == 202
    assert await tab.recv() == raw
    after = await stats(server)
    assert after["totals"]["messages_relayed"] == before["totals"]["messages_relayed"] + 1
    assert after["subscriptions"]["conversation"] == before["subscriptions"]["conversation"] + 1
    assert after["totals"]["subscribes"]["conversation"] == before["totals"]["subscribes"]["conversation"] + 1
    text = (await server.http.get("/metrics")).text
    assert f"fonana_ws_messages_total {float(after['totals']['messages_relayed'])}" in text
    assert 'fonana_ws_subscriptions{type="conversation"}' in text
