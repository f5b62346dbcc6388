"""Typing indicators (protocol §7.2): the throttle, the server's own ``isTyping: false``, and the relay.

One ``Typing`` per process holds a state per (user, conversation) that someone types in here, shared by
the user's connections on this process (the session has already checked they are participants). A state
relays at most one ``isTyping: true`` per ``THROTTLE`` seconds and exactly one ``false`` after each
relayed ``true``: when the user says so, after ``EXPIRY`` seconds without a repeat, when the connection
that typed last closes, or when a ``new_message`` of the user in the conversation is published. Relays
go to the other participant's user topic through the broker, so that each of their connections gets one
on every process, and never one of the sender's.

Why nothing lingers: a connection that never types has no state, no timer and no entry here. All
states sit in one ``OrderedDict`` in the order of their deadlines (every deadline is "now + a constant",
so moving a state to the end on each repeat keeps the order), and one ``loop.call_at`` waits for the
first: 10,000 typers are 10,000 small objects and one pending callback, and a state is gone at most
``EXPIRY`` seconds after its last frame. ``new_message`` is seen by watching the conversation's channel
(``Hub.watch``) while a state exists, so the process that holds the state is the one that answers it,
whichever process the message was published on: one ``false``, across any number of processes.

Across processes (one user typing in one conversation from tabs on two processes): each relayed
``true`` also goes, as a claim, to the typer's own user topic, which every process holding one of the
typer's connections listens to already (no subscription is added). A process that sees another's claim
counts it for its throttle and gives up the ``false`` it owed, so the last relayer owes the one
``false``. Two processes relaying within one broker round trip (~1 ms) of each other can still both
show ``true``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from fonana_ws.fanout.connection import Connection
from fonana_ws.fanout.hub import Hub
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol.frames import typing_event
from fonana_ws.stats import Stats

log = logging.getLogger("fonana_ws.typing")

#: Seconds between two relayed ``isTyping: true`` of one (user, conversation) (protocol §7.2).
THROTTLE = 2.0
#: Seconds without a repeat after which the server says ``isTyping: false`` itself (protocol §7.2).
EXPIRY = 6.0
CONVERSATION_PREFIX = "conversation_"
#: How long relays wait for a new watch of a conversation (a broker round trip; the backends give up at 2).
WATCH_WAIT = 1.0


class Handle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What ``Typing`` needs of the event loop (``asyncio.AbstractEventLoop`` is one; tests fake it)."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Handle: ...


class State:
    """One (user, conversation) typing state."""

    __slots__ = ("user_id", "conversation_id", "to_user", "conn", "shown", "last_true", "due")

    def __init__(self, user_id: str, conversation_id: str, to_user: str) -> None:
        self.user_id = user_id
        self.conversation_id = conversation_id
        self.to_user = to_user
        #: The connection that typed last; None once stopped (the state waits out the throttle).
        self.conn: Connection | None = None
        #: The other participant was last told ``true``: a ``false`` is owed.
        self.shown = False
        #: When the last ``true`` was relayed.
        self.last_true = float("-inf")
        #: When this state is looked at next: the expiry while typing, the throttle's end once stopped.
        self.due = 0.0


Key = tuple[str, str]


class Typing:
    """Every typing state of one process, its one timer, and the relays it owes."""

    def __init__(self, hub: Hub, stats: Stats, *, clock: Clock | None = None) -> None:
        self.hub = hub
        self.stats = stats
        self.clock: Clock = clock or asyncio.get_running_loop()
        #: (user, conversation) -> state, in the order of ``due`` (for states that are typing).
        self.states: OrderedDict[Key, State] = OrderedDict()
        #: Connection -> the states it typed last in: only connections that type are here.
        self.by_conn: dict[Connection, set[Key]] = {}
        self._timer: Handle | None = None
        #: Broker messages owed, published in order by one task at a time (``_flush``).
        self._out: list[tuple[str, str]] = []
        #: Watches not ready yet: the relays wait for them, so that a receiver who saw ``true`` knows the
        #: typer's process already listens for the ``new_message`` that ends it.
        self._watching: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._failing = False
        #: This process's name in its claims, so that it ignores its own.
        self.id = uuid.uuid4().hex
        #: Claims among ``_out`` (a failure counts the relays only).
        self._claims_out = 0
        hub.watcher = self.on_event
        hub.controls["typing"] = lambda event: self.on_control("typing", event)

    # -- what happens -------------------------------------------------------------------------------

    def frame(self, conn: Connection, conversation_id: str, to_user: str, is_typing: bool) -> None:
        """A typing frame of ``conn``'s user, a participant of the conversation with ``to_user``."""
        now = self.clock.time()
        key = (conn.user_id, conversation_id)
        state = self.states.get(key)
        if not is_typing:
            if state is None or not state.shown:
                self.stats.typing_swallowed += 1  # nothing shown, nothing to take back
            if state is not None:
                self._stop(state, now, "frame")
            return
        if state is None:
            state = self._new_state(key, to_user)
        else:
            self.states.move_to_end(key)
        self._typed_by(state, key, conn)
        state.due = now + EXPIRY
        if now - state.last_true < THROTTLE:
            # A repeat while shown; or, just after a false, a true that would make two within 2 s:
            # the next repeat after the throttle shows it.
            self.stats.typing_swallowed += 1
        else:
            state.shown = True
            state.last_true = now
            self._relay(state, True, "frame")
            self._claim(state)
        self._arm()

    def on_control(self, kind: str, event: dict[str, Any]) -> None:
        """Another process relayed ``true`` for one of this process's users (``Hub.controls``): it
        counts for the throttle here, and that process owes the ``false``."""
        if kind != "typing" or event.get("by") == self.id:
            return
        user, conversation, to_user = event.get("userId"), event.get("conversationId"), event.get("to")
        if not (isinstance(user, str) and isinstance(conversation, str) and isinstance(to_user, str)):
            return
        now = self.clock.time()
        key = (user, conversation)
        state = self.states.get(key)
        if state is None:
            state = self._new_state(key, to_user)  # throttle only: gone once the 2 s are over
            state.due = now + THROTTLE
        elif state.conn is None:
            state.due = max(state.due, now + THROTTLE)
        self.states.move_to_end(key)  # an earlier ``due`` than those behind is fine (see ``_stop``)
        state.last_true = now
        if state.shown:
            state.shown = False
            self.stats.typing_handed_over += 1
        self._arm()

    def closed(self, conn: Connection) -> None:
        """``conn`` is gone: what it was typing stops (one ``false`` each)."""
        keys = self.by_conn.pop(conn, None)
        if not keys:
            return
        now = self.clock.time()
        for key in keys:
            state = self.states.get(key)
            if state is not None and state.conn is conn:
                state.conn = None  # already out of by_conn
                self._stop(state, now, "disconnect")

    def on_event(self, key: str, event: dict[str, Any]) -> None:
        """An event of a watched conversation (``Hub.watcher``): a ``new_message`` ends its sender's
        typing."""
        if event.get("type") != "new_message":
            return
        message = event.get("message")
        sender = message.get("senderId") if isinstance(message, dict) else None
        if not isinstance(sender, str):
            return
        # The broker channel decides the conversation, as it decides every target (protocol §5).
        state = self.states.get((sender, key[len(CONVERSATION_PREFIX) :]))
        if state is not None:
            self._stop(state, self.clock.time(), "new_message")

    # -- states ---------------------------------------------------------------------------------------

    def _new_state(self, key: Key, to_user: str) -> State:
        state = self.states[key] = State(key[0], key[1], to_user)
        ready = self.hub.watch(CONVERSATION_PREFIX + key[1])
        if not ready.done():
            self._watching.append(ready)
        self.stats.typing_active = len(self.states)
        return state

    def _typed_by(self, state: State, key: Key, conn: Connection) -> None:
        previous = state.conn
        if previous is conn:
            return
        if previous is not None:
            self._forget_conn(previous, key)
        state.conn = conn
        self.by_conn.setdefault(conn, set()).add(key)

    def _forget_conn(self, conn: Connection, key: Key) -> None:
        keys = self.by_conn.get(conn)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_conn[conn]

    def _stop(self, state: State, now: float, reason: str) -> None:
        """No longer typing: owe one ``false`` if a ``true`` was shown; keep the state for the throttle
        only."""
        key = (state.user_id, state.conversation_id)
        if state.conn is not None:
            self._forget_conn(state.conn, key)
            state.conn = None
        if state.shown:
            state.shown = False
            self._relay(state, False, reason)
        until = state.last_true + THROTTLE
        if until <= now:
            self._drop(key)
            return
        # Kept until the throttle ends, so that a true right after this false is not a second within 2 s.
        # Its ``due`` is earlier than the states behind it, so it may be dropped late (by at most EXPIRY);
        # the expiry of every typing state still comes on time (none ahead of it is due after it).
        state.due = until
        self.states.move_to_end(key)
        self._arm()

    def _drop(self, key: Key) -> None:
        state = self.states.pop(key)
        if state.conn is not None:
            self._forget_conn(state.conn, key)
        self.hub.unwatch(CONVERSATION_PREFIX + state.conversation_id)
        self.stats.typing_active = len(self.states)
        if not self.states and self._timer is not None:
            self._timer.cancel()  # nothing left to wait for: no callback outlives the last state
            self._timer = None

    # -- the one timer --------------------------------------------------------------------------------

    def _arm(self) -> None:
        """One ``call_at`` for the first state; a later one never needs an earlier call (see ``_stop``)."""
        if self._timer is None and self.states:
            first = next(iter(self.states.values()))
            self._timer = self.clock.call_at(first.due, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.time()
        states = self.states
        while states:
            key, state = next(iter(states.items()))
            if state.due > now:
                break  # the first is not due: it was repeated since the timer was set, or is the next
            if state.conn is not None:
                self._stop(state, now, "expired")  # past the throttle too: dropped at once
            else:
                self._drop(key)
        self._arm()

    # -- out through the broker -----------------------------------------------------------------------

    def _relay(self, state: State, is_typing: bool, reason: str) -> None:
        event = typing_event(state.conversation_id, state.user_id, is_typing)
        self._out.append((env.user_channel(state.to_user), env.encode(event, env.new_event_id())))
        self.stats.typing_relayed[reason] += 1
        if self._flusher is None:
            # Started next loop turn: what this turn relays (a burst of expiries) goes in one round trip.
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    def _claim(self, state: State) -> None:
        """Tell this user's other processes that a ``true`` went out (same batch as the relay)."""
        claim = {
            "type": "typing_claim",
            "userId": state.user_id,
            "conversationId": state.conversation_id,
            "to": state.to_user,
            "by": self.id,
        }
        self._out.append(
            (env.user_channel(state.user_id), env.encode(claim, env.new_event_id(), control="typing"))
        )
        self._claims_out += 1

    async def _flush(self) -> None:
        """Publish what is owed, a batch per broker round trip, one batch at a time: a false never
        overtakes its true."""
        broker = self.hub.broker
        try:
            while self._out:
                if self._watching:
                    watching, self._watching = self._watching, []
                    await asyncio.wait(watching, timeout=WATCH_WAIT)
                batch, self._out = self._out, []
                claims, self._claims_out = self._claims_out, 0
                try:
                    await broker.publish_many(batch)
                except Exception as exc:  # broker down: typing is not worth a retry, the next frame is one
                    self.stats.typing_relay_failures += len(batch) - claims
                    if not self._failing:
                        log.warning(
                            "typing relay failed (%d dropped, later ones only counted): %s",
                            len(batch) - claims,
                            exc,
                        )
                    self._failing = True
                else:
                    if self._failing:
                        log.info("typing relay works again")
                    self._failing = False
        finally:
            self._flusher = None

    async def drained(self) -> None:
        """Return once every relay owed so far was handed to the broker (tests and the bench)."""
        while self._flusher is not None:
            await asyncio.wait([self._flusher])
