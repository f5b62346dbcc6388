"""Typing states (protocol §7.2) with a fake clock and a fake broker: the throttle, the server's own
``isTyping: false`` and its one timer, with no socket and no sleeping. Also the hub's watch it relies on."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from fonana_ws.fanout.connection import Connection
from fonana_ws.fanout.hub import Hub
from fonana_ws.fonana.typing import EXPIRY, THROTTLE, Typing
from fonana_ws.protocol import envelope as env
from fonana_ws.stats import Stats

from .test_connection import FakeOutlet, FakeSocket

pytestmark = pytest.mark.unit

A, B = "alice", "bob"


async def settle() -> None:
    """A few loop turns: the broker's (un)subscribe tasks and their done callbacks run."""
    for _ in range(5):
        await asyncio.sleep(0)


class FakeHandle:
    def __init__(self, clock: FakeClock, when: float, callback: Callable[[], object]) -> None:
        self.clock, self.when, self.callback = clock, when, callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """``time`` and ``call_at`` as the loop has them; time moves only with ``advance``."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._heap: list[tuple[float, int, FakeHandle]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> FakeHandle:
        handle = FakeHandle(self, when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), handle))
        return handle

    def pending(self) -> int:
        """Callbacks scheduled and neither run nor cancelled: what a real loop would hold."""
        return sum(1 for _, _, h in self._heap if not h.cancelled)

    def advance(self, seconds: float) -> None:
        """Move time on, running every callback that comes due on the way, at its time."""
        end = self.now + seconds
        while self._heap and self._heap[0][0] <= end:
            when, _, handle = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            self.now = max(self.now, when)
            handle.callback()
        self.now = end


class FakeBroker:
    """Subscriptions and published messages, recorded."""

    def __init__(self) -> None:
        self.on_message: Any = None
        self.calls: list[tuple[str, str]] = []
        self.published: list[tuple[str, dict[str, Any]]] = []
        #: Control messages between servers (the throttle's claims), apart from what sockets receive.
        self.claims: list[tuple[str, dict[str, Any]]] = []
        self.fail: Exception | None = None
        #: When set, a publish waits for it: a broker round trip still on its way.
        self.gate: asyncio.Event | None = None

    def listen(self, on_message: Any) -> None:
        self.on_message = on_message

    async def subscribe(self, topic: str) -> None:
        self.calls.append(("subscribe", topic))

    async def unsubscribe(self, topic: str) -> None:
        self.calls.append(("unsubscribe", topic))

    async def publish_many(self, items: list[tuple[str, str]]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        for channel, message in items:
            body = orjson.loads(message)
            (self.claims if body.get("control") else self.published).append((channel, body["event"]))

    def deliver(self, topic: str, event: dict[str, Any], control: str | None = None) -> None:
        self.on_message(topic, env.encode(event, env.new_event_id(), control=control))


class World:
    """One process's hub and typing states over the fakes."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.broker = FakeBroker()
        self.stats = Stats()
        self.hub = Hub(self.broker, self.stats)  # type: ignore[arg-type]
        self.typing = Typing(self.hub, self.stats, clock=self.clock)

    def conn(self, user: str) -> Connection:
        return Connection(FakeSocket(), user, self.hub.outbox, limit=1 << 20, outlet=FakeOutlet())

    async def relayed(self) -> list[tuple[str, str, bool]]:
        """(to user, typing user, isTyping) of everything published since the last call."""
        await self.typing.drained()
        await settle()
        out = []
        for channel, event in self.broker.published:
            assert channel.startswith(env.USER_PREFIX), channel
            assert set(event) == {"type", "conversationId", "userId", "isTyping"}, event
            assert event["type"] == "typing"
            out.append((channel[len(env.USER_PREFIX) :], event["userId"], event["isTyping"]))
        self.broker.published.clear()
        return out

    def idle(self) -> bool:
        """No state, no index entry, no watch and no pending callback left."""
        return (
            not self.typing.states
            and not self.typing.by_conn
            and not self.hub.watched
            and self.clock.pending() == 0
            and self.stats.typing_active == 0
        )


def new_message(conversation: str, sender: str) -> dict[str, Any]:
    return {
        "type": "new_message",
        "conversationId": conversation,
        "message": {"id": "m1", "senderId": sender},
    }


async def test_a_true_goes_to_the_other_participant_as_the_protocol_shapes_it() -> None:
    w = World()
    w.typing.frame(w.conn(A), "c1", B, True)
    await w.typing.drained()
    assert w.broker.published == [
        (env.user_channel(B), {"type": "typing", "conversationId": "c1", "userId": A, "isTyping": True})
    ]


