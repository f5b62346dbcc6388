"""Live revocation (protocol §7.7): access is checked again when the truth changes, not only at subscribe.

The web app calls ``POST /api/access/revoke`` when a subscription ends or is refunded (``{userId,
creatorId}``), a post is locked, re-tiered or deleted (``{postId}``), or a purchase is refunded
(``{userId, postId}``). The call becomes one control message on the broker topic that reaches exactly
the processes concerned: the post channel's (every process with a subscriber of it) or the user's own
(every process with a connection of that user). Each of them checks the §2 rule again for its own
affected subscribers, one database round per affected post channel however many connections hold it
(``Store.post_access``), and each subscriber no longer allowed leaves the channel and is told so with
``unsubscribed`` and ``"reason": "access revoked"``.

Without any call, a subscriber who sees a locked post through a subscription loses it the same way when
that subscription's ``validUntil`` passes: the subscribe left a deadline (one heap and one timer for all,
``fanout.deadlines``), and at it the rule is checked again (a renewed subscription just moves it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from fonana_ws.broker import Broker
from fonana_ws.db import Store
from fonana_ws.fanout.connection import Connection
from fonana_ws.fanout.deadlines import Clock, Deadlines
from fonana_ws.fanout.hub import Hub
from fonana_ws.logs import lifecycle
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol.channels import parse_key
from fonana_ws.protocol.frames import dumps
from fonana_ws.stats import Stats

log = logging.getLogger("fonana_ws.revocation")

KIND = "revoke"
REASON = "access revoked"
POST_PREFIX = "post_"


def unsubscribed_revoked(key: str) -> str:
    """What a subscriber who lost access receives (the CHANNEL rebuilt from the key)."""
    post_id = key[len(POST_PREFIX) :]
    channel = {"type": "post", "postId": post_id}
    return dumps({"type": "unsubscribed", "data": {"channel": channel, "channelKey": key, "reason": REASON}})


def message(user_id: str | None, creator_id: str | None, post_id: str | None) -> tuple[str, str]:
    """The ``(broker topic, control envelope)`` of one revoke call (its form checked by the caller)."""
    event: dict[str, Any] = {"type": KIND}
    if user_id is not None:
        event["userId"] = user_id
    if creator_id is not None:
        event["creatorId"] = creator_id
    if post_id is not None:
        event["postId"] = post_id
    topic = env.user_channel(user_id) if user_id is not None else env.key_channel(POST_PREFIX + str(post_id))
    return topic, env.encode(event, env.new_event_id(), control=KIND)


class Revocation:
    """One process's side: the control handler, the re-checks, and the subscriptions' deadlines."""

    def __init__(self, hub: Hub, store: Store, stats: Stats, clock: Clock | None = None) -> None:
        self.hub = hub
        self.store = store
        self.stats = stats
        self.clock: Clock = clock or asyncio.get_running_loop()
        #: (connection, post key) -> the loop time its subscription ends, for the subscribers whose access
        #: rests on one. Forgotten at disconnect (``forget``); a key left meanwhile is skipped when due.
        self.deadlines: Deadlines[tuple[Connection, str]] = Deadlines(self.clock, self._due)
        self._by_conn: dict[Connection, set[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        hub.controls[KIND] = self.on_control

    # -- the deadlines of subscriptions -------------------------------------------------------------------

    def allowed_until(self, conn: Connection, key: str, until: float) -> None:
        """``conn`` joined ``key`` on a subscription that ends at ``until`` (epoch seconds)."""
        self.deadlines.set((conn, key), self.clock.time() + until - time.time())
        self._by_conn.setdefault(conn, set()).add(key)

    def forget(self, conn: Connection) -> None:
        """The connection closed: its deadlines go with it."""
        for key in self._by_conn.pop(conn, ()):
            self.deadlines.discard((conn, key))

    def _due(self, items: list[tuple[Connection, str]]) -> None:
        by_key: dict[str, list[Connection]] = {}
        for conn, key in items:
            keys = self._by_conn.get(conn)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_conn[conn]
            if key in conn.keys:
                by_key.setdefault(key, []).append(conn)
        for key, conns in by_key.items():
            self.store.access.forget(key=key)
            self._spawn(self.recheck(key, conns, "subscription ended"))

    # -- revoke calls ---------------------------------------------------------------------------------

    def on_control(self, event: dict[str, Any]) -> None:
        """A revoke message (``Hub.controls``): find the local subscribers it concerns, check them again."""
        user_id, creator_id, post_id = event.get("userId"), event.get("creatorId"), event.get("postId")
        if user_id is not None and not isinstance(user_id, str):
            return
        if isinstance(post_id, str):
            key = POST_PREFIX + post_id
            if user_id is None:
                conns = list(self.hub.by_key.get(key, ()))
            else:
                conns = [c for c in self.hub.by_user.get(user_id, ()) if key in c.keys]
            self.store.access.forget(user_id, key)
            if conns:
                self._spawn(self.recheck(key, conns, "revoke"))
            return
        if isinstance(user_id, str) and isinstance(creator_id, str):
            self.store.access.forget(user_id)
            by_key: dict[str, list[Connection]] = {}
            for conn in self.hub.by_user.get(user_id, ()):
                for key in conn.keys:
                    if key.startswith(POST_PREFIX):
                        by_key.setdefault(key, []).append(conn)
            # Every post key of the user's: which are the creator's is the post row's to say, read in
            # the same round as the rule.
            for key, conns in by_key.items():
                self._spawn(self.recheck(key, conns, "revoke", creator_id=creator_id))

    async def recheck(
        self, key: str, conns: list[Connection], why: str, *, creator_id: str | None = None
    ) -> int:
        """Check ``key``'s rule for ``conns`` again (one round for all); those refused leave; how many."""
        _, post_id = parse_key(key)
        started = time.monotonic()
        try:
            if creator_id is not None:
                post = await self.store.get_post(post_id)
                if post is not None and str(post["creatorId"]) != creator_id:
                    return 0
            access = await self.store.post_access(post_id, [c.user_id for c in conns])
        except Exception as exc:  # the caller may call again; the subscribers keep their channel
            self.stats.revoke_failures += 1
            log.error("access re-check of %s failed (%d connections): %s", key, len(conns), exc)
            return 0
        lost = 0
        for conn in conns:
            allowed = access.get(conn.user_id, False)
            if key not in conn.keys or conn.closed:
                continue
            if allowed is False:
                self.hub.leave(conn, key)
                conn.send_text(unsubscribed_revoked(key))
                lost += 1
                lifecycle(logging.INFO, "access revoked", conn=conn.id, user=conn.user_id, key=key, cause=why)
            elif allowed is not True:
                self.allowed_until(conn, key, float(allowed))  # renewed, or still running: its new end
        self.stats.access_revoked += lost
        self.stats.access_rechecks += 1
        self.stats.recheck_seconds += time.monotonic() - started
        return lost

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drained(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def stop(self) -> None:
        self.deadlines.clear()
        self._by_conn.clear()
        for task in list(self._tasks):
            task.cancel()


async def revoke(broker: Broker, user_id: str | None, creator_id: str | None, post_id: str | None) -> None:
    """Ask every process concerned to check again; raises ``BrokerUnavailable`` when none could be."""
    await broker.publish_many([message(user_id, creator_id, post_id)])
