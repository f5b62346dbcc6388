"""Key -> local connections, user -> local connections, and the fan-out.

The hub holds one broker subscription per broker channel (a channel key, or a user's direct channel)
however many local connections want it, decodes each broker message once, builds the outgoing frame
once, and hands the same bytes to every local recipient. Nothing here awaits per recipient.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import orjson

from .broker import Broker
from .broker import envelope as env
from .connection import Connection, Outbox
from .stats import Stats
from .wire import text_frame

log = logging.getLogger("fonana_ws.hub")

#: How many multi-target event ids each node remembers to deliver such an event once per connection.
RECENT_MULTI = 4096


@dataclass
class _Pump:
    """The one subscription of this process to one broker channel."""

    channel: str
    ready: asyncio.Future[None]
    task: asyncio.Task[None] | None = None
    users: int = field(default=0)


class Hub:
    def __init__(self, broker: Broker, stats: Stats | None = None) -> None:
        self.broker = broker
        self.stats = stats or Stats()
        self.outbox = Outbox()
        self.by_key: dict[str, set[Connection]] = {}
        self.by_user: dict[str, set[Connection]] = {}
        self.connections: set[Connection] = set()
        self._pumps: dict[str, _Pump] = {}
        self._recent: OrderedDict[str, set[int]] = OrderedDict()

    # -- membership -------------------------------------------------------------------------------

    async def add_connection(self, conn: Connection) -> None:
        """Register an authenticated connection for its user's direct events."""
        self.connections.add(conn)
        self.by_user.setdefault(conn.user_id, set()).add(conn)
        self.stats.connections_opened += 1
        await self._want(env.user_channel(conn.user_id))

    async def remove_connection(self, conn: Connection) -> None:
        """Forget a connection: leave every key, release subscriptions nobody else here needs."""
        conn.detach()
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        for key in list(conn.keys):
            self._drop(conn, key)
        users = self.by_user.get(conn.user_id)
        if users is not None:
            users.discard(conn)
            if not users:
                del self.by_user[conn.user_id]
                self._release(env.user_channel(conn.user_id))

    async def join(self, conn: Connection, key: str) -> None:
        """Add ``conn`` to ``key``; returns once this process receives the key's events."""
        conns = self.by_key.setdefault(key, set())
        if conn not in conns:
            conns.add(conn)
            conn.keys.add(key)
        try:
            await self._want(env.key_channel(key))
        except BaseException:
            self._drop(conn, key)
            raise

    def leave(self, conn: Connection, key: str) -> None:
        self._drop(conn, key)

    def _drop(self, conn: Connection, key: str) -> None:
        conn.keys.discard(key)
        conns = self.by_key.get(key)
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            del self.by_key[key]
            self._release(env.key_channel(key))

    # -- broker subscriptions -----------------------------------------------------------------------

    async def _want(self, channel: str) -> None:
        pump = self._pumps.get(channel)
        if pump is None:
            loop = asyncio.get_running_loop()
            pump = _Pump(channel, loop.create_future())
            pump.task = loop.create_task(self._pump(pump), name=f"pump {channel}")
            self._pumps[channel] = pump
            self.stats.broker_subscriptions += 1
        await asyncio.shield(pump.ready)

    def _release(self, channel: str) -> None:
        pump = self._pumps.pop(channel, None)
        if pump is not None and pump.task is not None:
            pump.task.cancel()
            self.stats.broker_subscriptions -= 1

    async def _pump(self, pump: _Pump) -> None:
        target_is_user = pump.channel.startswith(env.USER_PREFIX)
        target = pump.channel[len(env.USER_PREFIX if target_is_user else env.PREFIX) :]
        table = self.by_user if target_is_user else self.by_key
        try:
            async with self.broker.subscribe(pump.channel) as subscriber:
                pump.ready.set_result(None)
                while True:
                    event = await subscriber.get()
                    self.deliver(table.get(target), event.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not pump.ready.done():
                pump.ready.set_exception(exc)
                pump.ready.exception()  # retrieved: the waiting join reports it
            else:
                log.error("subscription to %s ended: %s", pump.channel, exc)
            if self._pumps.get(pump.channel) is pump:
                del self._pumps[pump.channel]
                self.stats.broker_subscriptions -= 1

    # -- fan-out ------------------------------------------------------------------------------------

    def deliver(self, conns: set[Connection] | None, message: str | bytes) -> int:
        """Send one broker message to ``conns``: decoded once, encoded once, the same bytes to each."""
        self.stats.events_received += 1
        if not conns:
            return 0
        try:
            envelope = env.decode(message)
        except env.EnvelopeError as exc:
            self.stats.bad_envelopes += 1
            log.warning("dropped a broker message that is not an envelope: %s", exc)
            return 0
        payload = orjson.dumps(envelope.event)
        text = payload.decode()
        frame = text_frame(payload)
        if envelope.multi:
            seen = self._seen(envelope.id)
            count = 0
            for conn in conns:
                if conn.id not in seen:
                    seen.add(conn.id)
                    conn.send(text, frame)
                    count += 1
        else:
            for conn in conns:
                conn.send(text, frame)
            count = len(conns)
        self.stats.deliveries += count
        return count

    def _seen(self, event_id: str) -> set[int]:
        seen = self._recent.get(event_id)
        if seen is None:
            seen = self._recent[event_id] = set()
            if len(self._recent) > RECENT_MULTI:
                self._recent.popitem(last=False)
        return seen

    # -- shutdown -----------------------------------------------------------------------------------

    async def close(self, code: int, reason: str) -> None:
        """Close every connection with ``code`` and drop every broker subscription."""
        self.outbox.flush()
        for conn in list(self.connections):
            conn.cut(code, reason)
        for channel in list(self._pumps):
            self._release(channel)
