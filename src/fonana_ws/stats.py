"""Plain counters the hot path can bump for the price of an attribute add; metrics read them."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    connections_opened: int = 0
    events_received: int = 0
    deliveries: int = 0
    bad_envelopes: int = 0
    slow_consumer_disconnects: int = 0
    broker_subscriptions: int = 0
    events_published: int = 0
    publish_failures: int = 0
    auth_failures: Counter[str] = field(default_factory=Counter)
    subscriptions: Counter[str] = field(default_factory=Counter)
    #: Refusals by the limits of protocol §7.5 and the edge (cause -> count).
    limit_refusals: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
