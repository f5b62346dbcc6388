"""The broker envelope (protocol §5): what other processes and other languages publish and we read."""

from __future__ import annotations

import orjson
import pytest

from fonana_ws.protocol import envelope as env

pytestmark = pytest.mark.unit


def test_topics_are_prefixed_by_target_kind() -> None:
    assert env.key_channel("post_p1") == "fonana-ws:post_p1"
    assert env.user_channel("u1") == "fonana-ws:user:u1"


def test_encode_then_decode_is_the_same_event() -> None:
    event = {"type": "post_liked", "postId": "p1", "likesCount": 3, "nested": {"a": [1, 2]}}
    text = env.encode(event, "id-1", channel="post_p1")
    assert orjson.loads(text) == {"id": "id-1", "channel": "post_p1", "event": event}
    assert env.decode(text) == env.Envelope("id-1", event, multi=False)
    assert env.decode(text.encode()) == env.Envelope("id-1", event, multi=False)


def test_a_multi_target_copy_says_so() -> None:
    text = env.encode({"type": "post_created"}, "id-2", multi=True, user="u1")
    assert orjson.loads(text)["multi"] is True
    assert env.decode(text).multi is True
    assert "multi" not in orjson.loads(env.encode({"type": "x"}, "id-3"))


def test_a_missing_id_gets_a_fresh_one_and_a_number_id_becomes_text() -> None:
    first = env.decode('{"event": {"type": "x"}}')
    second = env.decode('{"event": {"type": "x"}}')
    assert first.id and second.id and first.id != second.id
    assert env.decode('{"id": 42, "event": {"type": "x"}}').id == "42"


@pytest.mark.parametrize(
    ("message", "why"),
    [
        ("not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("[1, 2]", "no event object"),
        ('{"id": "x"}', "no event object"),
        ('{"event": "post_liked"}', "no event object"),
        ('{"event": {"postId": "p1"}}', "event has no type"),
        ('{"event": {"type": 7}}', "event has no type"),
    ],
)
def test_what_is_not_an_envelope_is_refused_with_the_reason(message: str | bytes, why: str) -> None:
    with pytest.raises(env.EnvelopeError, match=why):
        env.decode(message)
