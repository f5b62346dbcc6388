"""Online status (protocol §7.3) without sockets: the grace timer on a fake clock, the frames, the rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fonana_ws.fonana.status import OnlineStatus, status_of
from fonana_ws.fonana.user_connections import Lookup, MemoryUserConnections
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol.channels import channel_key
from fonana_ws.protocol.frames import user_status
from fonana_ws.protocol.session import Join, Reply, SendStatus, Session
from fonana_ws.stats import Stats
from fonana_ws.web.presence_api import MAX_IDS, parse_ids

pytestmark = pytest.mark.unit

GRACE = 5.0


class FakeClock:
    """Loop time that moves only when told; ``call_at`` callbacks run as it passes them."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.calls: list[tuple[float, Callable[[], object], FakeHandle]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> FakeHandle:
        handle = FakeHandle()
        self.calls.append((when, callback, handle))
        return handle

    def pending(self) -> int:
        return sum(not h.cancelled for _, _, h in self.calls)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while True:
            due = [c for c in self.calls if c[0] <= self.now and not c[2].cancelled]
            if not due:
                return
            for call in due:
                self.calls.remove(call)
                call[1]()


class FakeHandle:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeCounts:
    """The backend: each user's live connections and lastSeen, on the fake clock's time."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.users: dict[str, tuple[int, float | None]] = {}
        self.lookups = 0

    async def lookup(self, user_ids: list[str]) -> Lookup:
        self.lookups += 1
        return self.clock.now, {u: self.users.get(u, (0, None)) for u in user_ids}


class FakePublisher:
    """The broker: what was published, as (event, [channel key]); one call per ``publish_many``."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], list[str]]] = []
        self.calls = 0

    async def publish_many(self, items: list[tuple[str, str]]) -> None:
        self.calls += 1
        for channel, message in items:
            self.sent.append((env.decode(message).event, [channel.removeprefix(env.PREFIX)]))


class FakeStore:
    def __init__(self) -> None:
        self.hidden: set[str] = set()

    async def hidden_status(self, user_ids: list[str]) -> set[str]:
        return self.hidden & set(user_ids)


@pytest.fixture
def parts() -> tuple[OnlineStatus, FakeClock, FakeCounts, FakePublisher, FakeStore]:
    clock = FakeClock()
    counts, publisher, store = FakeCounts(clock), FakePublisher(), FakeStore()
    status = OnlineStatus(counts, publisher, store, Stats(), grace=GRACE, clock=clock)  # type: ignore[arg-type]
    return status, clock, counts, publisher, store


def offline(user: str, seen: float) -> tuple[dict[str, Any], list[str]]:
    return user_status(user, False, seen), [f"status_{user}"]


async def test_offline_is_announced_once_after_the_grace_with_last_seen(parts: Any) -> None:
    status, clock, counts, publisher, _ = parts
    counts.users["b"] = (0, clock.now)
    status.went_offline(["b"])
    clock.advance(GRACE - 0.1)
    await status.drained()
    assert publisher.sent == [], "announced within the grace"
    clock.advance(0.1)
    await status.drained()
    assert publisher.sent == [offline("b", 1000.0)]
    assert status.stats.status_published == 1
    assert not status.pending and clock.pending() == 0, "nothing lingers once announced"


async def test_a_reload_within_the_grace_sends_nothing(parts: Any) -> None:
    status, clock, counts, publisher, _ = parts
    counts.users["b"] = (0, clock.now)
    status.went_offline(["b"])
    clock.advance(1.0)
    counts.users["b"] = (1, 1000.0)  # back, on whatever process
    clock.advance(GRACE)
    await status.drained()
    assert publisher.sent == [] and counts.lookups == 1


async def test_a_second_close_within_the_grace_restarts_it_and_is_announced_once(parts: Any) -> None:
    status, clock, counts, publisher, _ = parts
    counts.users["b"] = (0, clock.now)
    status.went_offline(["b"])
    clock.advance(2.0)
    counts.users["b"] = (0, clock.now)  # reconnected and closed again here
    status.went_offline(["b"])
    assert len(status.pending) == 1, "one entry per user, however many closes"
    clock.advance(GRACE - 2.0)
    await status.drained()
    assert publisher.sent == [], "the first close's deadline passed, the second's did not"
    clock.advance(2.0)
    await status.drained()
    assert publisher.sent == [offline("b", 1002.0)]


async def test_a_later_close_on_another_process_is_that_process_to_announce(parts: Any) -> None:
    status, clock, counts, publisher, _ = parts
    status.went_offline(["b"])
    clock.advance(3.0)
    counts.users["b"] = (0, clock.now)  # another process released b's last connection just now
    clock.advance(GRACE - 3.0)
    await status.drained()
    assert publisher.sent == [] and counts.lookups == 1


