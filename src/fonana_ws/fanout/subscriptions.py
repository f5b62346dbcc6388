"""Broker topic -> local subscribers: one broker subscription per topic per process, changed in order.

The hub acquires a topic for every (connection, channel key) it joins and for every connection of a user
(the user's direct topic), and releases it on leave or disconnect. Only the first acquire subscribes the
broker and only the last release unsubscribes it, however many local subscribers come and go: 30 tabs on
one creator cost the broker one SUBSCRIBE. The subscribes and unsubscribes of one topic reach the broker
one after another, in the order they were decided, so a leave-and-rejoin never ends unsubscribed. This is
the process's one count; a backend's own count (the Redis and PostgreSQL backends keep one for their
direct callers) then only ever sees 0 or 1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

from fonana_ws.stats import Stats

log = logging.getLogger("fonana_ws.hub")
#: How long shutdown waits for the broker's unsubscribes: the backends' own operation timeout is 2 s.
CLOSE_WAIT = 2.0


class Subscribable(Protocol):
    """What the registry needs of the broker (``fonana_ws.broker.Broker`` is one)."""

    async def subscribe(self, topic: str) -> None: ...

    async def unsubscribe(self, topic: str) -> None: ...


class Subscriptions:
    """The local subscribers of each broker topic, and the process's broker subscription of it."""

    def __init__(self, broker: Subscribable, stats: Stats) -> None:
        self._broker = broker
        self._stats = stats
        #: Topic -> acquires not yet released.
        self._count: dict[str, int] = {}
        #: Topic -> the subscribe of its current broker subscription (done once the broker delivers it);
        #: once it succeeded, one shared done future for all topics (a finished Task is ~500 bytes per topic,
        #: and a user topic is one per connected user).
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._ready: asyncio.Future[None] | None = None
        #: Topic -> its last (un)subscribe not finished yet: the next one starts after it.
        self._ops: dict[str, asyncio.Task[None]] = {}

    def count(self, topic: str) -> int:
        """Local subscribers of ``topic`` (acquires not yet released)."""
        return self._count.get(topic, 0)

    def __contains__(self, topic: object) -> bool:
        """The process holds, or is taking, a broker subscription of ``topic``."""
        return topic in self._subscribed

    def __len__(self) -> int:
        return len(self._subscribed)

    def acquire(self, topic: str) -> asyncio.Future[None]:
        """One more local subscriber of ``topic``; await the result to know the process receives its messages.

        The count is taken at the call, so that whatever comes after is decided in order. Pair every acquire
        with one ``release``, also when awaiting it raised (the broker failed, or the caller was cancelled).
        """
        self._count[topic] = self._count.get(topic, 0) + 1
        ready = self._subscribed.get(topic)
        if ready is None:
            ready = self._subscribed[topic] = self._in_order(topic, self._broker.subscribe)
            ready.add_done_callback(partial(self._subscribe_done, topic))
            self._stats.broker_subscriptions += 1
        # Shielded: one waiter cancelled (its socket went away) must not cancel the others' subscribe.
        return asyncio.shield(ready)

    def release(self, topic: str) -> None:
        """One local subscriber less; the last one unsubscribes (after any subscribe still pending)."""
        count = self._count.get(topic, 0)
        if count == 0:
            raise ValueError(f"release of broker topic {topic!r} without an acquire")
        if count > 1:
            self._count[topic] = count - 1
            return
        del self._count[topic]
        self._unsubscribe(topic)

    async def close(self) -> None:
        """Unsubscribe every topic; wait up to ``CLOSE_WAIT`` seconds for the broker to confirm.

        The counts stay: connections removed afterwards release as usual, and nothing more is sent then.
        """
        for topic in list(self._subscribed):
            self._unsubscribe(topic)
        if self._ops:
            await asyncio.wait(list(self._ops.values()), timeout=CLOSE_WAIT)

    def _unsubscribe(self, topic: str) -> None:
        if self._subscribed.pop(topic, None) is not None:
            self._stats.broker_subscriptions -= 1
            self._in_order(topic, self._broker.unsubscribe)

    def _subscribe_done(self, topic: str, task: asyncio.Task[None]) -> None:
        if self._subscribed.get(topic) is not task or task.cancelled():
            return
        if task.exception() is not None:
            # Forgotten at once, so that the next acquire tries again; its waiters raise, then release.
            del self._subscribed[topic]
            self._stats.broker_subscriptions -= 1
            return
        if self._ready is None:
            self._ready = task.get_loop().create_future()
            self._ready.set_result(None)
        self._subscribed[topic] = self._ready

    def _in_order(self, topic: str, op: Callable[[str], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``op`` after the previous (un)subscribe of ``topic``: the broker sees them in order."""
        before = self._ops.get(topic)

        async def run() -> None:
            if before is not None:
                await asyncio.wait([before])
            await op(topic)

        task = asyncio.get_running_loop().create_task(run())
        self._ops[topic] = task
        task.add_done_callback(partial(self._op_done, topic))
        return task

    def _op_done(self, topic: str, task: asyncio.Task[None]) -> None:
        if self._ops.get(topic) is task:
            del self._ops[topic]
        # A failed subscribe somebody still waits for is theirs to report; anything else is logged here.
        if not task.cancelled() and task.exception() is not None and topic not in self._subscribed:
            log.warning("broker (un)subscribe of %s failed: %s", topic, task.exception())
