"""Channel presence (protocol §7.4): one process's side of who is present where, and its frames.

The hub tells this module every join and leave of a connection (``Hub.on_member``); for creator, post
and conversation channels it keeps how many local connections of each user hold each key, and only a
user's first connection in and last one out become writes to the shared ``presence_store``. Writes are
batched: one writer task takes every (key, user) that changed since its last round and writes them in one
round trip, so 2,000 connections joining a channel within a moment cost a handful of round trips, not
2,000. The store answers who came in and who went; their frames go out through the broker on the key's
presence topic (hub key ``presence:K``), which only processes with a socket that asked for them
(``"presence": true``) listen to: a channel nobody watches costs no frame anywhere.

- A join is sent at once, unless the user left within the grace (a reload: nothing at all).
- A leave waits ``WS_OFFLINE_GRACE``, then goes out only if the user is still gone everywhere and did not
  leave again since (that later leave has its own wait). Users who hide their online status are counted
  but never named: no join, no leave, not in the list.
- Above ``WS_PRESENCE_LIST_LIMIT`` present users a channel sends ``presence_count`` instead, at most every
  ``WS_PRESENCE_COUNT_INTERVAL`` seconds across all processes (a claim in the store decides which process
  sends; one that lost the claim tries again an interval later, so the last change is always counted).

Timers do not grow with channels: the users waiting out the grace are one ``OrderedDict`` in deadline
order with one ``loop.call_at`` (as ``fonana.status``), and the keys owing a count one set with one timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

from fonana_ws.broker import Broker
from fonana_ws.broker.base import describe
from fonana_ws.db import Store
from fonana_ws.fonana.presence_store import Change, PresenceStore
from fonana_ws.fonana.status import Clock, Handle
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol.channels import has_presence
from fonana_ws.protocol.frames import presence, presence_count, presence_join, presence_leave, presence_user
from fonana_ws.stats import Stats

log = logging.getLogger("fonana_ws.presence")

#: The hub key (and broker topic) of channel K's presence frames is ``presence:K``.
TOPIC_PREFIX = "presence:"
#: Users one store call writes for one key; a join storm is split into calls of this size.
CHUNK = 500


def topic_key(key: str) -> str:
    return TOPIC_PREFIX + key


class ChannelPresence:
    """The process's refcount of (key, user), its writer and refresher, the grace timer, the counts."""

    def __init__(
        self,
        store: PresenceStore,
        broker: Broker,
        db: Store,
        stats: Stats,
        *,
        grace: float,
        ttl: float,
        list_limit: int = 100,
        count_interval: float = 10.0,
        op_timeout: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.broker = broker
        self.db = db
        self.stats = stats
        self.grace = grace
        self.ttl = ttl
        self.list_limit = list_limit
        self.count_interval = count_interval
        self.op_timeout = op_timeout
        self.clock: Clock = clock or asyncio.get_running_loop()
        #: key -> user -> local connections joined to it.
        self.local: dict[str, dict[str, int]] = {}
        #: What the store holds of this process's: key -> users (what the refresh keeps alive).
        self.written: dict[str, set[str]] = {}
        self._dirty: dict[tuple[str, str], None] = {}
        self._marked = 0  # changes marked so far; the writer has written all up to ``_written_upto``
        self._written_upto = 0
        self._wake = asyncio.Event()
        self._settled = asyncio.Condition()
        #: (key, user) -> when to look whether they are still gone, in deadline order.
        self.pending: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._timer: Handle | None = None
        #: Keys owing a presence_count; and keys last seen above the list limit (a count is owed when they
        #: drop back under it, so that clients do not keep a stale count).
        self.counts_due: set[str] = set()
        self._over: set[str] = set()
        self._count_timer: Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._down = False
        #: Set when the process begins to shut down: leaves from then on are left to ``stop``.
        self.closing = False

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loops.append(asyncio.get_running_loop().create_task(self._write_loop(), name="presence writer"))
        if self.store.backend_name != "memory":
            self._loops.append(asyncio.get_running_loop().create_task(self._refresh_loop(), name="presence"))

    async def stop(self) -> None:
        for handle in (self._timer, self._count_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._count_timer = None
        self.pending.clear()
        self.counts_due.clear()
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        for task in [*self._loops, *self._tasks]:
            with contextlib.suppress(BaseException):
                await task
        self._loops.clear()
        held = {key: sorted(users) for key, users in self.written.items()}
        self.written.clear()
        self.local.clear()
        # Made to expire after the grace rather than removed: a survivor's sweep then sends the leaves of
        # those who did not reconnect elsewhere (a rolling restart is no leave and no join).
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.op_timeout):
                await self.store.fade(held)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.op_timeout):
                await self.store.close()

    # -- what the hub tells -----------------------------------------------------------------------------

    def on_member(self, key: str, user_id: str, joined: bool) -> None:
        """A local connection of ``user_id`` joined or left ``key`` (``Hub.on_member``)."""
        if not has_presence(key) or self.closing:
            return
        users = self.local.get(key)
        if joined:
            if users is None:
                users = self.local[key] = {}
            held = users.get(user_id, 0)
            users[user_id] = held + 1
            if held:
                return
        else:
            held = users.get(user_id, 0) if users is not None else 0
            if held > 1:
                users[user_id] = held - 1  # type: ignore[index]
                return
            if not held:
                return
            del users[user_id]  # type: ignore[union-attr]
            if not users:
                del self.local[key]
        self._dirty[(key, user_id)] = None
        self._marked += 1
        self._wake.set()

    # -- the writer -------------------------------------------------------------------------------------

    async def settled(self) -> None:
        """Return once every change marked so far is written (or its write failed), or after op_timeout."""
        target = self._marked
        if self._written_upto >= target:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * self.op_timeout), self._settled:
                await self._settled.wait_for(lambda: self._written_upto >= target)

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            upto = self._marked
            try:
                await self._write_once()
            except Exception:  # the writer must outlive any one failure
                log.exception("presence write failed")
            self._written_upto = upto
            async with self._settled:
                self._settled.notify_all()

    async def _write_once(self) -> None:
        dirty, self._dirty = self._dirty, {}
        batch: dict[str, tuple[list[str], list[str]]] = {}
        for key, user in dirty:
            want = user in self.local.get(key, ())
            written = self.written.get(key)
            if want == (written is not None and user in written):
                continue  # in and out again since the last round: nothing to write
            enter, leave = batch.setdefault(key, ([], []))
            # Recorded before the write: after a failure the refresh writes back what is held, and an
            # entry whose removal failed expires after TTL, and the sweep reports it.
            if want:
                enter.append(user)
                self.written.setdefault(key, set()).add(user)
            else:
                leave.append(user)
                assert written is not None
                written.discard(user)
                if not written:
                    del self.written[key]
        items = [
            (key, enter[i : i + CHUNK], leave[i : i + CHUNK])
            for key, (enter, leave) in batch.items()
            for i in range(0, max(len(enter), len(leave)), CHUNK)
        ]
        if not items:
            return
        changes = await self._ask(self.store.change(items), "presence not written")
        if changes is not None:
            await self._changed(items, changes)

    async def _changed(self, items: list[tuple[str, list[str], list[str]]], changes: list[Change]) -> None:
        joins: list[tuple[str, str]] = []
        left: list[tuple[str, str]] = []
        for (key, _, _), change in zip(items, changes, strict=True):
            # A leave waits out the grace (its count too: a reload must not move the count either).
            left.extend((key, user) for user in change.left)
            if not change.joined:
                continue
            if change.count > self.list_limit:
                self._over.add(key)
                self._owe_count(key)
            else:
                if key in self._over:
                    self._over.discard(key)
                    self._owe_count(key)
                joins.extend((key, user) for user in change.joined)
        if left:
            self.went(left)
        if joins:
            await self._announce_joins(joins)

    # -- the refresh and the sweep ----------------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            held = {key: sorted(users) for key, users in self.written.items()}
            gone = await self._ask(self.store.refresh(held), "presence not refreshed", seconds=self.ttl / 3)
            if gone:
                self.went(gone)

    async def sweep(self) -> list[tuple[str, str]]:
        """Refresh and sweep now (tests and the bench); the pairs found gone get their leaves as usual."""
        held = {key: sorted(users) for key, users in self.written.items()}
        gone = await self.store.refresh(held)
        self.went(gone)
        return gone

    # -- leaves, after the grace ------------------------------------------------------------------------

    def went(self, pairs: list[tuple[str, str]]) -> None:
        """These users' last entries in these keys went: announce them gone after the grace."""
        due = self.clock.time() + self.grace
        for pair in pairs:
            self.pending.pop(pair, None)
            self.pending[pair] = due  # at the end: every deadline is now + grace, so the order holds
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and self.pending:
            self._timer = self.clock.call_at(next(iter(self.pending.values())), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.time()
        by_key: dict[str, list[str]] = {}
        while self.pending:
            (key, user), when = next(iter(self.pending.items()))
            if when > now:
                break
            del self.pending[(key, user)]
            by_key.setdefault(key, []).append(user)
        for key, users in by_key.items():
            self._spawn(self._announce_leaves(key, users))
        self._arm()

    async def _announce_leaves(self, key: str, users: list[str]) -> None:
        lookup = await self._ask(self.store.lookup(key, users), "presence leave not announced")
        if lookup is None:
            return
        now, count, found = lookup
        gone = []
        for user in users:
            present, left_at = found.get(user, (False, None))
            # Back, or left again since (that leave's own wait announces it).
            if present or (left_at is not None and now - left_at < self.grace - 0.001):
                continue
            gone.append(user)
        if not gone:
            return
        # Above the limit, or just back under it (here, or on another process: the count before these
        # leaves was above it), counts are owed rather than names.
        if count > self.list_limit or key in self._over or count + len(gone) > self.list_limit:
            if count > self.list_limit:
                self._over.add(key)
            else:
                self._over.discard(key)
            self._owe_count(key)
            return
        hidden = await self._ask(self.db.hidden_status(gone), "presence leave not announced")
        if hidden is None:
            return
        frames = [presence_leave(key, user) for user in gone if user not in hidden]
        await self._publish([(key, frame) for frame in frames])

    # -- joins --------------------------------------------------------------------------------------------

    async def _announce_joins(self, joins: list[tuple[str, str]]) -> None:
        users = list(dict.fromkeys(user for _, user in joins))
        hidden = await self._ask(self.db.hidden_status(users), "presence join not announced")
        if hidden is None:
            return
        shown = [u for u in users if u not in hidden]
        profiles = await self._ask(self.db.profiles(shown), "presence join not announced") if shown else {}
        if profiles is None:
            return
        frames = [
            (key, presence_join(key, presence_user(u, profiles.get(u))))
            for key, u in joins
            if u not in hidden
        ]
        await self._publish(frames)

    # -- counts -------------------------------------------------------------------------------------------

    def _owe_count(self, key: str) -> None:
        self.counts_due.add(key)
        if self._count_timer is None:
            self._count_timer = self.clock.call_at(self.clock.time(), self._count_tick)

    def _count_tick(self) -> None:
        keys, self.counts_due = self.counts_due, set()
        self._count_timer = None
        if keys:
            self._spawn(self._send_counts(keys))

    async def _send_counts(self, keys: set[str]) -> None:
        frames = []
        for key in sorted(keys):
            claimed = await self._ask(self.store.claim(key, self.count_interval), "presence count not sent")
            if not claimed:
                self.counts_due.add(key)  # another process counted within the interval: ours comes next
                continue
            found = await self._ask(self.store.members(key, 0), "presence count not sent")
            if found is not None:
                frames.append((key, presence_count(key, found[0])))
        await self._publish(frames)
        if self.counts_due and self._count_timer is None:
            self._count_timer = self.clock.call_at(self.clock.time() + self.count_interval, self._count_tick)

    # -- the query ----------------------------------------------------------------------------------------

    async def query(self, key: str, channel: Any) -> str:
        """The ``presence`` answer for ``key``; raises when the store or the database cannot answer."""
        await self.settled()  # this socket's own join, and any other of this process, is in
        async with asyncio.timeout(self.op_timeout):
            count, candidates = await self.store.members(key, 2 * self.list_limit)
        hidden = await self.db.hidden_status(candidates)
        shown = [u for u in candidates if u not in hidden]
        listed = shown[: self.list_limit]
        profiles = await self.db.profiles(listed)
        users = [presence_user(u, profiles.get(u)) for u in listed]
        truncated = len(shown) > self.list_limit or count > len(candidates)
        return presence(channel, key, count, users, truncated)

    # -- plumbing -----------------------------------------------------------------------------------------

    async def _publish(self, frames: list[tuple[str, dict[str, Any]]]) -> None:
        if not frames:
            return
        out = [
            (env.key_channel(topic_key(key)), env.encode(frame, env.new_event_id())) for key, frame in frames
        ]
        try:
            await self.broker.publish_many(out)
        except Exception as exc:
            self.stats.presence_failures += 1
            log.warning("%d presence frames not published: %s", len(out), describe(exc))
            return
        self.stats.presence_published += len(out)

    async def _ask(self, work: Coroutine[Any, Any, Any], what: str, seconds: float | None = None) -> Any:
        """``work`` within op_timeout; None (logged once per outage, counted always) when it fails."""
        try:
            async with asyncio.timeout(seconds or self.op_timeout):
                result = await work
        except Exception as exc:
            self.stats.presence_failures += 1
            self.store.lost()
            if not self._down:
                self._down = True
                log.warning("%s: %s unreachable (%s)", what, self.store.backend_name, describe(exc))
            return None
        if self._down:
            self._down = False
            log.info("channel presence: %s answers again", self.store.backend_name)
        return result

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drained(self) -> None:
        """Return once every write and announcement started so far is done (tests)."""
        await self.settled()
        while self._tasks:
            await asyncio.wait(list(self._tasks))
