"""Channel presence (protocol §7.4) without sockets: ``ChannelPresence`` on the memory store, a fake clock,
a fake broker and a fake database. The refcount, the batched writer, the grace, hidden users, the counts
above the list limit and the query, with no sleeping.

The memory store stamps leaves and count claims with ``time``; the tests point that module's ``time`` at
the fake clock, so that the store's grace and the presence's timers measure the same seconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from fonana_ws.fonana import presence_store
from fonana_ws.fonana.presence import ChannelPresence, topic_key
from fonana_ws.fonana.presence_store import Change, Lookup, MemoryPresenceStore
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol.frames import presence_count, presence_join, presence_leave
from fonana_ws.stats import Stats

pytestmark = pytest.mark.unit

GRACE = 5.0
INTERVAL = 10.0
LIMIT = 3
KEY = "creator_c1"
CHANNEL = {"type": "creator", "id": "c1"}


class FakeHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """``time`` and ``call_at`` as the loop has them; time moves only with ``advance``."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._heap: list[tuple[float, int, Callable[[], object], FakeHandle]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:  # the store's claims, as ``time.monotonic``
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> FakeHandle:
        handle = FakeHandle()
        heapq.heappush(self._heap, (when, next(self._seq), callback, handle))
        return handle

    def pending(self) -> int:
        return sum(1 for *_, h in self._heap if not h.cancelled)

    def due(self) -> bool:
        return any(when <= self.now and not h.cancelled for when, _, _, h in self._heap)

    def advance(self, seconds: float) -> None:
        """Move time on, running every callback that comes due on the way, at its time."""
        end = self.now + seconds
        while self._heap and self._heap[0][0] <= end:
            when, _, callback, handle = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            self.now = max(self.now, when)
            callback()
        self.now = end


class RecordingStore(MemoryPresenceStore):
    """The memory store, with its writes recorded; ``failing`` makes every round trip raise, ``gate`` makes
    a write wait (a round trip on its way)."""

    def __init__(self, *, grace: float) -> None:
        super().__init__(grace=grace)
        self.writes: list[list[tuple[str, list[str], list[str]]]] = []
        self.failing = False
        self.gate: asyncio.Event | None = None

    def _check(self) -> None:
        if self.failing:
            raise ConnectionError("presence backend down")

    async def change(self, batch: list[tuple[str, list[str], list[str]]]) -> list[Change]:
        if self.gate is not None:
            await self.gate.wait()
        self._check()
        self.writes.append([(key, list(enter), list(leave)) for key, enter, leave in batch])
        return await super().change(batch)

    async def members(self, key: str, limit: int) -> tuple[int, list[str]]:
        self._check()
        return await super().members(key, limit)

    async def lookup(self, key: str, user_ids: list[str]) -> Lookup:
        self._check()
        return await super().lookup(key, user_ids)

    async def claim(self, key: str, seconds: float) -> bool:
        self._check()
        return await super().claim(key, seconds)


