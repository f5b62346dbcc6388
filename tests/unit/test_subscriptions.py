"""The subscription registry against a fake broker: counts, one broker subscription per topic, order."""

from __future__ import annotations

import asyncio
import random

import pytest

from fonana_ws.fanout.subscriptions import Subscriptions
from fonana_ws.stats import Stats

pytestmark = pytest.mark.unit


class FakeBroker:
    """Records each (un)subscribe; ``gated`` ones wait for ``open()``; ``fail`` makes subscribes raise.

    It also notes what a real broker must never see (``overlaps``): two operations on one topic at once.
    """

    def __init__(self, *, gated: bool = False, yields: random.Random | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.yields = yields
        self.fail: Exception | None = None
        self.busy: set[str] = set()
        self.overlaps: list[tuple[str, str]] = []
        self.live: set[str] = set()  # what the broker would deliver

    def open(self) -> None:
        self.gate.set()

    async def subscribe(self, topic: str) -> None:
        await self._op("subscribe", topic)

    async def unsubscribe(self, topic: str) -> None:
        await self._op("unsubscribe", topic)

    async def _op(self, kind: str, topic: str) -> None:
        if topic in self.busy:
            self.overlaps.append((kind, topic))
        self.busy.add(topic)
        try:
            self.calls.append((kind, topic))
            await self.gate.wait()
            for _ in range(self.yields.randrange(4) if self.yields else 0):
                await asyncio.sleep(0)
            if kind == "subscribe":
                if self.fail is not None:
                    raise self.fail
                self.live.add(topic)
            else:
                self.live.discard(topic)
        finally:
            self.busy.discard(topic)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_one_broker_subscription_whatever_the_number_of_local_subscribers() -> None:
    broker, stats = FakeBroker(), Stats()
    subs = Subscriptions(broker, stats)
    await asyncio.gather(*(subs.acquire("t") for _ in range(100)))
    assert broker.calls == [("subscribe", "t")]
    assert subs.count("t") == 100 and "t" in subs and len(subs) == 1 and stats.broker_subscriptions == 1
    for _ in range(99):
        subs.release("t")
    await settle()
    assert broker.calls == [("subscribe", "t")] and "t" in subs
    subs.release("t")
    await settle()
    assert broker.calls == [("subscribe", "t"), ("unsubscribe", "t")]
    assert subs.count("t") == 0 and "t" not in subs and stats.broker_subscriptions == 0


async def test_topics_are_independent() -> None:
    broker = FakeBroker()
    subs = Subscriptions(broker, Stats())
    await subs.acquire("a")
    await subs.acquire("b")
    await subs.acquire("b")
    subs.release("b")
    subs.release("a")
    await settle()
    assert broker.calls == [("subscribe", "a"), ("subscribe", "b"), ("unsubscribe", "a")]
    assert broker.live == {"b"}


async def test_acquire_returns_once_the_broker_subscribed() -> None:
    broker = FakeBroker(gated=True)
    subs = Subscriptions(broker, Stats())
    first = asyncio.ensure_future(subs.acquire("t"))
    second = asyncio.ensure_future(subs.acquire("t"))
    await settle()
    assert not first.done() and not second.done() and broker.calls == [("subscribe", "t")]
    broker.open()
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert broker.live == {"t"} and broker.calls == [("subscribe", "t")]


async def test_leave_and_rejoin_while_the_broker_is_busy_reach_it_in_order() -> None:
    broker = FakeBroker(gated=True)
    subs = Subscriptions(broker, Stats())
    first = asyncio.ensure_future(subs.acquire("t"))
    await settle()
    subs.release("t")  # its socket went away before the subscribe finished
    second = asyncio.ensure_future(subs.acquire("t"))
    await settle()
    subs.release("t")
    third = asyncio.ensure_future(subs.acquire("t"))
    await settle()
    assert broker.calls == [("subscribe", "t")]  # the rest waits for the first
    broker.open()
    await asyncio.wait_for(asyncio.gather(first, second, third), 1)
    await settle()
    assert [kind for kind, _ in broker.calls] == [
        "subscribe",
        "unsubscribe",
        "subscribe",
        "unsubscribe",
        "subscribe",
    ]
    assert broker.live == {"t"} and subs.count("t") == 1 and "t" in subs
    assert broker.overlaps == []


async def test_any_interleaving_ends_with_the_broker_matching_the_counts() -> None:
    rng = random.Random(20240610)
    broker = FakeBroker(yields=rng)
    subs = Subscriptions(broker, Stats())
    topics = ["a", "b", "c"]
    held: list[str] = []
    tasks: list[asyncio.Future[None]] = []
    for _ in range(400):
        if held and rng.random() < 0.5:
            subs.release(held.pop(rng.randrange(len(held))))
        else:
            topic = rng.choice(topics)
            held.append(topic)
            tasks.append(asyncio.ensure_future(subs.acquire(topic)))
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    await settle()
    for topic in topics:
        assert subs.count(topic) == held.count(topic)
        assert (topic in broker.live) == (topic in held) == (topic in subs), topic
    assert len([c for c in broker.calls if c[0] == "subscribe"]) > 3  # the topics did come and go
    assert broker.overlaps == []


async def test_a_cancelled_waiter_does_not_cancel_the_subscribe_for_the_others() -> None:
    broker = FakeBroker(gated=True)
    subs = Subscriptions(broker, Stats())
    leaving = asyncio.ensure_future(subs.acquire("t"))
    staying = asyncio.ensure_future(subs.acquire("t"))
    await settle()
    leaving.cancel()
    await settle()
    subs.release("t")  # the cancelled one's count
    broker.open()
    await asyncio.wait_for(staying, 1)
    assert broker.live == {"t"} and subs.count("t") == 1


async def test_a_failed_subscribe_raises_for_its_waiters_and_the_next_acquire_tries_again() -> None:
    broker, stats = FakeBroker(gated=True), Stats()
    subs = Subscriptions(broker, stats)
    broker.fail = RuntimeError("refused")
    waiters = [asyncio.ensure_future(subs.acquire("t")) for _ in range(2)]
    await settle()
    broker.open()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    assert "t" not in subs and stats.broker_subscriptions == 0
    assert subs.count("t") == 2  # until the waiters release, as they must
    broker.fail = None
    await subs.acquire("t")
    assert broker.calls == [("subscribe", "t"), ("subscribe", "t")] and "t" in subs
    subs.release("t")
    subs.release("t")
    await settle()
    assert "t" in subs  # the third acquire still holds it
    subs.release("t")
    await settle()
    assert broker.calls[-1] == ("unsubscribe", "t") and "t" not in subs


async def test_releasing_after_a_failed_subscribe_sends_nothing() -> None:
    broker = FakeBroker()
    broker.fail = RuntimeError("refused")
    subs = Subscriptions(broker, Stats())
    with pytest.raises(RuntimeError):
        await subs.acquire("t")
    subs.release("t")
    await settle()
    assert broker.calls == [("subscribe", "t")] and subs.count("t") == 0


def test_release_without_acquire_is_an_error() -> None:
    subs = Subscriptions(FakeBroker(), Stats())
    with pytest.raises(ValueError, match="'t' without an acquire"):
        subs.release("t")


async def test_close_unsubscribes_everything_and_late_releases_send_nothing() -> None:
    broker, stats = FakeBroker(), Stats()
    subs = Subscriptions(broker, stats)
    for topic in ("a", "b", "b"):
        await subs.acquire(topic)
    await subs.close()
    assert sorted(c for c in broker.calls if c[0] == "unsubscribe") == [
        ("unsubscribe", "a"),
        ("unsubscribe", "b"),
    ]
    assert broker.live == set() and len(subs) == 0 and stats.broker_subscriptions == 0
    calls = list(broker.calls)
    for topic in ("a", "b", "b"):  # the connections removed after shutdown began
        subs.release(topic)
    await settle()
    assert broker.calls == calls and subs.count("b") == 0
