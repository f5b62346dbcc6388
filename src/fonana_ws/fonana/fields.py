"""The fields of an event body and the kinds of value they take: one check per kind for HTTP, Python
and the CLI alike, and the JSON Schema the OpenAPI document shows for it.

A check takes the field's JSON name (``comment.userId`` for a member) and the value, and returns the
value as the event carries it or raises ``PublishError`` naming the field. Python callers may spell a
JSON value the Python way (a tuple for a list, any ``Mapping`` for an object, a ``datetime`` for a
timestamp); the rule is the same. ``None`` is an absent field, except where a kind takes null.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from fonana_ws.db.schema import NOTIFICATION_TYPES
from fonana_ws.db.store import iso
from fonana_ws.fonana.publisher import PublishError
from fonana_ws.protocol.channels import MAX_ID_LENGTH
from fonana_ws.protocol.frames import MAX_EVENT_DEPTH, nested_deeper_than

__all__ = [
    "AMOUNT",
    "BOOLEAN",
    "CHANGES",
    "ID",
    "IDS",
    "JSON",
    "KINDS",
    "LIST",
    "NOTIFICATION_TYPE",
    "PRICE",
    "STRING",
    "STRING_OR_NULL",
    "TIMESTAMP",
    "Field",
    "Kind",
    "check_body",
    "members_of",
    "record",
]

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Kind:
    """What a field's value must be."""

    name: str
    #: The JSON Schema of a value (OpenAPI 3.1); the CLI reads its ``type`` to choose the option's form.
    schema: Mapping[str, Any]
    check: Check
    #: What the Python façade's signatures show.
    annotation: Any = Any
    #: A member given as null is null, not absent (``post.thumbnail``).
    nullable: bool = False
    #: The members of an object kind (``comment``: id, userId, ...); the CLI offers each as an option.
    members: tuple[Field, ...] = ()


@dataclass(frozen=True)
class Field:
    """One field of an event body (or a member of an object field)."""

    name: str  # the JSON name, also what every error message names
    kind: Kind
    doc: str
    required: bool = True
    #: The Python keyword of the façade method and the delivery rule; default: ``name`` in snake_case.
    keyword: str = ""
    #: Keyword-only in the façade's signature (ids that are easy to swap positionally).
    keyword_only: bool = False
    #: What the delivery rule gets when the field is absent (also the façade's default, and the schema's).
    default: Any = None
    #: What ``fonana-ws send`` sends when its option is not given (a convenience of the command line).
    cli_default: Any = None

    def __post_init__(self) -> None:
        if not self.keyword:
            object.__setattr__(self, "keyword", re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower())

    def schema(self) -> dict[str, Any]:
        out = {**self.kind.schema, "description": self.doc}
        if self.default is not None:
            out["default"] = self.default
        return out


def members_of(prefix: str, members: tuple[Field, ...], given: Mapping[str, Any]) -> dict[str, Any]:
    """The checked members of ``given`` by JSON name (absent optional ones left out); others ignored."""
    out: dict[str, Any] = {}
    for m in members:
        name = f"{prefix}{m.name}"
        value = given.get(m.name)
        if m.name not in given or (value is None and not m.kind.nullable):
            if m.required:
                raise PublishError(f"{name} is required")
            continue
        out[m.name] = m.kind.check(name, value)
    return out


def check_body(fields: tuple[Field, ...], body: Any) -> dict[str, Any]:
    """An event body -> the delivery rule's keyword arguments (defaults filled in).

    Unknown fields are refused, so that a typo never passes silently.
    """
    if not isinstance(body, Mapping):
        raise PublishError("body must be a JSON object")
    known = [f.name for f in fields]  # in table order: the message lists them so
    for name in body:
        if name not in known:
            raise PublishError(f"{name}: unknown field (expected {', '.join(known)})")
    given = members_of("", fields, body)
    return {f.keyword: given.get(f.name, f.default) for f in fields}


# -- the kinds ---------------------------------------------------------------------------------------------


def _id(name: str, value: Any) -> str:
    # Strings only: Prisma ids are strings (cuid), and a large JSON number loses digits in JavaScript.
    if not isinstance(value, str):
        raise PublishError(f"{name} must be an id string")
    if not value:
        raise PublishError(f"{name} must be an id string, not empty")
    if len(value) > MAX_ID_LENGTH:
        raise PublishError(f"{name} must be an id of 1 to {MAX_ID_LENGTH} characters")
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise PublishError(f"{name} must be a string")
    return value