class FakeBroker:
    """What was published: (hub key, event, when on the fake clock); one call per ``publish_many``."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[tuple[str, dict[str, Any], float]] = []
        self.fail: Exception | None = None

    async def publish_many(self, items: list[tuple[str, str]]) -> None:
        if self.fail is not None:
            raise self.fail
        for channel, message in items:
            self.sent.append((channel.removeprefix(env.PREFIX), env.decode(message).event, self.clock.now))

    def events(self) -> list[dict[str, Any]]:
        return [event for _, event, _ in self.sent]

    def take(self) -> list[dict[str, Any]]:
        """The events published since the last ``take``."""
        out = self.events()
        self.sent.clear()
        return out


class FakeDb:
    """``users.nickname``/``avatar`` and ``showOnlineStatus``, with the ids each was asked for."""

    def __init__(self) -> None:
        self.hidden: set[str] = set()
        self.asked_profiles: list[str] = []

    async def hidden_status(self, user_ids: list[str]) -> set[str]:
        return self.hidden & set(user_ids)

    async def profiles(self, user_ids: list[str]) -> dict[str, tuple[str | None, str | None]]:
        self.asked_profiles.extend(user_ids)
        return {u: (f"nick-{u}", f"/{u}.png") for u in user_ids if u != "ghost"}


@dataclass
class World:
    presence: ChannelPresence
    clock: FakeClock
    store: RecordingStore
    broker: FakeBroker
    db: FakeDb

    def come(self, user: str, key: str = KEY) -> None:
        self.presence.on_member(key, user, True)

    def go(self, user: str, key: str = KEY) -> None:
        self.presence.on_member(key, user, False)

    async def run(self, seconds: float = 0.0) -> None:
        """Let what was marked be written now, move the clock on, then let the writer and every
        announcement finish (and what they arm at "now", such as a count, run too)."""
        await self.presence.drained()
        self.clock.advance(seconds)
        while True:
            await self.presence.drained()
            if not self.clock.due():
                return
            self.clock.advance(0)


@pytest.fixture
async def world(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    clock = FakeClock()
    monkeypatch.setattr(presence_store, "time", clock)
    store, broker, db = RecordingStore(grace=GRACE), FakeBroker(clock), FakeDb()
    presence = ChannelPresence(
        store,
        broker,  # type: ignore[arg-type]
        db,  # type: ignore[arg-type]
        Stats(),
        grace=GRACE,
        ttl=60.0,
        list_limit=LIMIT,
        count_interval=INTERVAL,
        clock=clock,
    )
    presence.start()
    try:
        yield World(presence, clock, store, broker, db)
    finally:
        await presence.stop()


def join(user: str, key: str = KEY) -> dict[str, Any]:
    return presence_join(key, {"userId": user, "nickname": f"nick-{user}", "avatar": f"/{user}.png"})


def leave(user: str, key: str = KEY) -> dict[str, Any]:
    return presence_leave(key, user)


def count(n: int, key: str = KEY) -> dict[str, Any]:
    return presence_count(key, n)


# -- the refcount and the writer ---------------------------------------------------------------------------


async def test_two_connections_of_one_user_are_one_write_and_one_join(world: World) -> None:
    world.come("a")
    world.come("a")
    await world.run()
    assert world.store.writes == [[(KEY, ["a"], [])]]
    assert world.broker.sent == [(topic_key(KEY), join("a"), 1000.0)], "on the key's presence topic"
    assert world.presence.local == {KEY: {"a": 2}}
    world.go("a")  # one tab of two closed: nothing changes anywhere
    await world.run(GRACE * 2)
    assert len(world.store.writes) == 1 and world.broker.take() == [join("a")]
    world.go("a")
    await world.run()
    assert world.store.writes[1:] == [[(KEY, [], ["a"])]]
    await world.run(GRACE)
    assert world.broker.take() == [leave("a")]
    assert world.presence.local == {} and world.presence.written == {}
    assert world.presence.stats.presence_published == 2


async def test_in_and_out_before_the_writer_runs_is_no_write(world: World) -> None:
    world.come("a")
    world.go("a")
    await world.run(GRACE * 2)
    assert world.store.writes == [] and world.broker.sent == []
    # And the other way round: present, then a reload faster than the writer.
    world.come("b")
    await world.run()
    assert world.store.writes == [[(KEY, ["b"], [])]] and world.broker.take() == [join("b")]
    world.go("b")
    world.come("b")
    await world.run(GRACE * 2)
    assert len(world.store.writes) == 1 and world.broker.sent == []


async def test_channels_without_presence_are_ignored(world: World) -> None:
    for key in ("feed_a", "notifications_a", "status_a"):
        world.come("a", key)
    await world.run()
    assert world.presence.local == {} and world.store.writes == [] and world.broker.sent == []
    for key in ("post_p1", "conversation_7"):
        world.come("a", key)
    await world.run()
    topics = sorted(topic for topic, _, _ in world.broker.sent)
    assert topics == ["presence:conversation_7", "presence:post_p1"]


async def test_a_storm_of_changes_is_one_write(world: World) -> None:
    for user in ("a", "b", "c"):
        world.come(user)
    world.come("a", "post_p1")
    await world.run()
    assert world.store.writes == [[(KEY, ["a", "b", "c"], []), ("post_p1", ["a"], [])]]
    assert world.broker.take() == [join("a"), join("b"), join("c"), join("a", "post_p1")]
    assert world.db.asked_profiles == ["a", "b", "c"], "each user's profile asked once"


async def test_a_user_without_a_profile_is_named_by_id_only(world: World) -> None:
    world.come("ghost")
    await world.run()
    assert world.broker.take() == [presence_join(KEY, {"userId": "ghost", "nickname": None, "avatar": None})]


# -- leaves and the grace ----------------------------------------------------------------------------------


async def test_the_leave_waits_the_grace(world: World) -> None:
    world.come("a")
    await world.run()
    world.broker.take()
    world.go("a")
    await world.run()
    assert world.store.writes[-1] == [(KEY, [], ["a"])], "the leave is written at once"
    left_at = world.clock.now
    await world.run(GRACE - 0.1)
    assert world.broker.sent == [], "announced within the grace"
    await world.run(0.1)
    assert world.broker.sent == [(topic_key(KEY), leave("a"), left_at + GRACE)]
    assert not world.presence.pending and world.clock.pending() == 0, "nothing lingers once announced"


async def test_a_reload_within_the_grace_sends_nothing_at_all(world: World) -> None:
    world.come("a")
    await world.run()
    world.broker.take()
    world.go("a")
    await world.run(1.0)
    world.come("a")  # the reloaded page's new connection
    await world.run()
    assert world.store.writes[-2:] == [[(KEY, [], ["a"])], [(KEY, ["a"], [])]], "both were written"
    await world.run(GRACE * 2)
    assert world.broker.sent == [], "a reload is no join and no leave"
    assert (await world.store.members(KEY, 10)) == (1, ["a"])
    # The same user leaving for good is announced: the silence above was the reload's.
    world.go("a")
    await world.run(GRACE)
    assert world.broker.take() == [leave("a")]


async def test_back_after_the_grace_is_a_leave_then_a_join(world: World) -> None:
    world.come("a")
    await world.run()
    world.broker.take()
    world.go("a")
    await world.run(GRACE + 1.0)
    world.come("a")
    await world.run()
    assert world.broker.take() == [leave("a"), join("a")]


async def test_a_second_leave_within_the_grace_has_its_own_wait(world: World) -> None:
    world.come("a")
    await world.run()
    world.broker.take()
    world.go("a")
    await world.run(2.0)
    world.come("a")
    await world.run(1.0)
    world.go("a")  # left again at 1003, one second after coming back
    await world.run()
    assert len(world.presence.pending) == 1, "one wait per (key, user)"
    await world.run(GRACE - 3.0)  # the first leave's deadline (1005) passes
    assert world.broker.sent == []
    await world.run(3.0)  # the second's (1008)
    assert world.broker.sent == [(topic_key(KEY), leave("a"), 1008.0)]


async def test_a_hidden_user_is_counted_but_never_named(world: World) -> None:
    world.db.hidden.add("h")
    world.come("a")
    world.come("h")
    await world.run()
    assert world.broker.take() == [join("a")]
    assert "h" not in world.db.asked_profiles
    answer = orjson.loads(await world.presence.query(KEY, CHANNEL))["data"]
    assert answer["count"] == 2 and [u["userId"] for u in answer["users"]] == ["a"]
    world.go("h")
    world.go("a")
    await world.run(GRACE)
    assert world.broker.take() == [leave("a")], "the hidden user's leave is not sent, the other's is"


# -- above the list limit -------------------------------------------------------------------------------


async def crowd(world: World, users: list[str]) -> None:
    for user in users:
        world.come(user)
    await world.run()


async def test_a_crowd_arriving_at_once_is_one_count(world: World) -> None:
    await crowd(world, ["a", "b", "c", "d", "e"])
    assert world.broker.take() == [count(5)], "no join of a batch that ends above the limit"


async def test_above_the_limit_a_count_instead_of_joins_at_most_every_interval(world: World) -> None:
    await crowd(world, ["a", "b", "c"])
    assert world.broker.take() == [join("a"), join("b"), join("c")]
    started = world.clock.now
    await crowd(world, ["d"])  # 4 > 3
    assert world.broker.sent == [(topic_key(KEY), count(4), started)], "a count, not a join"
    world.broker.take()
    await world.run(1.0)
    await crowd(world, ["e"])
    await world.run(1.0)
    await crowd(world, ["f"])
    await world.run(INTERVAL - 2.5)
    assert world.broker.sent == [], "a count within the interval of the last one"
    await world.run(INTERVAL)
    assert world.broker.events() == [count(6)], "the last change is counted, once"
    assert world.broker.sent[0][2] - started >= INTERVAL
    await world.run(INTERVAL * 3)
    assert len(world.broker.sent) == 1 and world.clock.pending() == 0, "nothing more is owed"
    assert not world.presence.counts_due


async def test_dropping_back_under_the_limit_owes_one_count(world: World) -> None:
    await crowd(world, ["a", "b", "c"])
    await crowd(world, ["d", "e"])
    assert world.broker.take() == [join("a"), join("b"), join("c"), count(5)]
    await world.run(INTERVAL)
    for user in ("c", "d", "e"):
        world.go(user)
    await world.run(GRACE - 0.1)
    assert world.broker.sent == [], "the count waits the grace, as the leaves do"
    await world.run(0.1)
    assert world.broker.take() == [count(2)], "one count, no leaves"
    await world.run(INTERVAL * 2)
    assert world.broker.sent == []
    # Under the limit again: joins and leaves by name.
    world.go("b")
    await crowd(world, ["f"])
    await world.run(GRACE)
    assert world.broker.take() == [join("f"), leave("b")]


async def test_a_join_that_finds_the_channel_back_under_the_limit_owes_a_count(world: World) -> None:
    await crowd(world, ["a", "b", "c"])
    await crowd(world, ["d", "e"])
    world.broker.take()
    await world.run(INTERVAL)
    for user in ("c", "d", "e"):
        world.go(user)
    await world.run(1.0)
    await crowd(world, ["f"])  # 2 -> 3 while the three leaves wait out their grace
    assert world.broker.take() == [join("f"), count(3)]
    await world.run(GRACE)
    # Their arrivals were counted, not named (the channel was above the limit then): so are their
    # leaves, once the claim of f's count allows another.
    assert world.broker.take() == []
    await world.run(INTERVAL)
    assert world.broker.take() == [count(3)], "the last change is counted, an interval after the last"


async def test_leaves_above_the_limit_are_counted(world: World) -> None:
    await crowd(world, ["a", "b", "c", "d", "e"])
    world.broker.take()
    await world.run(INTERVAL)
    world.go("e")
    await world.run(GRACE)
    assert world.broker.take() == [count(4)], "5 -> 4 is still above the limit: a count, no leave"


async def test_a_reload_above_the_limit_moves_no_count(world: World) -> None:
    await crowd(world, ["a", "b", "c", "d", "e"])
    world.broker.take()
    await world.run(INTERVAL)
    world.go("e")
    await world.run(1.0)
    world.come("e")
    await world.run(INTERVAL * 2)
    assert world.broker.sent == []


# -- the query ------------------------------------------------------------------------------------------


async def test_the_query_lists_shown_users_up_to_the_limit_and_says_truncated(world: World) -> None:
    world.db.hidden.add("a")  # sorts first: listed if the hidden were not left out
    for user in ("a", "b", "b", "c", "d", "e"):  # b with two tabs
        world.come(user)
    # No settling first: the query itself waits for the writes marked before it.
    answer = orjson.loads(await world.presence.query(KEY, CHANNEL))
    assert answer == {
        "type": "presence",
        "data": {
            "channel": CHANNEL,
            "channelKey": KEY,
            "count": 5,
            "users": [{"userId": u, "nickname": f"nick-{u}", "avatar": f"/{u}.png"} for u in ("b", "c", "d")],
            "truncated": True,
        },
    }


async def test_the_query_under_the_limit_is_not_truncated(world: World) -> None:
    world.db.hidden.add("h")
    for user in ("b", "b", "c", "h"):
        world.come(user)
    data = orjson.loads(await world.presence.query(KEY, CHANNEL))["data"]
    assert data["count"] == 3 and [u["userId"] for u in data["users"]] == ["b", "c"]
    assert data["truncated"] is False
    empty = orjson.loads(await world.presence.query("post_none", {"type": "post", "postId": "none"}))["data"]
    assert (empty["count"], empty["users"], empty["truncated"]) == (0, [], False)


async def test_the_query_raises_when_the_store_cannot_answer(world: World) -> None:
    world.store.failing = True
    with pytest.raises(ConnectionError):
        await world.presence.query(KEY, CHANNEL)


# -- settled() and failures -----------------------------------------------------------------------------


async def test_settled_returns_after_the_writer_wrote(world: World) -> None:
    await asyncio.wait_for(world.presence.settled(), 1.0)  # nothing marked: at once
    gate = world.store.gate = asyncio.Event()
    world.come("a")
    waiting = asyncio.ensure_future(world.presence.settled())
    for _ in range(10):
        await asyncio.sleep(0)
    assert not waiting.done(), "settled before the write returned"
    assert world.store.writes == []
    gate.set()
    await asyncio.wait_for(waiting, 1.0)
    assert world.store.writes == [[(KEY, ["a"], [])]]
    assert world.broker.events() == [join("a")], "the join is out by then too"


async def test_a_failing_store_is_counted_logged_and_the_writer_goes_on(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.store.failing = True
    with caplog.at_level(logging.WARNING, logger="fonana_ws.presence"):
        world.come("a")
        await world.run()
    assert world.presence.stats.presence_failures == 1 and world.broker.sent == []
    logged = [r.getMessage() for r in caplog.records if r.name == "fonana_ws.presence"]
    assert any("presence not written" in m and "down" in m for m in logged), logged
    world.store.failing = False
    world.come("b")
    await world.run()
    assert world.broker.take() == [join("b")], "the writer outlived the failure"
    assert not world.presence._loops[0].done()
    # A failing lookup at a leave's deadline: counted, and that leave is not sent.
    world.go("b")
    await world.run()
    world.store.failing = True
    await world.run(GRACE)
    assert world.presence.stats.presence_failures == 2 and world.broker.sent == []
    world.store.failing = False
    world.come("c")
    await world.run()
    assert world.broker.take() == [join("c")]


async def test_a_failing_broker_is_counted_and_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.broker.fail = ConnectionError("broker down")
    with caplog.at_level(logging.WARNING, logger="fonana_ws.presence"):
        world.come("a")
        await world.run()
    assert world.presence.stats.presence_failures == 1 and world.presence.stats.presence_published == 0
    assert any("not published" in r.getMessage() for r in caplog.records)
    world.broker.fail = None
    world.come("b")
    await world.run()
    assert world.broker.take() == [join("b")] and world.presence.stats.presence_published == 1


async def test_closing_ignores_the_hub(world: World) -> None:
    world.presence.closing = True
    world.come("a")
    await world.run()
    assert world.presence.local == {} and world.store.writes == []


# -- two processes on one store ---------------------------------------------------------------------------


@pytest.fixture
async def pair(world: World) -> AsyncIterator[tuple[World, World]]:
    """A second process on the same store, broker and clock (the memory store standing in for a shared
    backend: the claim and the present sets are one)."""
    other = ChannelPresence(
        world.store,
        world.broker,  # type: ignore[arg-type]
        world.db,  # type: ignore[arg-type]
        Stats(),
        grace=GRACE,
        ttl=60.0,
        list_limit=LIMIT,
        count_interval=INTERVAL,
        clock=world.clock,
    )
    other.start()
    try:
        yield world, World(other, world.clock, world.store, world.broker, world.db)
    finally:
        await other.stop()


async def test_the_count_claim_is_shared_by_processes(pair: tuple[World, World]) -> None:
    one, two = pair
    await crowd(one, ["a", "b", "c"])
    await crowd(two, ["d"])
    started = one.clock.now
    assert one.broker.take()[-1] == count(4)
    await crowd(one, ["e"])  # the other process counted just now: this one waits its turn
    await one.run(INTERVAL - 1.0)
    await two.run()
    assert one.broker.sent == []
    await one.run(INTERVAL)
    assert one.broker.events() == [count(5)] and one.broker.sent[0][2] - started >= INTERVAL


async def test_dropping_under_the_limit_on_another_process_owes_a_count(pair: tuple[World, World]) -> None:
    one, two = pair
    await crowd(two, ["a", "b", "c"])  # joins, sent by process two
    await crowd(one, ["d"])  # 4 > 3: process one sends the count
    assert one.broker.take() == [join("a"), join("b"), join("c"), count(4)]
    await one.run(INTERVAL)
    two.go("c")  # 4 -> 3, on the process that never saw the key above the limit
    await two.run(GRACE)
    await one.run()
    # In one process this is a single presence_count of 3 (test_dropping_back_under_the_limit_owes_one_count).
    assert one.broker.take() == [count(3)]
