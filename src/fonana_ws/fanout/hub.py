"""Key -> local connections, user -> local connections, and the fan-out.

The hub holds one broker subscription per broker topic (a channel key, or a user's direct topic) however
many local connections want it (``subscriptions.Subscriptions`` counts them; no task or queue per channel:
the broker hands every message to ``on_message``), decodes each broker message once, builds the outgoing
frame once, and hands the same bytes to every local recipient. Nothing here awaits per recipient.

A watcher (``fonana.typing``) may also ask for the events of a key it has no connection for: ``watch``
holds the key's broker topic, and each of its events is handed to ``watcher`` as well as delivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from fonana_ws.broker import Broker
from fonana_ws.fanout.connection import Connection, Outbox
from fonana_ws.fanout.subscriptions import Subscriptions
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol.frames import text_frame
from fonana_ws.stats import Stats

log = logging.getLogger("fonana_ws.hub")


class Hub:
    def __init__(self, broker: Broker, stats: Stats | None = None) -> None:
        self.broker = broker
        self.stats = stats or Stats()
        self.outbox = Outbox()
        self.by_key: dict[str, set[Connection]] = {}
        self.by_user: dict[str, set[Connection]] = {}
        self.connections: set[Connection] = set()
        #: Each connection holds its user's direct topic and one topic per key it joined.
        self.subscriptions = Subscriptions(broker, self.stats)
        #: Key -> watches not yet ended (``watch``); empty unless someone types (protocol §7.2).
        self.watched: dict[str, int] = {}
        #: ``watcher(key, event)`` for each event of a watched key, after its local delivery.
        self.watcher: Callable[[str, dict[str, Any]], None] | None = None
        #: ``on_member(key, user, joined)`` at each connection's join and leave of a key (channel presence).
        self.on_member: Callable[[str, str, bool], None] | None = None
        #: Key -> the buffers of the recoveries under way (protocol §7.8): each broker message of the key
        #: is also appended to each, until its connection has caught up (``catch`` / ``caught_up``).
        self.catching: dict[str, list[list[str | bytes]]] = {}
        #: Connection -> {key it joined: side key it also receives}, for the connections that asked
        #: (a channel's presence frames, ``presence:K``); a side key ends when its key is left.
        self.sides: dict[Connection, dict[str, str]] = {}
        #: Kind -> ``handler(event)`` for a message between servers (``"control"`` envelope), which no
        #: socket receives; each arrives on a user's own topic (the typing throttle's claims, a
        #: disconnect of the user everywhere).
        self.controls: dict[str, Callable[[dict[str, Any]], None]] = {}
        #: Control kinds nobody here handles, logged once each (bounded: the broker is not trusted to be).
        self._unknown_controls: set[str] = set()
        broker.listen(self.on_message)

    # -- membership -------------------------------------------------------------------------------

    async def add_connection(self, conn: Connection) -> None:
        """Register an authenticated connection for its user's direct events.

        Whether or not this raises, ``remove_connection`` undoes it.
        """
        self.connections.add(conn)
        self.by_user.setdefault(conn.user_id, set()).add(conn)
        self.stats.connections_opened += 1
        await self.subscriptions.acquire(env.user_channel(conn.user_id))

    async def remove_connection(self, conn: Connection) -> None:
        """Forget a connection: leave every key, release subscriptions nobody else here needs."""
        conn.detach()
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        for key in list(conn.keys):
            self._drop(conn, key)
        for key in list(self.sides.get(conn, ())):
            self.end_side(conn, key)
        users = self.by_user.get(conn.user_id)
        if users is not None:
            users.discard(conn)
            if not users:
                del self.by_user[conn.user_id]
        self.subscriptions.release(env.user_channel(conn.user_id))

    async def join(self, conn: Connection, key: str, *, announce: bool = True) -> None:
        """Add ``conn`` to ``key``; returns once this process receives the key's events.

        A connection that joined ``key`` already (its subscribe repeated) returns at once. Without
        ``announce``, ``on_member`` hears of the join only at ``announce()`` (the endpoint calls it once
        ``subscribed`` is sent, so that a presence frame of the socket's own arrival comes after it).
        """
        conns = self.by_key.setdefault(key, set())
        if conn in conns:
            return
        conns.add(conn)
        conn.keys.add(key)
        if announce and self.on_member is not None:
            self.on_member(key, conn.user_id, True)
        try:
            await self.subscriptions.acquire(env.key_channel(key))
        except BaseException:
            self._drop(conn, key)
            raise

    def announce(self, conn: Connection, key: str) -> None:
        """Tell ``on_member`` of a join made with ``announce=False`` (if the connection still holds it)."""
        if self.on_member is not None and conn in self.by_key.get(key, ()):
            self.on_member(key, conn.user_id, True)

    def leave(self, conn: Connection, key: str) -> None:
        self._drop(conn, key)

    def _drop(self, conn: Connection, key: str) -> None:
        """``conn`` leaves ``key``; its acquire of the key's topic is released once, by whoever gets here."""
        conn.keys.discard(key)
        if conn.floors is not None:
            conn.floors.pop(key, None)
        if self._remove(conn, key):
            if self.on_member is not None:
                self.on_member(key, conn.user_id, False)
            sides = self.sides.get(conn)
            if sides is not None and key in sides:
                self.end_side(conn, key)

    def _remove(self, conn: Connection, key: str) -> bool:
        conns = self.by_key.get(key)
        if conns is None or conn not in conns:
            return False
        conns.discard(conn)
        if not conns:
            del self.by_key[key]
        self.subscriptions.release(env.key_channel(key))
        return True

    async def catch(self, conn: Connection, key: str) -> list[str | bytes]:
        """Begin ``conn``'s recovering join of ``key``: returns, once this process receives the key's
        messages, a buffer that collects every one of them from then on. The connection receives nothing
        of the key until ``caught_up``; ``uncatch`` undoes this instead."""
        buffer: list[str | bytes] = []
        self.catching.setdefault(key, []).append(buffer)
        try:
            await self.subscriptions.acquire(env.key_channel(key))
        except BaseException:
            self._stop_catching(key, buffer)
            raise
        return buffer

    def caught_up(self, conn: Connection, key: str, buffer: list[str | bytes], floor: int = 0) -> None:
        """The recovered events, up to offset ``floor``, are sent: from now on ``conn`` receives ``key``
        live (the topic acquired by ``catch`` is its), skipping events at or below ``floor`` that the
        broker hands over late. Call with no await since the buffer was last read."""
        self._stop_catching(key, buffer)
        if floor > 0:
            if conn.floors is None:
                conn.floors = {}
            conn.floors[key] = floor
        conns = self.by_key.setdefault(key, set())
        if conn in conns:
            self.subscriptions.release(env.key_channel(key))  # joined meanwhile: one acquire is enough
            return
        conns.add(conn)
        conn.keys.add(key)
        if self.on_member is not None:
            self.on_member(key, conn.user_id, True)

    def uncatch(self, key: str, buffer: list[str | bytes]) -> None:
        """A recovery given up after ``catch`` returned: its acquire is released."""
        self._stop_catching(key, buffer)
        self.subscriptions.release(env.key_channel(key))

    def _stop_catching(self, key: str, buffer: list[str | bytes]) -> None:
        buffers = self.catching.get(key)
        if buffers is None:
            return
        buffers[:] = [b for b in buffers if b is not buffer]
        if not buffers:
            del self.catching[key]

    async def add_side(self, conn: Connection, key: str, side: str) -> None:
        """Deliver ``side``'s messages to ``conn`` too, until it leaves ``key`` (which it joined) or
        ``end_side``; returns once this process receives them. ``side`` is no channel of the socket's
        (not in ``conn.keys``: it counts against no subscription limit)."""
        sides = self.sides.setdefault(conn, {})
        if sides.get(key) == side:
            return
        sides[key] = side
        self.by_key.setdefault(side, set()).add(conn)
        try:
            await self.subscriptions.acquire(env.key_channel(side))
        except BaseException:
            self.end_side(conn, key)
            raise

    def end_side(self, conn: Connection, key: str) -> None:
        sides = self.sides.get(conn)
        side = sides.pop(key, None) if sides is not None else None
        if sides is not None and not sides:
            del self.sides[conn]
        if side is not None:
            self._remove(conn, side)

    def watch(self, key: str) -> asyncio.Future[None]:
        """Hand ``key``'s events to ``watcher`` until a matching ``unwatch``; this process subscribes it.

        The result is done once the process receives the key's events. Awaiting it is optional: a watch
        that fails is logged here, and misses events.
        """
        self.watched[key] = self.watched.get(key, 0) + 1
        ready = self.subscriptions.acquire(env.key_channel(key))
        ready.add_done_callback(partial(_watch_done, key))
        return ready

    def unwatch(self, key: str) -> None:
        count = self.watched.get(key, 0)
        if count == 0:
            raise ValueError(f"unwatch of {key!r} without a watch")
        if count == 1:
            del self.watched[key]
        else:
            self.watched[key] = count - 1
        self.subscriptions.release(env.key_channel(key))

    def on_message(self, channel: str, message: str) -> None:
        """A broker message for ``channel``: its local connections are the target."""
        if channel.startswith(env.USER_PREFIX):
            conns = self.by_user.get(channel[len(env.USER_PREFIX) :])
            self.deliver(conns, message)
            return
        key = channel[len(env.PREFIX) :]
        self.deliver(self.by_key.get(key), message, key)
        if self.catching and key in self.catching:  # one truth test, unless a client is recovering
            for buffer in self.catching[key]:
                buffer.append(message)
        if key in self.watched:  # one lookup in an empty dict, unless someone is typing
            self._hand_to_watcher(key, message)

    def _hand_to_watcher(self, key: str, message: str | bytes) -> None:
        # Decoded a second time: only events of watched keys (a conversation someone types in) pay for it.
        watcher = self.watcher
        if watcher is None:
            return
        try:
            event = env.decode(message).event
        except env.EnvelopeError:
            return  # counted and logged by deliver, when someone here joined the key
        try:
            watcher(key, event)
        except Exception:  # the watcher's failure must not end delivery for everyone
            log.exception("watcher of %s failed", key)

    # -- fan-out ------------------------------------------------------------------------------------

    def deliver(self, conns: set[Connection] | None, message: str | bytes, key: str | None = None) -> int:
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
        if envelope.control is not None:  # between servers: a handler's, never a socket's
            self._control(envelope)
            return 0
        payload = orjson.dumps(envelope.event)
        text = payload.decode()
        frame = text_frame(payload)
        count = 0
        multi = envelope.multi
        event_id = envelope.id
        for conn in conns:
            if multi and conn.seen_multi(event_id):
                continue
            if conn.floors is not None and key is not None and _below_floor(conn, key, envelope.event):
                continue
            try:
                conn.send(text, frame)
            except Exception:  # one broken socket must not cost the other recipients their event
                log.exception("delivery to connection %s failed", conn.id)
                conn.detach()
            count += 1
        self.stats.deliveries += count
        return count

    def _control(self, envelope: env.Envelope) -> None:
        kind = envelope.control or ""
        handler = self.controls.get(kind)
        if handler is None:
            # A newer process may speak a kind this one does not know: ignored, said once.
            if kind not in self._unknown_controls and len(self._unknown_controls) < 64:
                self._unknown_controls.add(kind)
                log.warning("ignored control messages of unknown kind %r", kind)
            return
        try:
            handler(envelope.event)
        except Exception:  # the handler's failure must not end delivery for everyone
            log.exception("control message %s failed", kind)

    # -- shutdown -----------------------------------------------------------------------------------

    async def close(self, code: int, reason: str) -> None:
        """Close every connection with ``code`` and drop every broker subscription."""
        self.outbox.flush()
        for conn in list(self.connections):
            conn.cut(code, reason)
        await self.subscriptions.close()


def _below_floor(conn: Connection, key: str, event: dict[str, Any]) -> bool:
    """Was this live event of ``key`` already in ``conn``'s replay? The broker may still hand over events
    the history read already returned; past the first newer one, the key needs no floor any more."""
    floors = conn.floors
    assert floors is not None
    floor = floors.get(key)
    if floor is None:
        return False
    offset = event.get("offset")
    if isinstance(offset, int) and offset <= floor:
        return True
    del floors[key]
    if not floors:
        conn.floors = None
    return False


def _watch_done(key: str, ready: asyncio.Future[None]) -> None:
    if not ready.cancelled() and (exc := ready.exception()) is not None:
        log.warning("watch of %s failed: %s", key, exc)