async def test_ten_trues_in_one_second_relay_one() -> None:
    w = World()
    conn = w.conn(A)
    for _ in range(10):
        w.typing.frame(conn, "c1", B, True)
        w.clock.advance(0.1)
    assert await w.relayed() == [(B, A, True)]
    assert w.stats.typing_relayed["frame"] == 1 and w.stats.typing_swallowed == 9


async def test_a_repeat_after_the_throttle_is_relayed_again_and_pushes_the_expiry_back() -> None:
    w = World()
    conn = w.conn(A)
    w.typing.frame(conn, "c1", B, True)
    w.clock.advance(THROTTLE - 0.01)
    w.typing.frame(conn, "c1", B, True)  # swallowed, but a repeat all the same
    assert await w.relayed() == [(B, A, True)]
    w.clock.advance(0.02)
    w.typing.frame(conn, "c1", B, True)
    assert await w.relayed() == [(B, A, True)]
    w.clock.advance(EXPIRY - 0.01)  # 6 s after the first frame, not after the last
    assert await w.relayed() == []
    w.clock.advance(0.02)
    assert await w.relayed() == [(B, A, False)]
    assert w.stats.typing_relayed["expired"] == 1 and w.idle()


async def test_false_is_relayed_once_and_a_false_with_nothing_shown_is_swallowed() -> None:
    w = World()
    conn = w.conn(A)
    w.typing.frame(conn, "c9", B, False)  # never typed
    w.typing.frame(conn, "c1", B, True)
    w.typing.frame(conn, "c1", B, False)
    w.typing.frame(conn, "c1", B, False)
    assert await w.relayed() == [(B, A, True), (B, A, False)]
    assert w.stats.typing_swallowed == 2
    w.clock.advance(EXPIRY + 1)
    assert await w.relayed() == []  # no second false from the expiry
    assert w.idle()


async def test_a_true_right_after_a_false_waits_for_the_throttle() -> None:
    """At most one true per 2 s, even across a false: the next repeat after the 2 s shows it."""
    w = World()
    conn = w.conn(A)
    w.typing.frame(conn, "c1", B, True)
    w.clock.advance(0.5)
    w.typing.frame(conn, "c1", B, False)
    w.clock.advance(0.5)
    w.typing.frame(conn, "c1", B, True)  # 1 s after the last true: swallowed
    assert await w.relayed() == [(B, A, True), (B, A, False)]
    w.clock.advance(1.0)
    w.typing.frame(conn, "c1", B, True)  # 2 s: shown
    assert await w.relayed() == [(B, A, True)]
    w.typing.frame(conn, "c1", B, False)
    assert await w.relayed() == [(B, A, False)]


async def test_a_swallowed_true_that_is_never_repeated_expires_without_a_false() -> None:
    w = World()
    conn = w.conn(A)
    w.typing.frame(conn, "c1", B, True)
    w.typing.frame(conn, "c1", B, False)
    w.clock.advance(1.0)
    w.typing.frame(conn, "c1", B, True)  # within the throttle: never shown
    w.clock.advance(EXPIRY + 0.1)
    assert await w.relayed() == [(B, A, True), (B, A, False)]
    assert w.idle()


async def test_a_stopped_state_is_kept_only_for_the_throttle() -> None:
    w = World()
    conn = w.conn(A)
    w.typing.frame(conn, "c1", B, True)
    w.clock.advance(THROTTLE + 0.1)
    w.typing.frame(conn, "c1", B, False)  # the throttle is over: nothing to keep
    assert await w.relayed() == [(B, A, True), (B, A, False)]
    assert w.idle()


async def test_closing_the_connection_that_typed_last_stops_it_once() -> None:
    w = World()
    first, second, other_tab = w.conn(A), w.conn(A), w.conn(A)
    w.typing.frame(first, "c1", B, True)
    w.typing.frame(first, "c2", B, True)
    w.typing.frame(second, "c2", B, True)  # c2 is now typed by the second tab
    w.typing.closed(other_tab)  # never typed: nothing
    assert await w.relayed() == [(B, A, True), (B, A, True)]
    w.typing.closed(first)
    assert await w.relayed() == [(B, A, False)]  # c1 only
    assert w.stats.typing_relayed["disconnect"] == 1
    w.typing.closed(first)  # twice: nothing more
    w.typing.closed(second)
    assert await w.relayed() == [(B, A, False)]
    w.clock.advance(EXPIRY + 1)
    assert await w.relayed() == [] and w.idle()


