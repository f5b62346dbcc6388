"""Per-channel history (protocol §7.8): what a publish with history looks like to every backend.

A channel key with history (``post_``, ``creator_``, ``feed_``, ``conversation_``, ``notifications_``)
keeps its last ``size`` events for ``ttl`` seconds in the broker's backend. Each of its events gets the
next offset of the key (1, 2, 3, ...) in the same atomic step that stores it and publishes it, so that two
processes publishing to one key never reuse or skip an offset, and subscribers see offsets in order. The
epoch names one unbroken history of a key: it is made anew whenever the backend has lost the key's
history (Redis restarted empty, the memory process restarted, the key idle past ``ttl``), never otherwise.

The event a client receives carries ``"channelKey": K`` and ``"offset": N``. The publisher encodes each
target once without the offset; the backend appends it as text (``with_offset``), so no backend parses
or re-encodes JSON, and the bytes stored are the bytes sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

#: The channel types whose events are kept (protocol §7.8).
HISTORY_PREFIXES = ("post_", "creator_", "feed_", "conversation_", "notifications_")


def has_history(key: str) -> bool:
    return key.startswith(HISTORY_PREFIXES)


@dataclass(frozen=True, slots=True)
class Target:
    """One broker message of a publish.

    ``envelope`` is the full envelope text. For a target with history (``key`` set), ``envelope`` ends
    with the event's closing ``}}`` (event object, then envelope object) and ``event`` is the event's own
    text ending with ``}``, both already carrying ``"channelKey"``: the backend inserts the offset with
    ``with_offset`` into both, stores the event text and publishes the envelope text.
    """

    channel: str
    envelope: str
    key: str | None = None
    event: str = ""


class Position(NamedTuple):
    """Where a key's history stands: its epoch and its last offset (0 when it has none yet)."""

    epoch: str
    offset: int


class Replay(NamedTuple):
    """What ``since`` found: the key's position now, and the events after the asked offset in order
    (event texts as published, with their offsets), or None when they cannot all be given (the epoch
    changed, or some of them are no longer kept)."""

    epoch: str
    offset: int
    events: list[str] | None


def with_offset(text: str, offset: int, closing: str) -> str:
    """``text`` (ending with ``closing``: ``}`` for an event, ``}}`` for an envelope) with
    ``,"offset":N`` inserted before the closing braces."""
    return f'{text[: -len(closing)]},"offset":{offset}{closing}'


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """``WS_HISTORY_SIZE`` events kept per key, for ``WS_HISTORY_TTL`` seconds (0: no history at all)."""

    size: int = 100
    ttl: float = 300.0

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.ttl > 0
