"""One socket's protocol rules (protocol §2), as plain calls on ``protocol.session.Session``: no socket."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fonana_ws.protocol import frames
from fonana_ws.protocol.session import (
    MAX_CONVERSATIONS,
    CatchUp,
    CheckAccess,
    CheckConversation,
    CheckToken,
    Close,
    Expire,
    Join,
    Leave,
    Pending,
    PendingTyping,
    QueryPresence,
    RelayTyping,
    Reply,
    SendUnread,
    Session,
    WatchPresence,
)

pytestmark = pytest.mark.unit

USER = "u1"
POST = {"type": "post", "postId": "p1"}
CREATOR = {"type": "creator", "id": "c1"}
OWN_NOTIFICATIONS = {"type": "notifications", "userId": USER}


def frame(kind: str, channel: Any = None) -> str:
    body: dict[str, Any] = {"type": kind}
    if channel is not None:
        body["channel"] = channel
    return orjson.dumps(body).decode()


def replies(actions: list[Any]) -> list[dict[str, Any]]:
    """The replies among ``actions``, decoded; fails if anything else is there."""
    assert all(isinstance(a, Reply) for a in actions), actions
    return [orjson.loads(a.text) for a in actions]


def join(session: Session, channel: dict[str, Any], key: str) -> list[Any]:
    """Subscribe all the way through an allowed access check and a join that worked."""
    assert session.receive(frame("subscribe", channel)) == [CheckAccess(key)]
    assert session.access_decided(key, True) == [Join(key)]
    return session.joined(key, True)


def test_ping_is_answered_pong() -> None:
    session = Session(USER, 10)
    assert replies(session.receive(frame("ping"))) == [{"type": "pong"}]
    assert replies(session.receive(b'{"type": "ping"}')) == [{"type": "pong"}]  # binary: the same


@pytest.mark.parametrize(
    "data",
    ["not json", "[1,2]", '"text"', '{"type":"dance"}', '{"no":"type"}', '{"type":"subscribe"}', b"\x00\x01"],
)
def test_bad_frame_is_an_invalid_format_error(data: str | bytes) -> None:
    session = Session(USER, 10)
    assert replies(session.receive(data)) == [{"type": "error", "data": {"message": frames.INVALID_FORMAT}}]
    assert session.pending is None and not session.keys


def test_frame_nested_too_deep_is_an_invalid_format_error() -> None:
    deep: Any = 1
    for _ in range(frames.MAX_FRAME_DEPTH):
        deep = {"x": deep}
    session = Session(USER, 10)
    text = orjson.dumps({"type": "subscribe", "channel": deep}).decode()
    assert replies(session.receive(text)) == [{"type": "error", "data": {"message": frames.INVALID_FORMAT}}]


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize(
    "channel",
    [{"type": "nope"}, {"type": "post"}, {"type": "post", "postId": {"x": 1}}, "post_1", [1], 7],
    ids=["unknown type", "no id", "object id", "a key", "a list", "a number"],
)
def test_unknown_channel_is_an_invalid_format_error_echoing_it(kind: str, channel: Any) -> None:
    session = Session(USER, 10)
    assert replies(session.receive(frame(kind, channel))) == [
        {"type": "error", "data": {"message": frames.INVALID_FORMAT, "channel": channel}}
    ]
    assert session.pending is None and not session.keys


def test_null_channel_is_an_invalid_format_error_without_channel() -> None:
    session = Session(USER, 10)
    reply = replies(session.receive('{"type": "subscribe", "channel": null}'))
    assert reply == [{"type": "error", "data": {"message": frames.INVALID_FORMAT}}]


def test_subscribe_allowed_and_joined_answers_subscribed() -> None:
    session = Session(USER, 10)
    assert session.receive(frame("subscribe", POST)) == [CheckAccess("post_p1")]
    assert session.pending == Pending("post_p1", POST, allowed=False)
    assert session.access_decided("post_p1", True) == [Join("post_p1")]
    assert session.pending == Pending("post_p1", POST, allowed=True)
    assert "post_p1" not in session.keys  # not before the hub says so
    assert replies(session.joined("post_p1", True)) == [
        {"type": "subscribed", "data": {"channel": POST, "channelKey": "post_p1"}}
    ]
    assert session.keys == {"post_p1"} and session.pending is None


def test_integer_ids_become_their_decimal_string() -> None:
    session = Session(USER, 10)
    channel = {"type": "post", "postId": 42}
    assert replies(join(session, channel, "post_42")) == [
        {"type": "subscribed", "data": {"channel": channel, "channelKey": "post_42"}}
    ]


def test_access_denied() -> None:
    session = Session(USER, 10)
    assert session.receive(frame("subscribe", POST)) == [CheckAccess("post_p1")]
    assert replies(session.access_decided("post_p1", False)) == [
        {"type": "error", "data": {"message": frames.ACCESS_DENIED, "channel": POST}}
    ]
    assert session.pending is None and not session.keys
    assert replies(session.receive(frame("ping"))) == [{"type": "pong"}]  # the next frame is handled


def test_access_check_failing_is_a_subscribe_failure() -> None:
    session = Session(USER, 10)
    session.receive(frame("subscribe", POST))
    assert replies(session.access_failed("post_p1")) == [
        {"type": "error", "data": {"message": frames.SUBSCRIBE_FAILED, "channel": POST}}
    ]
    assert session.pending is None and not session.keys


def test_join_failing_is_a_subscribe_failure_and_nothing_is_joined() -> None:
    session = Session(USER, 10)
    session.receive(frame("subscribe", CREATOR))
    session.access_decided("creator_c1", True)
    assert replies(session.joined("creator_c1", False)) == [
        {"type": "error", "data": {"message": frames.SUBSCRIBE_FAILED, "channel": CREATOR}}
    ]
    assert session.pending is None and not session.keys
    # and a later try starts from the beginning
    assert session.receive(frame("subscribe", CREATOR)) == [CheckAccess("creator_c1")]


def test_duplicate_subscribe_keeps_one_and_answers_subscribed_again() -> None:
    session = Session(USER, 1)  # at the cap: a repeat is no new channel
    join(session, CREATOR, "creator_c1")
    again = join(session, CREATOR, "creator_c1")
    assert replies(again) == [
        {"type": "subscribed", "data": {"channel": CREATOR, "channelKey": "creator_c1"}}
    ]
    assert session.keys == {"creator_c1"}


def test_subscription_cap_refuses_a_new_channel_only() -> None:
    session = Session(USER, 2)
    join(session, CREATOR, "creator_c1")
    join(session, POST, "post_p1")
    over = {"type": "creator", "id": "c3"}
    assert replies(session.receive(frame("subscribe", over))) == [
        {
            "type": "error",
            "data": {
                "message": frames.SUBSCRIBE_FAILED,
                "channel": over,
                "reason": "subscription limit (2) reached",
            },
        }
    ]
    assert session.pending is None  # refused before any access check
    assert session.receive(frame("subscribe", POST)) == [CheckAccess("post_p1")]  # held already: fine
    session.access_decided("post_p1", False)
    session.receive(frame("unsubscribe", CREATOR))
    assert session.receive(frame("subscribe", over)) == [CheckAccess("creator_c3")]  # room again


def test_unsubscribe_leaves_and_answers_unsubscribed() -> None:
    session = Session(USER, 10)
    join(session, CREATOR, "creator_c1")
    actions = session.receive(frame("unsubscribe", CREATOR))
    assert actions[0] == Leave("creator_c1")
    assert replies(actions[1:]) == [
        {"type": "unsubscribed", "data": {"channel": CREATOR, "channelKey": "creator_c1"}}
    ]
    assert not session.keys


def test_unsubscribe_of_a_key_never_joined_answers_unsubscribed_and_leaves_nothing() -> None:
    session = Session(USER, 10)
    join(session, POST, "post_p1")
    other = {"type": "creator", "id": "never-joined"}
    assert replies(session.receive(frame("unsubscribe", other))) == [
        {"type": "unsubscribed", "data": {"channel": other, "channelKey": "creator_never-joined"}}
    ]
    assert session.keys == {"post_p1"}


def test_unread_notifications_are_loaded_once_after_the_first_join_of_ones_own() -> None:
    session = Session(USER, 10)
    actions = join(session, OWN_NOTIFICATIONS, "notifications_u1")
    assert replies(actions[:1])[0]["type"] == "subscribed"
    assert actions[1:] == [SendUnread()]  # after the reply
    assert session.sent_unread
    notifications = [{"id": "n2"}, {"id": "n1"}]
    assert replies(session.unread_loaded(notifications)) == [
        {"type": "unread_notifications", "data": {"notifications": notifications, "count": 2}}
    ]
    session.receive(frame("unsubscribe", OWN_NOTIFICATIONS))
    assert replies(join(session, OWN_NOTIFICATIONS, "notifications_u1"))[0]["type"] == "subscribed"


def test_no_unread_frame_when_there_are_none_and_not_for_other_channels() -> None:
    session = Session(USER, 10)
    assert session.unread_loaded([]) == []
    assert len(join(session, {"type": "feed", "userId": USER}, "feed_u1")) == 1
    assert len(join(session, CREATOR, "creator_c1")) == 1
    assert not session.sent_unread


def test_unread_not_sent_after_a_failed_join() -> None:
    session = Session(USER, 10)
    session.receive(frame("subscribe", OWN_NOTIFICATIONS))
    session.access_decided("notifications_u1", True)
    session.joined("notifications_u1", False)
    assert not session.sent_unread
    assert SendUnread() in join(session, OWN_NOTIFICATIONS, "notifications_u1")


def test_frames_are_decided_one_at_a_time() -> None:
    session = Session(USER, 10)
    session.receive(frame("subscribe", POST))
    with pytest.raises(RuntimeError, match="post_p1"):
        session.receive(frame("ping"))
    with pytest.raises(RuntimeError, match="no join of post_p1"):
        session.joined("post_p1", True)  # before access was granted
    with pytest.raises(RuntimeError, match="no access check of creator_c1"):
        session.access_decided("creator_c1", True)  # another key
    session.access_decided("post_p1", True)
    with pytest.raises(RuntimeError, match="no access check of post_p1"):
        session.access_decided("post_p1", True)  # decided already


def test_the_keys_set_is_the_one_passed_in() -> None:
    keys: set[str] = set()
    session = Session(USER, 10, keys=keys)
    join(session, CREATOR, "creator_c1")
    assert keys == {"creator_c1"}
    session.receive(frame("unsubscribe", CREATOR))
    assert keys == set()


# -- typing (protocol §7.2) -------------------------------------------------------------------------------

OTHER = "u2"


def typing(conversation: Any, is_typing: Any = True) -> str:
    return orjson.dumps({"type": "typing", "conversationId": conversation, "isTyping": is_typing}).decode()


def denied(conversation: str) -> list[dict[str, Any]]:
    channel = {"type": "conversation", "id": conversation}
    return [{"type": "error", "data": {"message": frames.ACCESS_DENIED, "channel": channel}}]


@pytest.mark.parametrize(
    "data",
    [
        '{"type": "typing", "isTyping": true}',
        '{"type": "typing", "conversationId": "c1"}',
        '{"type": "typing", "conversationId": "c1", "isTyping": 1}',
        '{"type": "typing", "conversationId": "c1", "isTyping": "true"}',
        '{"type": "typing", "conversationId": true, "isTyping": true}',
        '{"type": "typing", "conversationId": "", "isTyping": true}',
        '{"type": "typing", "conversationId": {"id": "c1"}, "isTyping": true}',
        typing("c" * 201),
    ],
    ids=[
        "no id",
        "no isTyping",
        "isTyping 1",
        "isTyping a string",
        "id a bool",
        "id empty",
        "id an object",
        "id 201",
    ],
)
def test_malformed_typing_frame_is_an_invalid_format_error(data: str) -> None:
    session = Session(USER, 10)
    assert replies(session.receive(data)) == [{"type": "error", "data": {"message": frames.INVALID_FORMAT}}]
    assert session.pending is None and session.conversations is None


def test_first_typing_frame_looks_the_conversation_up_then_relays_to_the_other_participant() -> None:
    session = Session(USER, 10)
    assert session.receive(typing("c1")) == [CheckConversation("c1")]
    assert session.pending == PendingTyping("c1", True)
    assert session.conversation_found("c1", (OTHER, USER)) == [RelayTyping("c1", OTHER, True)]
    assert session.pending is None
    # Remembered for the connection's life: no second lookup, either way round.
    assert session.receive(typing("c1", False)) == [RelayTyping("c1", OTHER, False)]
    assert session.receive(typing("c1")) == [RelayTyping("c1", OTHER, True)]


def test_either_participant_may_type_and_integer_ids_become_strings() -> None:
    session = Session(USER, 10)
    assert session.receive(typing(42)) == [CheckConversation("42")]
    assert session.conversation_found("42", (USER, OTHER)) == [RelayTyping("42", OTHER, True)]
    assert session.receive(typing("42")) == [RelayTyping("42", OTHER, True)]  # the same conversation


@pytest.mark.parametrize("participants", [("u3", "u4"), None], ids=["another pair's", "no such conversation"])
def test_non_participant_is_denied_once_looked_up_and_nothing_is_relayed(participants: Any) -> None:
    session = Session(USER, 10)
    assert session.receive(typing("c1")) == [CheckConversation("c1")]
    assert replies(session.conversation_found("c1", participants)) == denied("c1")
    # The refusal is remembered too: told again without another lookup, and never a relay.
    assert replies(session.receive(typing("c1"))) == denied("c1")
    assert replies(session.receive(typing("c1", False))) == denied("c1")
    assert replies(session.receive(frame("ping"))) == [{"type": "pong"}]


def test_denial_of_an_integer_id_names_the_conversation_as_its_string() -> None:
    session = Session(USER, 10)
    session.receive(typing(7))
    assert replies(session.conversation_found("7", None)) == denied("7")


def test_failed_lookup_drops_the_frame_and_remembers_nothing() -> None:
    session = Session(USER, 10)
    session.receive(typing("c1"))
    assert session.conversation_failed("c1") == []
    assert session.pending is None
    assert session.receive(typing("c1")) == [CheckConversation("c1")]  # asked again
    assert session.conversation_found("c1", (USER, OTHER)) == [RelayTyping("c1", OTHER, True)]


def test_typing_in_a_conversation_with_oneself_relays_nothing() -> None:
    session = Session(USER, 10)
    session.receive(typing("self"))
    assert session.conversation_found("self", (USER, USER)) == []
    assert session.receive(typing("self")) == []


def test_typing_frames_are_decided_one_at_a_time_too() -> None:
    session = Session(USER, 10)
    session.receive(typing("c1"))
    with pytest.raises(RuntimeError, match="c1"):
        session.receive(frame("ping"))
    with pytest.raises(RuntimeError, match="no lookup of conversation c2"):
        session.conversation_found("c2", (USER, OTHER))
    with pytest.raises(RuntimeError, match="no access check of post_p1"):
        session.access_decided("post_p1", True)  # a typing lookup is no subscribe
    session.conversation_found("c1", (USER, OTHER))
    with pytest.raises(RuntimeError, match="no lookup of conversation c1"):
        session.conversation_failed("c1")  # decided already
    session.receive(frame("subscribe", POST))
    with pytest.raises(RuntimeError, match="no lookup of conversation c1"):
        session.conversation_found("c1", (USER, OTHER))  # a subscribe is no typing lookup


def test_a_socket_remembers_its_last_conversations_only() -> None:
    session = Session(USER, 10)
    for n in range(MAX_CONVERSATIONS + 1):
        assert session.receive(typing(f"c{n}")) == [CheckConversation(f"c{n}")]
        session.conversation_found(f"c{n}", (USER, OTHER))
    assert session.conversations is not None and len(session.conversations) == MAX_CONVERSATIONS
    assert session.receive(typing("c0")) == [CheckConversation("c0")]  # the oldest was forgotten
    session.conversation_found("c0", (USER, OTHER))
    assert session.receive(typing(f"c{MAX_CONVERSATIONS}")) == [
        RelayTyping(f"c{MAX_CONVERSATIONS}", OTHER, True)
    ]


def test_a_socket_that_never_types_holds_no_conversations() -> None:
    session = Session(USER, 10)
    join(session, POST, "post_p1")
    session.receive(frame("ping"))
    assert session.conversations is None


# -- channel presence (protocol §7.4) -------------------------------------------------------------------

CONVERSATION = {"type": "conversation", "id": "7"}
PRESENCE_CHANNELS = [(CREATOR, "creator_c1"), (POST, "post_p1"), (CONVERSATION, "conversation_7")]
OTHER_CHANNELS = [
    ({"type": "notifications", "userId": USER}, f"notifications_{USER}"),
    ({"type": "feed", "userId": USER}, f"feed_{USER}"),
    ({"type": "status", "userId": OTHER}, f"status_{OTHER}"),
]


def subscribe_frame(channel: Any, presence: Any) -> str:
    return orjson.dumps({"type": "subscribe", "channel": channel, "presence": presence}).decode()


def join_watching(session: Session, channel: dict[str, Any], key: str, presence: Any = True) -> list[Any]:
    """A subscribe with ``"presence"``, all the way through; the actions after the join."""
    assert session.receive(subscribe_frame(channel, presence)) == [CheckAccess(key)]
    watched = presence is True and key.split("_")[0] in ("creator", "post", "conversation")
    assert session.access_decided(key, True) == [Join(key, None, watched)]
    return session.joined(key, True)


@pytest.mark.parametrize(("channel", "key"), PRESENCE_CHANNELS, ids=["creator", "post", "conversation"])
def test_presence_query_of_a_joined_channel_is_answered(channel: dict[str, Any], key: str) -> None:
    session = Session(USER, 10)
    join(session, channel, key)
    assert session.receive(frame("presence", channel)) == [QueryPresence(key, channel)]
    assert session.pending is None, "a query waits for nothing of the session's"


@pytest.mark.parametrize(("channel", "key"), PRESENCE_CHANNELS, ids=["creator", "post", "conversation"])
def test_presence_query_of_a_channel_not_joined_is_access_denied(channel: dict[str, Any], key: str) -> None:
    session = Session(USER, 10)
    join(session, {"type": "creator", "id": "another"}, "creator_another")
    assert replies(session.receive(frame("presence", channel))) == [
        {"type": "error", "data": {"message": frames.ACCESS_DENIED, "channel": channel}}
    ]
    join(session, channel, key)
    session.receive(frame("unsubscribe", channel))
    assert replies(session.receive(frame("presence", channel))) == [
        {"type": "error", "data": {"message": frames.ACCESS_DENIED, "channel": channel}}
    ], "unsubscribed: no member any more"


@pytest.mark.parametrize(("channel", "key"), OTHER_CHANNELS, ids=["notifications", "feed", "status"])
def test_presence_query_of_another_channel_type_is_invalid_format(channel: dict[str, Any], key: str) -> None:
    session = Session(USER, 10)
    join(session, channel, key)  # joined, even: the type decides
    assert replies(session.receive(frame("presence", channel))) == [
        {"type": "error", "data": {"message": frames.INVALID_FORMAT, "channel": channel}}
    ]


@pytest.mark.parametrize(
    "channel",
    [{"type": "post"}, {"type": "creator", "id": ""}, {"type": "nope", "id": "1"}, "creator_c1", 7],
    ids=["no id", "empty id", "unknown type", "a key", "a number"],
)
def test_presence_query_of_a_malformed_channel_is_invalid_format(channel: Any) -> None:
    session = Session(USER, 10)
    join(session, CREATOR, "creator_c1")
    assert replies(session.receive(frame("presence", channel))) == [
        {"type": "error", "data": {"message": frames.INVALID_FORMAT, "channel": channel}}
    ]
    assert replies(session.receive('{"type": "presence"}')) == [
        {"type": "error", "data": {"message": frames.INVALID_FORMAT}}
    ], "no channel at all"


@pytest.mark.parametrize(("channel", "key"), PRESENCE_CHANNELS, ids=["creator", "post", "conversation"])
def test_subscribe_with_presence_watches_after_subscribed(channel: dict[str, Any], key: str) -> None:
    session = Session(USER, 10)
    actions = join_watching(session, channel, key)
    assert replies(actions[:1]) == [{"type": "subscribed", "data": {"channel": channel, "channelKey": key}}]
    assert actions[1:] == [WatchPresence(key, True)]
    assert session.watching == {key}


def test_subscribe_without_presence_watches_nothing() -> None:
    session = Session(USER, 10)
    assert all(isinstance(a, Reply) for a in join(session, CREATOR, "creator_c1"))
    assert session.watching is None, "a socket that never asks holds no set"
    assert all(isinstance(a, Reply) for a in join_watching(session, POST, "post_p1", presence=False))


@pytest.mark.parametrize(("channel", "key"), OTHER_CHANNELS, ids=["notifications", "feed", "status"])
def test_presence_on_a_channel_without_presence_is_no_watch(channel: dict[str, Any], key: str) -> None:
    session = Session(USER, 10)
    actions = join_watching(session, channel, key)
    assert not any(isinstance(a, WatchPresence) for a in actions), actions
    assert replies(actions[:1]) == [{"type": "subscribed", "data": {"channel": channel, "channelKey": key}}]
    assert not session.watching


def test_a_repeat_subscribe_without_presence_ends_the_watch() -> None:
    session = Session(USER, 10)
    join_watching(session, CREATOR, "creator_c1")
    join_watching(session, POST, "post_p1")
    again = join(session, CREATOR, "creator_c1")
    assert again[1:] == [WatchPresence("creator_c1", False)]
    assert session.watching == {"post_p1"} and session.keys == {"creator_c1", "post_p1"}
    assert join(session, CREATOR, "creator_c1")[1:] == [], "not watching: nothing to end"
    assert join_watching(session, CREATOR, "creator_c1")[1:] == [WatchPresence("creator_c1", True)]
    assert join_watching(session, CREATOR, "creator_c1")[1:] == [WatchPresence("creator_c1", True)], (
        "the latest subscribe decides, each time"
    )


def test_unsubscribe_ends_the_watch() -> None:
    session = Session(USER, 10)
    join_watching(session, CREATOR, "creator_c1")
    actions = session.receive(frame("unsubscribe", CREATOR))
    assert actions[0] == Leave("creator_c1") and len(actions) == 2, "the hub's leave ends the watch"
    assert session.watching == set()
    again = join(session, CREATOR, "creator_c1")
    assert not any(isinstance(a, WatchPresence) for a in again), "no watch left to end"


@pytest.mark.parametrize("presence", ["yes", 1, None, {"on": True}], ids=["text", "number", "null", "object"])
def test_presence_that_is_not_a_boolean_is_invalid_format(presence: Any) -> None:
    session = Session(USER, 10)
    assert replies(session.receive(subscribe_frame(CREATOR, presence))) == [
        {"type": "error", "data": {"message": frames.INVALID_FORMAT}}
    ]
    assert session.pending is None and not session.keys


def test_a_failed_join_with_presence_watches_nothing() -> None:
    session = Session(USER, 10)
    session.receive(subscribe_frame(CREATOR, True))
    session.access_decided("creator_c1", True)
    assert replies(session.joined("creator_c1", False))[0]["data"]["message"] == frames.SUBSCRIBE_FAILED
    assert not session.watching


# -- token refresh (§7.6) and recovery (§7.8) -----------------------------------------------------------


def test_a_refresh_frame_asks_for_its_token_to_be_checked() -> None:
    session = Session(USER, 10)
    assert session.receive(orjson.dumps({"type": "refresh", "token": "t.o.k"})) == [CheckToken("t.o.k")]


def test_a_good_refresh_answers_refreshed_and_moves_the_expiry() -> None:
    session = Session(USER, 10)
    actions = session.token_checked(USER, 1_800_000_000.5)
    assert actions == [Reply(frames.refreshed(1_800_000_000.5)), Expire(1_800_000_000.5)]
    assert orjson.loads(actions[0].text) == {
        "type": "refreshed",
        "data": {"expiresAt": "2027-01-15T08:00:00.500Z"},
    }


def test_a_bad_refresh_is_an_error_and_keeps_the_expiry() -> None:
    assert replies(Session(USER, 10).token_checked(None, None)) == [
        {"type": "error", "data": {"message": "Invalid token"}}
    ]


def test_another_user_s_token_closes_1008() -> None:
    assert Session(USER, 10).token_checked("u2", 1.0) == [Close(1008, "Unauthorized: token for another user")]


def test_since_goes_with_the_join_and_catch_up_follows_subscribed() -> None:
    session = Session(USER, 10)
    channel = {"type": "post", "postId": "p1"}
    session.receive(
        orjson.dumps({"type": "subscribe", "channel": channel, "since": {"offset": 7, "epoch": "e"}})
    )
    assert session.access_decided("post_p1", True) == [Join("post_p1", (7, "e"))]
    actions = session.joined("post_p1", True, ("e", 9), True, catch_up=True)
    assert actions[1] == CatchUp("post_p1")
    assert orjson.loads(actions[0].text)["data"] == {
        "channel": channel,
        "channelKey": "post_p1",
        "offset": 9,
        "epoch": "e",
        "recovered": True,
    }


@pytest.mark.parametrize(
    "since",
    [
        [],
        {"offset": -1, "epoch": "e"},
        {"epoch": "e"},
        {"offset": 1.5, "epoch": "e"},
        {"offset": 1, "epoch": ""},
    ],
)
def test_a_malformed_since_is_invalid_format(since: Any) -> None:
    channel = {"type": "post", "postId": "p1"}
    session = Session(USER, 10)
    answer = replies(session.receive(orjson.dumps({"type": "subscribe", "channel": channel, "since": since})))
    assert answer == [{"type": "error", "data": {"message": "Invalid message format"}}]
