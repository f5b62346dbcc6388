"""``db.user_lookup``: concurrent "does this user exist?" questions share queries, and lose nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from fonana_ws.db.user_lookup import UserLookup

pytestmark = pytest.mark.unit


class FakeUsers:
    """A table of users whose queries the test releases one at a time."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def fetch(self, user_ids: Sequence[str]) -> set[str]:
        self.batches.append(list(user_ids))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.known & set(user_ids)


async def test_questions_of_one_loop_turn_share_one_query() -> None:
    users = FakeUsers({"a", "c"})
    lookup = UserLookup(users.fetch)
    answers = await asyncio.gather(*(lookup.exists(u) for u in ["a", "b", "c", "a"]))
    assert answers == [True, False, True, True]
    assert users.batches == [["a", "b", "c"]]  # "a" asked twice, queried once
    assert (lookup.queries, lookup.asked) == (1, 3)


async def test_questions_asked_while_queries_are_in_flight_wait_for_the_next_one() -> None:
    users = FakeUsers({f"u{i}" for i in range(0, 100, 2)})
    users.gate.clear()
    lookup = UserLookup(users.fetch, concurrency=1)
    first = asyncio.ensure_future(lookup.exists("u0"))
    await asyncio.sleep(0.01)
    assert users.batches == [["u0"]]
    rest = [asyncio.ensure_future(lookup.exists(f"u{i}")) for i in range(1, 100)]
    await asyncio.sleep(0.01)
    assert len(users.batches) == 1  # the only slot is busy: the 99 wait together
    users.gate.set()
    assert await first is True
    answers = await asyncio.gather(*rest)
    assert answers == [i % 2 == 0 for i in range(1, 100)]
    assert [len(b) for b in users.batches] == [1, 99]


async def test_a_batch_is_capped_and_the_rest_follows() -> None:
    users = FakeUsers(set())
    lookup = UserLookup(users.fetch, concurrency=2, max_batch=40)
    answers = await asyncio.gather(*(lookup.exists(f"u{i}") for i in range(100)))
    assert answers == [False] * 100
    assert sorted(len(b) for b in users.batches) == [20, 40, 40]


async def test_a_failure_reaches_every_waiter_of_its_batch_and_the_next_batch_retries() -> None:
    users = FakeUsers({"a"})
    users.fail = ConnectionError("database gone")
    lookup = UserLookup(users.fetch)
    results = await asyncio.gather(lookup.exists("a"), lookup.exists("b"), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    users.fail = None
    assert await lookup.exists("a") is True  # nothing of the failure is remembered


async def test_one_waiter_cancelled_does_not_cancel_the_answer_for_the_others() -> None:
    users = FakeUsers({"a"})
    users.gate.clear()
    lookup = UserLookup(users.fetch)
    gone = asyncio.ensure_future(lookup.exists("a"))
    stays = asyncio.ensure_future(lookup.exists("a"))
    await asyncio.sleep(0.01)
    gone.cancel()
    users.gate.set()
    assert await stays is True
    with pytest.raises(asyncio.CancelledError):
        await gone