async def test_a_new_message_of_the_typer_stops_it_once_and_only_that() -> None:
    w = World()
    w.typing.frame(w.conn(A), "c1", B, True)
    w.typing.frame(w.conn(B), "c1", A, True)
    w.typing.frame(w.conn(A), "c2", "carol", True)
    await w.relayed()
    topic = env.key_channel("conversation_c1")
    assert ("subscribe", topic) in w.broker.calls and w.hub.watched["conversation_c1"] == 2
    w.broker.deliver(topic, new_message("c1", A))
    assert await w.relayed() == [(B, A, False)]  # not B's typing, not A's in c2
    w.broker.deliver(topic, new_message("c1", A))  # a second message: nothing more to stop
    w.broker.deliver(topic, {"type": "message_read", "conversationId": "c1", "userId": A, "messageIds": []})
    assert await w.relayed() == []
    assert w.stats.typing_relayed["new_message"] == 1
    w.clock.advance(EXPIRY + 1)
    assert sorted(await w.relayed()) == [(A, B, False), ("carol", A, False)]
    assert w.idle()
    assert ("unsubscribe", topic) in w.broker.calls


async def test_ten_thousand_typers_mean_one_pending_callback_and_nothing_after() -> None:
    w = World()
    conns = [w.conn(f"u{n}") for n in range(10_000)]
    for n, conn in enumerate(conns):
        w.typing.frame(conn, f"c{n}", f"v{n}", True)
        if n % 1000 == 0:
            w.clock.advance(0.1)
    assert w.clock.pending() == 1
    assert w.stats.typing_active == 10_000
    for _ in range(5):  # everyone keeps typing: repeats move states, never add a callback
        w.clock.advance(1.0)
        for n, conn in enumerate(conns):
            w.typing.frame(conn, f"c{n}", f"v{n}", True)
        assert w.clock.pending() <= 1
    w.clock.advance(EXPIRY + 0.1)
    relayed = await w.relayed()
    assert sum(1 for _, _, shown in relayed if not shown) == 10_000
    assert w.stats.typing_relayed["expired"] == 10_000
    assert w.idle()


async def test_every_expiry_comes_at_its_own_deadline() -> None:
    """States started 0.1 s apart, some repeated, some stopped: each false exactly 6 s after its last true."""
    w = World()
    conns = [w.conn(f"u{n}") for n in range(40)]
    start = w.clock.now
    last: dict[int, float] = {}
    for n, conn in enumerate(conns):
        w.typing.frame(conn, "c", f"v{n}", True)
        last[n] = w.clock.now
        w.clock.advance(0.1)
    for n in range(0, 40, 3):  # repeated 1 s later (swallowed, but it counts as a repeat)
        w.typing.frame(conns[n], "c", f"v{n}", True)
        last[n] = w.clock.now
    for n in range(1, 40, 7):
        w.typing.frame(conns[n], "c", f"v{n}", False)
        del last[n]
    await w.relayed()
    seen: dict[int, float] = {}
    while w.clock.now < start + 20:
        w.clock.advance(0.05)
        for to_user, _, shown in await w.relayed():
            assert not shown
            seen[int(to_user[1:])] = w.clock.now
    assert set(seen) == set(last)
    for n, at in seen.items():
        assert last[n] + EXPIRY <= at < last[n] + EXPIRY + 0.05 + 1e-9, (n, at - last[n])
    assert w.idle()


async def test_a_broker_that_refuses_costs_the_relays_only() -> None:
    w = World()
    w.broker.fail = ConnectionError("down")
    w.typing.frame(w.conn(A), "c1", B, True)
    await w.typing.drained()
    assert w.stats.typing_relay_failures == 1 and w.broker.published == []
    w.broker.fail = None
    w.clock.advance(EXPIRY + 0.1)
    assert await w.relayed() == [(B, A, False)]
    assert w.idle()


async def test_relays_keep_their_order_across_batches() -> None:
    w = World()
    conn = w.conn(A)
    w.broker.gate = asyncio.Event()
    w.typing.frame(conn, "c1", B, True)
    await settle()  # the first batch is on its way, and waits for the broker
    w.typing.frame(conn, "c1", B, False)
    w.typing.frame(w.conn(B), "c1", A, True)
    await settle()
    assert w.broker.published == []
    w.broker.gate.set()
    assert await w.relayed() == [(B, A, True), (B, A, False), (A, B, True)]


# -- the hub's watch ------------------------------------------------------------------------------------


