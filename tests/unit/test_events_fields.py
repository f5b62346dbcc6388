"""Each field kind's one rule (HTTP, Python and the CLI check bodies with it): what it takes, what it
refuses and in which words, and that its JSON Schema in the OpenAPI document says the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import jsonschema_rs
import pytest

from fonana_ws.db.schema import NOTIFICATION_TYPES
from fonana_ws.fonana import fields as k
from fonana_ws.fonana.events import COMMENT, POST
from fonana_ws.fonana.fields import Field, check_body
from fonana_ws.fonana.publisher import PublishError

pytestmark = pytest.mark.unit


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


#: kind -> (values it takes, as the event then carries them), (values it refuses, words of the refusal)
CASES: dict[str, tuple[list[tuple[Any, Any]], list[tuple[Any, str]]]] = {
    "id": (
        [("u1", "u1"), ("x" * 200, "x" * 200), ("ä 🙂\n", "ä 🙂\n")],
        [
            (7, "f must be an id string"),  # numbers too: Prisma ids are strings (the Python API took 7)
            (True, "f must be an id string"),
            (None, "f must be an id string"),
            ("", "f must be an id string, not empty"),
            ("x" * 201, "f must be an id of 1 to 200 characters"),
        ],
    ),
    "string": ([("", ""), ("t", "t")], [(5, "f must be a string"), ([], "f must be a string")]),
    "string_or_null": ([("t", "t"), (None, None)], [(5, "f must be a string or null")]),
    "boolean": ([(True, True), (False, False)], [("yes", "f must be true or false"), (1, "f must be true")]),
    "amount": (
        [(5, 5), (0.01, 0.01), (1e9, 1e9)],
        [
            (0, "f must be a number above 0"),
            (-1, "f must be a number above 0"),
            ("5", "f must be a number above 0"),
            (True, "f must be a number above 0"),  # a bool is an int in Python, never in JSON
            (None, "f must be a number above 0"),
        ],
    ),
    "price": (
        [(0, 0), (2.5, 2.5), (None, None)],
        [
            (-0.5, "f must be a number of 0 or more, or null"),
            ("2.5", "f must be a number"),
            (False, "f must be"),
        ],
    ),
    "timestamp": (
        [
            ("2024-01-02T03:04:05.678Z", "2024-01-02T03:04:05.678Z"),
            ("2024-05-06T09:08:09+02:00", "2024-05-06T07:08:09.000Z"),
            ("2024-01-02t03:04:05.1234567z", "2024-01-02T03:04:05.123Z"),
            (datetime(2024, 1, 2, 3, 4, 5, 678000), "2024-01-02T03:04:05.678Z"),
            (datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-1))), "2024-01-02T04:04:05.000Z"),
        ],
        [
            ("soon", "f must be an ISO 8601 timestamp"),
            ("2024-01-02", "f must be an ISO 8601 timestamp"),  # a day is not a time
            ("2024-01-02T03:04:05", "f must be an ISO 8601 timestamp"),  # nor a time without its offset
            ("2024-02-30T03:04:05Z", "f must be an ISO 8601 timestamp"),
            (1704164645, "f must be an ISO 8601 timestamp"),
        ],
    ),
    "notification_type": (
        [(t, t) for t in NOTIFICATION_TYPES],
        [
            ("LIKE", "f must be one of LIKE_POST, "),
            ("like_post", "f must be one of"),
            (None, "f must be one of"),
        ],
    ),
    "json": (
        [(None, None), ({"a": [1, "x", None]}, {"a": [1, "x", None]}), (nested(64), nested(64))],
        [
            (nested(65), "f is nested deeper than 64 levels"),
            ({"when": datetime.now}, "f must be JSON"),
        ],
    ),
    "list": (
        [([], []), ([{"id": "p"}], [{"id": "p"}]), (({"id": "p"},), [{"id": "p"}])],
        [({"id": "p"}, "f must be a list"), ("p", "f must be a list"), ([nested(64)], "f is nested deeper")],
    ),
    "ids": (
        [([], []), (["a", "b"], ["a", "b"]), (("a",), ["a"])],
        [
            ("a", "f must be a list of id strings"),
            (["a", 3], "f must be a list of id strings: f[1] must be an id string"),
            (["a", ""], "f must be a list of id strings: f[1] must be an id string, not empty"),
        ],
    ),
    "changes": (
        [({"nickname": "n"}, {"nickname": "n"})],
        [
            ({}, "f must be an object with at least one changed field"),
            ([("a", 1)], "f must be an object with at least one changed field"),
            ({"bio": nested(64)}, "f is nested deeper than 64 levels"),
        ],
    ),
}


def test_every_kind_has_cases() -> None:
    assert set(CASES) == {kind.name for kind in k.KINDS}


@pytest.mark.parametrize("kind", k.KINDS, ids=lambda kind: kind.name)
def test_each_kind_takes_and_refuses_by_one_rule(kind: k.Kind) -> None:
    takes, refuses = CASES[kind.name]
    for value, carried in takes:
        assert kind.check("f", value) == carried, value
    for value, words in refuses:
        with pytest.raises(PublishError) as info:
            kind.check("f", value)
        assert str(info.value).startswith(words), (value, str(info.value))


@pytest.mark.parametrize("kind", k.KINDS, ids=lambda kind: kind.name)
def test_the_documented_schema_agrees_with_the_check(kind: k.Kind) -> None:
    """What the OpenAPI document allows (formats checked) is what the check takes, for every JSON value
    of the cases (Python-only spellings, a tuple or a datetime, are not JSON and left out)."""
    validator = jsonschema_rs.Draft202012Validator(dict(kind.schema), validate_formats=True)
    takes, refuses = CASES[kind.name]
    for value, _carried in takes:
        if isinstance(value, tuple | datetime):
            continue
        assert validator.is_valid(value), value
    for value, _words in refuses:
        if kind.name in ("json", "list", "changes") and "nested" in _words:
            continue  # depth is the server's own limit (64), not a JSON Schema keyword
        if callable(value) or (isinstance(value, dict) and any(callable(v) for v in value.values())):
            continue  # not JSON at all
        assert not validator.is_valid(value), value


def test_a_record_checks_its_members_by_their_json_names_and_ignores_others() -> None:
    comment = {"id": "k", "userId": "u", "content": "", "x": 1, "createdAt": None}
    assert COMMENT.check("comment", comment) == {"id": "k", "userId": "u", "content": ""}
    with pytest.raises(PublishError, match=r"^comment\.content is required$"):
        COMMENT.check("comment", {"id": "k", "userId": "u"})
    with pytest.raises(PublishError, match=r"^comment\.userId must be an id string$"):
        COMMENT.check("comment", {"id": "k", "userId": 5, "content": "x"})
    with pytest.raises(PublishError, match=r"^comment must be an object with id, userId and content$"):
        COMMENT.check("comment", "nice")
    with pytest.raises(PublishError, match=r"^comment\.createdAt must be an ISO 8601"):
        COMMENT.check("comment", {"id": "k", "userId": "u", "content": "x", "createdAt": "soon"})


def test_a_post_is_its_id_or_an_object_and_null_is_kept_where_the_kind_takes_it() -> None:
    assert POST.check("post", "p1") == {"id": "p1"}
    whole = {
        "id": "p1",
        "thumbnail": None,
        "title": None,
        "isLocked": True,
        "createdAt": "2024-01-02T03:04:05Z",
    }
    # thumbnail null clears the row's thumbnail; title null is a title not given
    assert POST.check("post", whole) == {
        "id": "p1",
        "thumbnail": None,
        "createdAt": "2024-01-02T03:04:05.000Z",
    }
    for bad, words in [
        ([], "post must be a post id or a post object with id"),
        ("", "post must be an id string, not empty"),
        ({"title": "no id"}, "post.id is required"),
        ({"id": "p", "creatorId": 3}, "post.creatorId must be an id string"),
        ({"id": "p", "thumbnail": 3}, "post.thumbnail must be a string or null"),
    ]:
        with pytest.raises(PublishError) as info:
            POST.check("post", bad)
        assert str(info.value) == words


FIELDS = (
    Field("userId", k.ID, "u"),
    Field("persist", k.BOOLEAN, "p", required=False, default=False),
    Field("createdAt", k.TIMESTAMP, "c", required=False),
)


def test_a_body_becomes_the_rules_keywords_with_defaults() -> None:
    assert check_body(FIELDS, {"userId": "u"}) == {"user_id": "u", "persist": False, "created_at": None}
    # null is a field not given
    assert check_body(FIELDS, {"userId": "u", "persist": None}) == {
        "user_id": "u",
        "persist": False,
        "created_at": None,
    }
    body = {"userId": "u", "persist": True, "createdAt": "2024-01-02T03:04:05Z"}
    assert check_body(FIELDS, body)["created_at"] == "2024-01-02T03:04:05.000Z"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ([1], "body must be a JSON object"),
        ({}, "userId is required"),
        ({"userId": None}, "userId is required"),
        ({"userId": "u", "userid": "u"}, "userid: unknown field (expected userId, persist, createdAt)"),
        ({"userId": 7}, "userId must be an id string"),
        ({"userId": "u", "persist": "yes"}, "persist must be true or false"),
    ],
)
def test_a_bad_body_is_refused_naming_the_field(body: Any, words: str) -> None:
    with pytest.raises(PublishError) as info:
        check_body(FIELDS, body)
    assert str(info.value) == words


def test_keywords_default_to_snake_case() -> None:
    assert [f.keyword for f in FIELDS] == ["user_id", "persist", "created_at"]
    assert Field("subscriberIds", k.IDS, "s").keyword == "subscriber_ids"
    assert Field("id", k.ID, "n", keyword="notification_id").keyword == "notification_id"


def test_amounts_are_finite_numbers() -> None:
    """NaN and the infinities are no JSON numbers (orjson writes null): refused, not passed on."""
    for value in (float("nan"), float("inf")):
        with pytest.raises(PublishError, match="^f must be a number above 0$"):
            k.AMOUNT.check("f", value)
        with pytest.raises(PublishError, match="^f must be a number of 0 or more, or null$"):
            k.PRICE.check("f", value)


def test_a_timestamp_keeps_its_instant() -> None:
    aware = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert k.TIMESTAMP.check("f", aware) == k.TIMESTAMP.check(
        "f", aware.astimezone(timezone(timedelta(hours=5)))
    )
