"""The text surgery every history backend relies on: with_offset, has_history, encode_with_history."""

from __future__ import annotations

import orjson
import pytest

from fonana_ws.broker.history import HistoryLimits, has_history, with_offset
from fonana_ws.protocol import envelope as env

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("prefix", ["post_", "creator_", "feed_", "conversation_", "notifications_"])
def test_the_channel_types_with_history(prefix: str) -> None:
    assert has_history(prefix + "abc")


@pytest.mark.parametrize("key", ["user_abc", "online", "typing_x", "xpost_1", "Post_1", ""])
def test_other_channels_have_none(key: str) -> None:
    assert not has_history(key)


def test_with_offset_inserts_before_the_closing_braces() -> None:
    assert with_offset('{"a":1}', 7, "}") == '{"a":1,"offset":7}'
    assert with_offset('{"e":{"a":1}}', 12, "}}") == '{"e":{"a":1,"offset":12}}'


def test_encode_with_history_gives_texts_that_take_an_offset() -> None:
    event = {"type": "post_liked", "postId": "p1", "likes": 3}
    envelope, text = env.encode_with_history(event, "ev-1", "post_p1", multi=True, userId="u1")
    assert envelope.endswith(text + "}")
    stored = with_offset(text, 5, "}")
    assert orjson.loads(stored) == {**event, "channelKey": "post_p1", "offset": 5}
    decoded = env.decode(with_offset(envelope, 5, "}}"))
    assert decoded.id == "ev-1" and decoded.multi
    assert decoded.event == orjson.loads(stored)
    assert orjson.loads(envelope)["userId"] == "u1"


def test_a_callers_offset_is_dropped_for_the_backends() -> None:
    envelope, text = env.encode_with_history({"type": "x", "offset": 99}, "ev", "feed_1")
    assert "offset" not in orjson.loads(text)
    assert env.decode(with_offset(envelope, 1, "}}")).event["offset"] == 1


def test_history_is_off_when_size_or_ttl_is_zero() -> None:
    assert HistoryLimits().enabled
    assert not HistoryLimits(size=0).enabled
    assert not HistoryLimits(ttl=0).enabled
