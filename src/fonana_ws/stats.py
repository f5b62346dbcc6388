"""Plain counters the hot path can bump for the price of an attribute add; metrics read them."""

from __future__ import annotations

import functools
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

#: Publish latency buckets, in seconds: a local memory publish takes microseconds, a Redis one about
#: a millisecond, a PostgreSQL NOTIFY a few; the broker's own timeout is 2 s.
PUBLISH_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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
    #: Typing events relayed to the other participant (protocol §7.2), by reason: ``frame`` (a client's,
    #: past the throttle), ``expired``, ``disconnect``, ``new_message`` (the server's own false).
    typing_relayed: Counter[str] = field(default_factory=Counter)
    #: Client typing frames not relayed: repeats within 2 s, and falses with no true shown.
    typing_swallowed: int = 0
    #: Typing events lost because the broker refused them (typing is not retried).
    typing_relay_failures: int = 0
    #: Shown typing given up because another process relayed a later ``true`` (it owes the ``false``).
    typing_handed_over: int = 0
    #: (user, conversation) typing states this process holds; each ends at most 6 s after its last frame.
    typing_active: int = 0
    #: ``new_message`` events this process published (protocol §7.1), by any route.
    messages_relayed: int = 0
    #: ``user_status`` change frames this process published (protocol §7.3), online and offline.
    status_published: int = 0
    #: presence_join, presence_leave and presence_count frames this process published (protocol §7.4).
    presence_published: int = 0
    #: Writes or reads of the shared presence state that failed (backend unreachable).
    presence_failures: int = 0
    #: Connections closed with 4001 because their token's ``exp`` (plus the leeway) passed.
    tokens_expired: int = 0
    #: Refresh frames whose token was accepted (protocol §7.6).
    tokens_refreshed: int = 0
    #: Refresh frames whose token did not verify (answered ``Invalid token``; the old expiry stands).
    tokens_refused: int = 0
    #: Subscribers who lost a post channel to a revoke call or an ended subscription (protocol §7.7).
    access_revoked: int = 0
    #: Access re-checks made (one per affected post channel), and the seconds they took in all.
    access_rechecks: int = 0
    recheck_seconds: float = 0.0
    #: Re-checks that could not be made (database down): those subscribers kept their channel.
    revoke_failures: int = 0
    #: Channel events given an offset and kept for recovery (protocol §7.8).
    history_appends: int = 0
    #: Subscribes with ``since`` that got their missed events, and those told ``recovered: false``.
    recoveries: int = 0
    recoveries_refused: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class LatencyHistogram:
    """A histogram as plain ints: ``observe`` is a bisect and three adds, no lock, no prometheus object."""

    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self, bounds: tuple[float, ...] = PUBLISH_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count of observations <= le), ..., ("+Inf", count)]`` as Prometheus wants them."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


def publish_latency(stats: Stats) -> LatencyHistogram:
    """The publish latency histogram that belongs with ``stats`` (one per app, like ``Stats``)."""
    hist = stats.__dict__.get("publish_latency")
    if hist is None:
        hist = stats.__dict__["publish_latency"] = LatencyHistogram()
    return hist


F = TypeVar("F", bound=Callable[..., Awaitable[str]])


def timed_publish(func: F) -> F:
    """Decorator for ``Publisher.publish``: observe how long each successful publish took, and count the
    direct messages among them (``messages_relayed``).

    The publisher keeps its ``Stats`` in ``self.stats``; the time lands in that app's histogram. Every
    route's publish (typed endpoint, ``/api/publish``, Python, CLI) passes here, so no message escapes
    the count; the check is one dict lookup per publish.
    """

    @functools.wraps(func)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> str:
        started = time.perf_counter()
        result = await func(self, *args, **kwargs)
        publish_latency(self.stats).observe(time.perf_counter() - started)
        event = args[0] if args else kwargs.get("event")
        if event.get("type") == "new_message":  # a dict: publish validated it
            self.stats.messages_relayed += 1
        return result

    return wrapper  # type: ignore[return-value]
