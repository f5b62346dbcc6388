"""Publishing an event: validate, wrap it in the broker envelope, publish to all targets at once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fonana_ws.broker import Broker, PayloadTooLarge
from fonana_ws.broker.history import HistoryLimits, Target, has_history
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol.channels import ChannelError, parse_key
from fonana_ws.protocol.frames import MAX_EVENT_DEPTH, nested_deeper_than
from fonana_ws.stats import Stats, timed_publish

MAX_USER_ID = 200
MAX_EVENT_ID = 100


class PublishError(ValueError):
    """The event or its targets are not acceptable; the message says which field."""


def validate_event(event: Any) -> dict[str, Any]:
    if not isinstance(event, dict):
        raise PublishError("event must be a JSON object")
    if not isinstance(event.get("type"), str) or not event["type"]:
        raise PublishError("event.type must be a non-empty string")
    # Every path in (HTTP, Python, CLI) ends here: an event orjson could not encode never reaches it.
    if nested_deeper_than(event, MAX_EVENT_DEPTH):
        raise PublishError(f"event is nested deeper than {MAX_EVENT_DEPTH} levels")
    return event


class Publisher:
    """The one way events enter the broker from this process (HTTP API, Python API, CLI)."""

    def __init__(
        self,
        broker: Broker,
        stats: Stats | None = None,
        *,
        max_event_size: int = 1 << 20,
        history: HistoryLimits | None = None,
    ) -> None:
        self.broker = broker
        self.stats = stats or Stats()
        #: The largest encoded envelope, in bytes (``WS_MAX_EVENT_SIZE``); larger raises PayloadTooLarge.
        self.max_event_size = max_event_size
        #: ``WS_HISTORY_SIZE`` / ``WS_HISTORY_TTL`` (protocol §7.8): channel events get offsets and are kept.
        self.history = history or HistoryLimits(0, 0)

    @timed_publish
    async def publish(
        self,
        event: dict[str, Any],
        *,
        channels: Iterable[str] = (),
        users: Iterable[str] = (),
        event_id: str | None = None,
    ) -> str:
        """Publish ``event`` to channel keys and users; each connection receives it at most once.

        An ``event_id`` given by the caller makes a retry safe: a connection that already received the
        event under that id (among its last 32 such) does not receive it again.
        All targets are published in one broker round trip, all or none: on ``BrokerUnavailable`` no
        target received the event, and a retry (with the same ``event_id``) is safe.
        Raises ``PublishError`` for bad input, ``PayloadTooLarge`` for an encoded event over
        ``max_event_size`` bytes and ``BrokerUnavailable`` when the broker is down.
        """
        validate_event(event)
        event = paid_message_concealed(event)
        if event_id is not None and (not isinstance(event_id, str) or not 1 <= len(event_id) <= MAX_EVENT_ID):
            raise PublishError(f"id must be a string of 1 to {MAX_EVENT_ID} characters")
        targets: list[tuple[str, dict[str, str]]] = []
        for key in dict.fromkeys(channels):
            try:
                parse_key(key)
            except ChannelError as exc:
                raise PublishError(f"channel: {exc}") from None
            targets.append((env.key_channel(key), {"channel": key}))
        for user in dict.fromkeys(users):
            if not isinstance(user, str) or not user or len(user) > MAX_USER_ID:
                raise PublishError(f"user must be a user id of 1 to {MAX_USER_ID} characters")
            targets.append((env.user_channel(user), {"user": user}))
        if not targets:
            raise PublishError("a channel or a user is required")
        multi = len(targets) > 1 or event_id is not None
        event_id = event_id or env.new_event_id()
        kept = self.history.enabled
        items: list[Target] = []
        for broker_channel, where in targets:
            key = where.get("channel")
            if kept and key is not None and has_history(key):
                envelope, text = env.encode_with_history(event, event_id, key, multi=multi, **where)
                items.append(Target(broker_channel, envelope, key, text))
            else:
                items.append(Target(broker_channel, env.encode(event, event_id, multi=multi, **where)))
        try:
            for item in items:
                message = item.envelope
                # A character is at most 4 bytes in UTF-8: most envelopes need no encoding to be measured.
                if (
                    len(message) * 4 > self.max_event_size
                    and (size := len(message.encode())) > self.max_event_size
                ):
                    raise PayloadTooLarge(
                        f"the event is {size} bytes encoded, over the {self.max_event_size} byte limit"
                    )
            # One round trip and one transaction for all targets (post_created fans out to every paying
            # subscriber's feed): never a pool connection per target, never a partial delivery. Each
            # connection still gets the event once (shared id, "multi").
            if kept and any(item.key is not None for item in items):
                # Offsets, storage and publish in one atomic step per target, all targets in one round.
                await self.broker.publish_targets(items, self.history)
                self.stats.history_appends += sum(item.key is not None for item in items)
            else:
                await self.broker.publish_many([(item.channel, item.envelope) for item in items])
        except Exception:  # counted as failures: broker down, too large (as the metric says)
            self.stats.publish_failures += 1
            raise
        self.stats.events_published += 1
        return event_id


def paid_message_concealed(event: dict[str, Any]) -> dict[str, Any]:
    """A paid ``new_message`` without its ``content`` and ``mediaUrl`` (protocol §7.1), whichever route
    published it (typed route, ``/api/publish``, Python, CLI): it is unlocked through the web app, never
    the socket. Every other event is returned as it is, for the price of one dict lookup."""
    if event.get("type") != "new_message":
        return event
    message = event.get("message")
    if not isinstance(message, dict) or message.get("isPaid") is not True:
        return event
    if message.get("content") is None and message.get("mediaUrl") is None:
        return event
    return {**event, "message": {**message, "content": None, "mediaUrl": None}}