async def test_a_hidden_user_causes_no_frames_and_looks_offline_without_last_seen(parts: Any) -> None:
    status, clock, counts, publisher, store = parts
    store.hidden.add("h")
    status.came_online("h")
    counts.users["h"] = (0, clock.now)
    status.went_offline(["h"])
    clock.advance(GRACE)
    await status.drained()
    assert publisher.sent == []
    assert await status.snapshot(["h"]) == {"h": user_status("h", False, None)}


async def test_came_online_is_one_frame_and_the_snapshot_follows_the_grace(parts: Any) -> None:
    status, clock, counts, publisher, _ = parts
    status.came_online("b")
    await status.drained()
    assert publisher.sent == [(user_status("b", True, None), ["status_b"])]
    counts.users["b"] = (0, clock.now)
    clock.now += GRACE / 2
    assert await status.snapshot(["b"]) == {"b": user_status("b", True, None)}, "online within the grace"
    clock.now += GRACE / 2
    assert await status.snapshot(["b"]) == {"b": user_status("b", False, 1000.0)}
    assert await status.snapshot(["never"]) == {"never": user_status("never", False, None)}


async def test_many_users_waiting_share_one_timer(parts: Any) -> None:
    status, clock, counts, publisher, _ = parts
    for i in range(1000):
        counts.users[f"u{i}"] = (0, clock.now)
        status.went_offline([f"u{i}"])
        clock.now += 0.001
    assert clock.pending() == 1, "one call_at for all"
    clock.advance(GRACE)
    await status.drained()
    assert len(publisher.sent) == 1000 and clock.pending() == 0
    assert counts.lookups == 1 and publisher.calls == 1, "users due together: one lookup, one publish"


async def test_stop_leaves_no_timer(parts: Any) -> None:
    status, clock, _, _, _ = parts
    status.went_offline(["b"])
    await status.stop()
    assert clock.pending() == 0 and not status.pending


def test_status_of_rules() -> None:
    lookup: Lookup = (100.0, {"on": (1, 50.0), "gone": (0, 90.0), "grace": (0, 97.0)})
    assert status_of("on", lookup, set(), 5.0) == (True, None)
    assert status_of("grace", lookup, set(), 5.0) == (True, None)
    assert status_of("gone", lookup, set(), 5.0) == (False, 90.0)
    assert status_of("on", lookup, {"on"}, 5.0) == (False, None)
    assert status_of("absent", lookup, set(), 5.0) == (False, None)


def test_user_status_frame() -> None:
    assert user_status("u1", True, None) == {
        "type": "user_status",
        "userId": "u1",
        "online": True,
        "lastSeen": None,
    }
    # 2026-01-02T03:04:05.678Z, as Date.toISOString() prints it
    assert user_status("u1", False, 1767323045.678)["lastSeen"] == "2026-01-02T03:04:05.678Z"


def test_the_status_channel_key_and_the_snapshot_after_subscribed() -> None:
    assert channel_key({"type": "status", "userId": "b_1"}) == "status_b_1"
    session = Session("a", 10)
    session.receive('{"type":"subscribe","channel":{"type":"status","userId":"b_1"}}')
    assert session.access_decided("status_b_1", True) == [Join("status_b_1")]
    actions = session.joined("status_b_1", True)
    assert len(actions) == 2 and isinstance(actions[0], Reply) and '"subscribed"' in actions[0].text
    assert actions[1] == SendStatus("b_1")


async def test_memory_backend_says_when_a_user_comes_online_and_goes() -> None:
    uc = MemoryUserConnections(32, grace=60.0)
    assert await uc.admit("b", "1") == (True, True)
    assert await uc.admit("b", "2") == (True, False), "a second tab is no change"
    assert not await uc.release("b", "1")
    assert await uc.release("b", "2"), "the last one went"
    assert not await uc.release("b", "2"), "released once only"
    assert await uc.admit("b", "3") == (True, False), "back within the grace: no change"
    _, found = await uc.lookup(["b", "x"])
    assert found["b"][0] == 1 and found["b"][1] is not None and found["x"] == (0, None)
    quick = MemoryUserConnections(32, grace=0.0)
    await quick.admit("b", "1")
    await quick.release("b", "1")
    assert await quick.admit("b", "1") == (True, True), "after the grace: online again"


def test_presence_ids_parameter() -> None:
    assert parse_ids("u1,u2,u1") == ["u1", "u2"]  # in order, without repeats
    assert parse_ids("u1, u2") == ["u1", " u2"]  # as written: the OpenAPI pattern says what passes
    for bad in (None, "", "u1,,u2", "x" * 201):
        with pytest.raises(ValueError, match="ids"):
            parse_ids(bad)
    assert len(parse_ids(",".join(f"u{i}" for i in range(MAX_IDS)))) == MAX_IDS
    with pytest.raises(ValueError, match=f"at most {MAX_IDS}"):
        parse_ids(",".join(f"u{i}" for i in range(MAX_IDS + 1)))
