"""The batch's checks (``web.batch_api.batch_items``) held to ``/api/publish``'s: every item the publisher
refuses, the batch refuses with the same words behind ``items[i]: ``, and nothing it accepts is refused."""

from __future__ import annotations

from typing import Any

import pytest

from fonana_ws.broker import Broker, PayloadTooLarge
from fonana_ws.fonana.publisher import Publisher, PublishError
from fonana_ws.web.api import publish_body
from fonana_ws.web.batch_api import MAX_ITEMS, Item, batch_items

pytestmark = pytest.mark.unit

LIMIT = 4096


def deep(levels: int) -> Any:
    """A value nested ``levels`` lists deep."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


GOOD = {"channel": "post_p1", "event": {"type": "post_liked", "postId": "p1"}}

BAD: list[Any] = [
    "text",
    [GOOD],
    {"channel": "post_p1"},
    {"event": {"type": "x"}},
    {"channel": None, "event": {"type": "x"}},
    {"channel": 5, "event": {"type": "x"}},
    {"channel": "bogus", "event": {"type": "x"}},
    {"channel": "post_", "event": {"type": "x"}},
    {"channel": "post_" + "p" * 300, "event": {"type": "x"}},
    {"user": ["u"], "event": {"type": "x"}},
    {"user": "", "event": {"type": "x"}},
    {"user": "u" * 201, "event": {"type": "x"}},
    {"user": "u", "event": "text"},
    {"user": "u", "event": {"no": "type"}},
    {"user": "u", "event": {"type": ""}},
    {"user": "u", "event": {"type": "x", "deep": deep(70)}},
    {"user": "u", "event": {"type": "x"}, "id": 5},
    {"user": "u", "event": {"type": "x"}, "id": ""},
    {"user": "u", "event": {"type": "x"}, "id": "i" * 101},
]

TOO_LARGE = [
    {"user": "u", "event": {"type": "x", "pad": "p" * LIMIT}},
    {"channel": "post_p1", "user": "u", "id": "e1", "event": {"type": "x", "pad": "p" * (LIMIT - 60)}},
]


async def refusal_of_publish(body: Any) -> BaseException | None:
    """What ``/api/publish`` does with ``body``: its body rule, then the publisher (memory broker)."""
    broker = Broker("memory://")
    await broker.connect()
    try:
        event, channels, users, event_id = publish_body(body)
        await Publisher(broker, max_event_size=LIMIT).publish(
            event, channels=channels, users=users, event_id=event_id
        )
    except (PublishError, PayloadTooLarge) as exc:
        return exc
    finally:
        await broker.disconnect()
    return None


@pytest.mark.parametrize("item", BAD + TOO_LARGE)
async def test_an_item_is_refused_with_the_words_of_publish(item: Any) -> None:
    published = await refusal_of_publish(item)
    assert published is not None, item
    with pytest.raises(type(published)) as batch:
        batch_items({"items": [GOOD, GOOD, item, GOOD]}, LIMIT)
    assert str(batch.value) == f"items[2]: {published}"


@pytest.mark.parametrize(
    "item",
    [
        GOOD,
        {"user": "u", "event": {"type": "x"}, "id": "e1"},
        {"channel": "feed_u", "user": "u", "event": {"type": "x", "n": [1, {"a": None}]}},
        {"user": "u", "event": {"type": "x", "pad": "p" * (LIMIT - 100)}},
        {"user": "u", "event": {"type": "x", "deep": deep(60)}},
        {"user": "u", "event": {"type": "x"}, "extra": "ignored, as /api/publish does"},
    ],
)
async def test_what_publish_accepts_the_batch_accepts(item: dict[str, Any]) -> None:
    assert await refusal_of_publish(item) is None
    (checked,) = batch_items({"items": [item]}, LIMIT)
    assert checked == Item(
        item["event"],
        [item["channel"]] if "channel" in item else [],
        [item["user"]] if "user" in item else [],
        item.get("id"),
    )


def test_the_batch_holds_1_to_100_items_in_a_list() -> None:
    assert len(batch_items({"items": [GOOD] * MAX_ITEMS}, LIMIT)) == MAX_ITEMS
    for body, words in [
        ({"items": [GOOD] * (MAX_ITEMS + 1)}, "items must hold 1 to 100 bodies (it holds 101)"),
        ({"items": []}, "items must hold 1 to 100 bodies (it holds 0)"),
        ({"items": None}, "items must be a list of publish bodies"),
        ({"items": {"0": GOOD}}, "items must be a list of publish bodies"),
        ({}, "items is required"),
        ([GOOD], "body must be a JSON object"),
    ]:
        with pytest.raises(PublishError) as refused:
            batch_items(body, LIMIT)
        assert str(refused.value) == words


def test_the_first_bad_item_is_named() -> None:
    items = [GOOD] * 100
    items[57] = {"user": "u", "event": {}}
    items[80] = "text"
    with pytest.raises(PublishError, match=r"^items\[57\]: event.type must be a non-empty string$"):
        batch_items({"items": items}, LIMIT)