def _string_or_null(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise PublishError(f"{name} must be a string or null")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PublishError(f"{name} must be true or false")
    return value


def _is_number(value: Any) -> bool:
    # bool is an int in Python, never a number in JSON; NaN and infinities are not JSON at all.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _amount(name: str, value: Any) -> int | float:
    if not _is_number(value) or value <= 0:
        raise PublishError(f"{name} must be a number above 0")
    return value


def _price(name: str, value: Any) -> int | float | None:
    if value is not None and (not _is_number(value) or value < 0):
        raise PublishError(f"{name} must be a number of 0 or more, or null")
    return value


#: RFC 3339, what the OpenAPI ``date-time`` format means and ``Date.toISOString()`` prints.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def _timestamp(name: str, value: Any) -> str:
    """In the protocol's form, e.g. 2024-01-02T03:04:05.678Z, whatever offset it was given in."""
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339.fullmatch(value)):
        try:
            return iso(value.upper() if isinstance(value, str) else value) or ""
        except ValueError:  # a well-formed day or second that does not exist: 02-30, 23:59:60
            pass
    raise PublishError(
        f"{name} must be an ISO 8601 timestamp with its offset, such as 2024-01-02T03:04:05.000Z"
    )


def _notification_type(name: str, value: Any) -> str:
    if value not in NOTIFICATION_TYPES:
        raise PublishError(f"{name} must be one of {', '.join(NOTIFICATION_TYPES)}")
    return value


def _json(name: str, value: Any) -> Any:
    # Checked here, not at publish: the event nests the field a level or two down, and the 400 should
    # name the field. 64 levels is the event's limit (protocol.frames.MAX_EVENT_DEPTH).
    if nested_deeper_than(value, MAX_EVENT_DEPTH):
        raise PublishError(f"{name} is nested deeper than {MAX_EVENT_DEPTH} levels")
    try:
        orjson.dumps(value)
    except TypeError:
        raise PublishError(
            f"{name} must be JSON (objects, lists, strings, numbers, booleans, null)"
        ) from None
    return value


def _list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise PublishError(f"{name} must be a list")
    return _json(name, list(value))


def _ids(name: str, value: Any) -> list[str]:
    if not isinstance(value, list | tuple):
        raise PublishError(f"{name} must be a list of id strings")
    try:
        return [_id(f"{name}[{i}]", item) for i, item in enumerate(value)]
    except PublishError as exc:
        raise PublishError(f"{name} must be a list of id strings: {exc}") from None


def _changes(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not value:
        raise PublishError(f"{name} must be an object with at least one changed field")
    return _json(name, dict(value))


_TIMESTAMP_SCHEMA = {"type": "string", "format": "date-time", "example": "2024-01-02T03:04:05.678Z"}

ID = Kind("id", {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}, _id, str)
STRING = Kind("string", {"type": "string"}, _string, str)
STRING_OR_NULL = Kind(
    "string_or_null", {"type": ["string", "null"]}, _string_or_null, str | None, nullable=True
)
BOOLEAN = Kind("boolean", {"type": "boolean"}, _boolean, bool)
TIMESTAMP = Kind("timestamp", _TIMESTAMP_SCHEMA, _timestamp, str | datetime)
AMOUNT = Kind("amount", {"type": "number", "exclusiveMinimum": 0}, _amount, float)
PRICE = Kind("price", {"type": ["number", "null"], "minimum": 0}, _price, float | None, nullable=True)
NOTIFICATION_TYPE = Kind(
    "notification_type", {"type": "string", "enum": list(NOTIFICATION_TYPES)}, _notification_type, str
)
JSON = Kind("json", {"description": "any JSON value"}, _json)
LIST = Kind("list", {"type": "array", "items": {}}, _list, list[Any])
IDS = Kind("ids", {"type": "array", "items": ID.schema}, _ids, list[str])
CHANGES = Kind(
    "changes",
    {"type": "object", "minProperties": 1, "additionalProperties": True},
    _changes,
    Mapping[str, Any],
)


def record(name: str, doc: str, members: tuple[Field, ...], *, or_id: bool = False) -> Kind:
    """An object kind with known members (others are ignored, so a whole row is fine); ``or_id``: its id
    string alone stands for ``{"id": ...}``."""
    required = [m.name for m in members if m.required]
    listed = f"{', '.join(required[:-1])} and {required[-1]}" if len(required) > 1 else "".join(required)
    must = f"a {name} id or a {name} object with id" if or_id else f"an object with {listed}"

    def check(field_name: str, value: Any) -> dict[str, Any]:
        if or_id and isinstance(value, str):
            return {"id": _id(field_name, value)}
        if not isinstance(value, Mapping):
            raise PublishError(f"{field_name} must be {must}")
        return members_of(f"{field_name}.", members, value)

    schema: dict[str, Any] = {
        "type": "object",
        "description": doc,
        "required": required,
        "properties": {m.name: m.schema() for m in members},
        "additionalProperties": True,
    }
    if or_id:
        schema = {"oneOf": [{**ID.schema, "description": f"the {name} id"}, schema]}
    annotation = str | Mapping[str, Any] if or_id else Mapping[str, Any]
    return Kind(name, schema, check, annotation, members=members)


#: The scalar and list kinds; object kinds are made with :func:`record` where an event needs one.
KINDS = (
    ID,
    STRING,
    STRING_OR_NULL,
    BOOLEAN,
    AMOUNT,
    PRICE,
    TIMESTAMP,
    NOTIFICATION_TYPE,
    JSON,
    LIST,
    IDS,
    CHANGES,
)
