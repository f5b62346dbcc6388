"""The broker envelope: how an event travels between processes (and from other languages).

On the broker channel ``fonana-ws:<channel key>`` (for example ``fonana-ws:post_p1``) or
``fonana-ws:user:<user id>``, publish the JSON text::

    {"id": "<event id>", "event": {"type": "post_liked", ...}}

``event`` is sent to clients as it is. ``id`` is optional (one is made up when missing). When one event is
published to several targets (``post_created`` to ``creator_C`` and each subscriber's ``feed_S``), every
copy carries the same ``id`` and ``"multi": true``, and each connection receives it once.
``channel`` / ``user`` fields may be present for readability; the broker channel decides the target.

A ``"control": "<kind>"`` envelope is between servers only (the typing throttle's claims, protocol
§7.2): the hub hands it to its control handler and delivers it to no socket.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

PREFIX = "fonana-ws:"
USER_PREFIX = PREFIX + "user:"


class EnvelopeError(ValueError):
    """A broker message that is not an envelope."""


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    event: dict[str, Any]
    multi: bool = False
    #: Set for a message between servers (``"typing"``): never delivered to a socket.
    control: str | None = None


def key_channel(key: str) -> str:
    """The broker channel of a channel key."""
    return PREFIX + key


def user_channel(user_id: str) -> str:
    """The broker channel of a user's direct events."""
    return USER_PREFIX + user_id


def new_event_id() -> str:
    return uuid.uuid4().hex


def encode(
    event: dict[str, Any], event_id: str, *, multi: bool = False, control: str | None = None, **where: str
) -> str:
    body: dict[str, Any] = {"id": event_id, **where, "event": event}
    if multi:
        body["multi"] = True
    if control is not None:
        body["control"] = control
    return orjson.dumps(body).decode()


def encode_with_history(
    event: dict[str, Any], event_id: str, key: str, *, multi: bool = False, **where: str
) -> tuple[str, str]:
    """(envelope, event text) of an event for channel ``key`` with history (protocol §7.8), both still
    without the offset the backend gives it: the event carries ``"channelKey"`` and ends with ``}``, the
    envelope has ``"event"`` last and so ends with ``}}`` (``broker.history.with_offset``)."""
    if "offset" in event:  # the backend's, not the caller's
        event = {k: v for k, v in event.items() if k != "offset"}
    event = {**event, "channelKey": key}
    body: dict[str, Any] = {"id": event_id, **where}
    if multi:
        body["multi"] = True
    body["event"] = event
    return orjson.dumps(body).decode(), orjson.dumps(event).decode()


def decode(message: str | bytes) -> Envelope:
    try:
        body = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise EnvelopeError("not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("event"), dict):
        raise EnvelopeError("no event object")
    if not isinstance(body["event"].get("type"), str):
        raise EnvelopeError("event has no type")
    event_id = body.get("id")
    control = body.get("control")
    return Envelope(
        id=str(event_id) if event_id else new_event_id(),
        event=body["event"],
        multi=bool(body.get("multi")),
        control=control if isinstance(control, str) else None,
    )