async def test_watch_holds_the_topic_once_and_hands_its_events_to_the_watcher() -> None:
    broker = FakeBroker()
    hub = Hub(broker, Stats())  # type: ignore[arg-type]
    seen: list[tuple[str, dict[str, Any]]] = []
    hub.watcher = lambda key, event: seen.append((key, event))
    topic = env.key_channel("conversation_c1")
    hub.watch("conversation_c1")
    hub.watch("conversation_c1")
    await settle()
    assert broker.calls == [("subscribe", topic)]
    broker.deliver(topic, {"type": "x"})
    broker.deliver(env.key_channel("conversation_c2"), {"type": "y"})  # not watched
    assert seen == [("conversation_c1", {"type": "x"})]
    hub.unwatch("conversation_c1")
    await settle()
    assert broker.calls == [("subscribe", topic)]  # one watch left
    hub.unwatch("conversation_c1")
    await settle()
    assert broker.calls == [("subscribe", topic), ("unsubscribe", topic)] and not hub.watched
    with pytest.raises(ValueError, match="conversation_c1"):
        hub.unwatch("conversation_c1")


async def test_a_failing_watcher_does_not_cost_the_local_subscribers_their_event() -> None:
    broker = FakeBroker()
    hub = Hub(broker, Stats())  # type: ignore[arg-type]

    def broken(key: str, event: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    hub.watcher = broken
    outlet = FakeOutlet()
    conn = Connection(FakeSocket(), A, hub.outbox, limit=1 << 20, outlet=outlet)
    await hub.join(conn, "conversation_c1")
    hub.watch("conversation_c1")
    broker.deliver(env.key_channel("conversation_c1"), {"type": "new_message"})
    hub.outbox.flush()
    assert b"new_message" in b"".join(outlet.writes)


# -- across processes: claims on the typer's own user topic ----------------------------------------------


async def test_each_relayed_true_is_claimed_on_the_typers_own_topic_and_never_reaches_a_socket() -> None:
    w = World()
    outlet = FakeOutlet()
    alice = Connection(FakeSocket(), "alice", w.hub.outbox, limit=1 << 20, outlet=outlet)
    await w.hub.add_connection(alice)
    w.typing.frame(alice, "c1", "bob", True)
    assert await w.relayed() == [("bob", "alice", True)]
    assert [(c, e["type"], e["by"]) for c, e in w.broker.claims] == [
        (env.user_channel("alice"), "typing_claim", w.typing.id)
    ]
    # its own claim coming back changes nothing, and alice's socket gets no frame of it
    w.broker.deliver(env.user_channel("alice"), w.broker.claims[0][1], control="typing")
    w.clock.advance(EXPIRY + 0.1)
    assert await w.relayed() == [("bob", "alice", False)]
    w.broker.deliver(env.user_channel("alice"), {"type": "notification", "n": 1})  # a real one does arrive
    await settle()
    assert [b"claim" in w for w in outlet.writes] == [False] and b'"n":1' in outlet.writes[0], outlet.writes


async def test_another_process_claim_counts_for_the_throttle_and_takes_the_false() -> None:
    w = World()
    tab = w.conn("alice")
    await w.hub.add_connection(tab)
    # alice typed on another process first: this one counts that true, and owes no false for it
    claim = {"type": "typing_claim", "userId": "alice", "conversationId": "c1", "to": "bob", "by": "other"}
    w.broker.deliver(env.user_channel("alice"), claim, control="typing")
    w.clock.advance(0.5)
    w.typing.frame(tab, "c1", "bob", True)  # within 2 s of the other's true: swallowed
    assert await w.relayed() == []
    w.clock.advance(THROTTLE)
    w.typing.frame(tab, "c1", "bob", True)  # past the throttle: this process shows it, owes the false
    assert await w.relayed() == [("bob", "alice", True)]
    # now the other process shows a later true: this one gives the false up
    w.broker.deliver(env.user_channel("alice"), claim, control="typing")
    w.clock.advance(EXPIRY + 0.1)
    assert await w.relayed() == []
    assert w.stats.typing_handed_over == 1
    assert w.clock.pending() == 0 and not w.typing.states, "a claim left a state or a timer behind"


async def test_a_claim_alone_leaves_nothing_behind_after_the_throttle() -> None:
    w = World()
    tab = w.conn("alice")
    await w.hub.add_connection(tab)
    claim = {"type": "typing_claim", "userId": "alice", "conversationId": "c9", "to": "bob", "by": "other"}
    w.broker.deliver(env.user_channel("alice"), claim, control="typing")
    assert len(w.typing.states) == 1
    w.clock.advance(THROTTLE + 0.1)
    await settle()
    assert not w.typing.states and w.clock.pending() == 0
    assert await w.relayed() == []
