"""Online status (protocol §7.3): who is online, the offline grace, and the change frames.

Online is "holds an authenticated connection on some process", which ``user_connections`` already
counts across processes: this module keeps no registry of its own, and a connection nobody watches costs
nothing here. It acts on three signals of that count: a user came online (0 -> 1 anywhere, and not
within the grace of their last close), their last connection here closed, or this process's sweep found
that their last entries were a dead process's. The last two wait ``grace`` seconds, then the user is
announced offline only if they are still offline everywhere and nobody closed a connection of theirs
since (that later close has its own wait, on its own process): a reload within the grace sends nothing,
and each going offline is announced once across all processes.

Change frames go out on the broker channel of ``status_U``, which only processes where someone watches U
listen to: a user nobody watches costs one publish per change, received nowhere. A user whose
``user_settings.showOnlineStatus`` is false causes no frames and always looks offline, lastSeen null.

Timers do not grow with connections: one ``OrderedDict`` of users waiting out the grace, in deadline order
(every deadline is "now + grace"), and one ``loop.call_at`` for the first, as ``fonana.typing`` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from fonana_ws.broker import Broker
from fonana_ws.db import Store
from fonana_ws.fonana.user_connections import Lookup
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol.frames import user_status
from fonana_ws.stats import Stats

log = logging.getLogger("fonana_ws.status")

STATUS_PREFIX = "status_"


class Handle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What ``OnlineStatus`` needs of the event loop (``asyncio.AbstractEventLoop`` is one; tests fake it)."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Handle: ...


class Counts(Protocol):
    """What ``OnlineStatus`` needs of ``user_connections.UserConnections``."""

    async def lookup(self, user_ids: list[str]) -> Lookup: ...


def status_of(user_id: str, lookup: Lookup, hidden: set[str], grace: float) -> tuple[bool, float | None]:
    """(online, lastSeen) as watchers see it: online until the grace after the last close has passed."""
    if user_id in hidden:
        return False, None
    now, found = lookup
    count, seen = found.get(user_id, (0, None))
    if count > 0 or (seen is not None and now - seen < grace):
        return True, None
    return False, seen


class OnlineStatus:
    """One process's side of online status: the users waiting out the grace, its one timer, the frames."""

    def __init__(
        self,
        counts: Counts,
        broker: Broker,
        store: Store,
        stats: Stats,
        *,
        grace: float,
        clock: Clock | None = None,
    ) -> None:
        self.counts = counts
        self.broker = broker
        self.store = store
        self.stats = stats
        self.grace = grace
        self.clock: Clock = clock or asyncio.get_running_loop()
        #: user -> when to look whether they are still offline, in deadline order.
        self.pending: OrderedDict[str, float] = OrderedDict()
        self._timer: Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the signals ----------------------------------------------------------------------------------

    def came_online(self, user_id: str) -> None:
        """``user_connections.admit`` said the user came online."""
        self._spawn(self._announce([user_id], online=True))

    def went_offline(self, user_ids: list[str]) -> None:
        """The users' last connections went (closed here, or swept): announce offline after the grace."""
        due = self.clock.time() + self.grace
        for user in user_ids:
            self.pending.pop(user, None)
            self.pending[user] = due  # at the end: every deadline is now + grace, so the order holds
        self._arm()

    async def snapshot(self, user_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each user's ``user_status`` frame now; raises when the backend or the database cannot answer."""
        lookup = await self.counts.lookup(user_ids)
        hidden = await self.store.hidden_status(user_ids)
        return {u: user_status(u, *status_of(u, lookup, hidden, self.grace)) for u in user_ids}

    # -- the one timer --------------------------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is None and self.pending:
            self._timer = self.clock.call_at(next(iter(self.pending.values())), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.time()
        due: list[str] = []
        while self.pending:
            user, when = next(iter(self.pending.items()))
            if when > now:
                break
            del self.pending[user]
            due.append(user)
        if due:
            self._spawn(self._announce(due, online=False))
        self._arm()

    # -- out through the broker -----------------------------------------------------------------------

    async def _announce(self, user_ids: list[str], *, online: bool) -> None:
        try:
            lookup = await self.counts.lookup(user_ids) if not online else None
            hidden = await self.store.hidden_status(user_ids)
        except Exception as exc:  # a status frame is not worth a retry: the next change is one
            log.warning("status of %d users not announced: %s", len(user_ids), exc)
            return
        out: list[tuple[str, str]] = []
        for user in user_ids:
            if user in hidden:
                continue
            seen: float | None = None
            if lookup is not None:
                now, found = lookup
                count, seen = found.get(user, (0, None))
                # Back online, or closed again since (that close's own wait announces it).
                if count > 0 or (seen is not None and now - seen < self.grace - 0.001):
                    continue
            event = user_status(user, online, seen)
            out.append((env.key_channel(STATUS_PREFIX + user), env.encode(event, env.new_event_id())))
        if not out:
            return
        # Straight to the broker, as typing does: these are the server's own frames, not events the web
        # app published (``fonana_ws_events_published_total``); users due together go in one round trip.
        try:
            await self.broker.publish_many(out)
        except Exception as exc:
            log.warning("status of %d users not announced: %s", len(out), exc)
            return
        self.stats.status_published += len(out)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drained(self) -> None:
        """Return once every announcement started so far is done (tests)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pending.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
