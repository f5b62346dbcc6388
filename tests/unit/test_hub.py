"""The hub's routing and fan-out with fake outlets: a fake broker, then the in-memory one (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from fonana_ws.broker import Broker
from fonana_ws.fanout.connection import Connection
from fonana_ws.fanout.hub import Hub
from fonana_ws.protocol import envelope as env
from fonana_ws.stats import Stats

from .test_connection import FakeOutlet, FakeSocket, next_turn

pytestmark = pytest.mark.unit


class FakeBroker:
    """Records (un)subscribes; ``deliver`` plays the broker handing a message to the listener."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.on_message: Any = None
        self.fail: Exception | None = None

    def listen(self, on_message: Any) -> None:
        self.on_message = on_message

    async def subscribe(self, topic: str) -> None:
        self.calls.append(("subscribe", topic))
        if self.fail is not None:
            raise self.fail

    async def unsubscribe(self, topic: str) -> None:
        self.calls.append(("unsubscribe", topic))

    def deliver(
        self, topic: str, event: dict[str, Any], event_id: str = "e1", *, multi: bool = False
    ) -> None:
        self.on_message(topic, env.encode(event, event_id, multi=multi))


class Client:
    """A connection with a fake outlet, and the events written to it."""

    def __init__(self, hub: Hub, user: str) -> None:
        self.outlet = FakeOutlet()
        self.conn = Connection(FakeSocket(), user, hub.outbox, limit=1 << 20, outlet=self.outlet)

    def events(self) -> list[dict[str, Any]]:
        """Every frame written so far, decoded (small unmasked text frames: a 2-byte header each)."""
        data = b"".join(self.outlet.writes)
        out = []
        while data:
            assert data[0] == 0x81 and data[1] < 126
            out.append(orjson.loads(data[2 : 2 + data[1]]))
            data = data[2 + data[1] :]
        return out


async def connected(hub: Hub, user: str, *keys: str) -> Client:
    client = Client(hub, user)
    await hub.add_connection(client.conn)
    for key in keys:
        await hub.join(client.conn, key)
    return client


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def hub(broker: FakeBroker) -> Hub:
    return Hub(broker, Stats())  # type: ignore[arg-type]


async def test_a_key_event_reaches_the_connections_that_joined_it_once(hub: Hub, broker: FakeBroker) -> None:
    a, b = await connected(hub, "ua", "post_p1"), await connected(hub, "ub", "post_p1", "creator_c1")
    c = await connected(hub, "uc", "creator_c1")
    broker.deliver(env.key_channel("post_p1"), {"type": "post_liked", "n": 1})
    await next_turn()
    assert a.events() == b.events() == [{"type": "post_liked", "n": 1}] and c.events() == []
    assert hub.stats.deliveries == 2 and hub.stats.events_received == 1


async def test_the_frame_is_built_once_for_every_recipient(hub: Hub, broker: FakeBroker) -> None:
    clients = [await connected(hub, f"u{i}", "creator_c1") for i in range(5)]
    broker.deliver(env.key_channel("creator_c1"), {"type": "creator_updated"})
    await next_turn()
    frames = [client.outlet.writes[0] for client in clients]
    assert all(frame is frames[0] for frame in frames)


async def test_a_direct_event_reaches_every_connection_of_its_user_only(hub: Hub, broker: FakeBroker) -> None:
    tabs = [await connected(hub, "me") for _ in range(3)]
    other = await connected(hub, "other")
    broker.deliver(env.user_channel("me"), {"type": "notification", "userId": "me"})
    await next_turn()
    assert [t.events() for t in tabs] == [[{"type": "notification", "userId": "me"}]] * 3
    assert other.events() == []


async def test_a_multi_target_event_arrives_once_on_every_route(hub: Hub, broker: FakeBroker) -> None:
    both = await connected(hub, "fan", "creator_c1", "feed_fan")
    one = await connected(hub, "watcher", "creator_c1")
    event = {"type": "post_created", "creatorId": "c1"}
    for topic in (env.key_channel("creator_c1"), env.key_channel("feed_fan")):
        broker.deliver(topic, event, "e1", multi=True)
    await next_turn()
    assert both.events() == [event] and one.events() == [event]
    # Without "multi" each copy is its own event.
    broker.deliver(env.key_channel("creator_c1"), event, "e2")
    broker.deliver(env.key_channel("feed_fan"), event, "e2")
    await next_turn()
    assert both.events() == [event] * 3


async def test_nothing_after_leave_or_removal_and_the_broker_is_released(
    hub: Hub, broker: FakeBroker
) -> None:
    stay = await connected(hub, "ua", "creator_c1")
    gone = await connected(hub, "ub", "creator_c1", "post_p1")
    hub.leave(gone.conn, "creator_c1")
    assert gone.conn.keys == {"post_p1"}
    broker.deliver(env.key_channel("creator_c1"), {"type": "creator_updated"})
    await hub.remove_connection(gone.conn)
    broker.deliver(env.key_channel("post_p1"), {"type": "post_liked"})
    broker.deliver(env.user_channel("ub"), {"type": "notification"})
    await next_turn()
    assert stay.events() == [{"type": "creator_updated"}] and gone.events() == []
    assert "post_p1" not in hub.by_key and "ub" not in hub.by_user and gone.conn not in hub.connections
    await asyncio.sleep(0)
    unsubscribed = sorted(topic for kind, topic in broker.calls if kind == "unsubscribe")
    assert unsubscribed == sorted([env.user_channel("ub"), env.key_channel("post_p1")])


async def test_one_broker_subscription_per_topic(hub: Hub, broker: FakeBroker) -> None:
    for i in range(10):
        await connected(hub, f"u{i % 2}", "creator_c1")
    subscribes = sorted(topic for kind, topic in broker.calls if kind == "subscribe")
    assert subscribes == sorted(
        [env.user_channel("u0"), env.user_channel("u1"), env.key_channel("creator_c1")]
    )
    assert (
        hub.subscriptions.count(env.key_channel("creator_c1")) == 10 and hub.stats.broker_subscriptions == 3
    )


async def test_joining_twice_keeps_one_membership(hub: Hub, broker: FakeBroker) -> None:
    client = await connected(hub, "ua", "creator_c1")
    await hub.join(client.conn, "creator_c1")
    assert hub.by_key["creator_c1"] == {client.conn}
    assert hub.subscriptions.count(env.key_channel("creator_c1")) == 1
    hub.leave(client.conn, "creator_c1")
    assert "creator_c1" not in hub.by_key


async def test_a_failed_join_leaves_nothing_behind(hub: Hub, broker: FakeBroker) -> None:
    client = await connected(hub, "ua")
    broker.fail = RuntimeError("broker refused")
    with pytest.raises(RuntimeError, match="broker refused"):
        await hub.join(client.conn, "creator_c1")
    assert "creator_c1" not in hub.by_key and client.conn.keys == set()
    assert hub.subscriptions.count(env.key_channel("creator_c1")) == 0
    broker.fail = None
    await hub.join(client.conn, "creator_c1")  # and a retry works
    assert hub.by_key["creator_c1"] == {client.conn}


async def test_a_failed_registration_is_undone_by_remove_connection(hub: Hub, broker: FakeBroker) -> None:
    broker.fail = RuntimeError("broker down")
    client = Client(hub, "ua")
    with pytest.raises(RuntimeError):
        await hub.add_connection(client.conn)
    await hub.remove_connection(client.conn)  # what the endpoint does then
    assert not hub.connections and not hub.by_user
    assert hub.subscriptions.count(env.user_channel("ua")) == 0


async def test_a_bad_envelope_is_counted_and_dropped(hub: Hub, broker: FakeBroker) -> None:
    client = await connected(hub, "ua", "creator_c1")
    broker.on_message(env.key_channel("creator_c1"), "not json")
    broker.on_message(env.key_channel("creator_c1"), '{"event": {"no": "type"}}')
    await next_turn()
    assert client.events() == [] and hub.stats.bad_envelopes == 2


async def test_close_cuts_every_connection_and_drops_every_subscription(hub: Hub, broker: FakeBroker) -> None:
    clients = [await connected(hub, "ua", "creator_c1"), await connected(hub, "ub")]
    await hub.close(1012, "Server shutting down")
    assert [c.outlet.cuts for c in clients] == [[(1012, "Server shutting down")]] * 2
    unsubscribed = sorted(topic for kind, topic in broker.calls if kind == "unsubscribe")
    expected = [env.user_channel("ua"), env.user_channel("ub"), env.key_channel("creator_c1")]
    assert unsubscribed == sorted(expected) and hub.stats.broker_subscriptions == 0
    for client in clients:  # the endpoints' disconnects, afterwards
        await hub.remove_connection(client.conn)
    assert not hub.connections and not hub.by_key


async def test_delivery_through_the_in_memory_broker() -> None:
    broker = Broker("memory://")
    hub = Hub(broker, Stats())
    await broker.connect()
    try:
        client = await connected(hub, "ua", "post_p1")
        await broker.publish(env.key_channel("post_p1"), env.encode({"type": "post_liked"}, "e1"))
        await broker.publish(env.key_channel("post_p2"), env.encode({"type": "post_liked"}, "e2"))
        await broker.publish(env.user_channel("ua"), env.encode({"type": "notification"}, "e3"))
        for _ in range(50):
            await asyncio.sleep(0)
            if len(client.events()) == 2:
                break
        assert client.events() == [{"type": "post_liked"}, {"type": "notification"}]
    finally:
        await hub.close(1012, "done")
        await broker.disconnect()


# -- members and side keys (channel presence) ----------------------------------------------------------


def record_members(hub: Hub) -> list[tuple[str, str, bool]]:
    calls: list[tuple[str, str, bool]] = []
    hub.on_member = lambda key, user, joined: calls.append((key, user, joined))
    return calls


async def test_on_member_is_told_each_connection_s_join_and_leave_once(hub: Hub, broker: FakeBroker) -> None:
    calls = record_members(hub)
    a = await connected(hub, "ua", "creator_c1")
    b = await connected(hub, "ua", "creator_c1", "post_p1")  # the same user's second tab
    await hub.join(a.conn, "creator_c1")  # a repeat: no second join
    assert calls == [("creator_c1", "ua", True), ("creator_c1", "ua", True), ("post_p1", "ua", True)]
    calls.clear()
    hub.leave(a.conn, "creator_c1")
    hub.leave(a.conn, "creator_c1")  # left already: nothing
    hub.leave(a.conn, "post_p1")  # never joined: nothing
    assert calls == [("creator_c1", "ua", False)]
    calls.clear()
    await hub.remove_connection(b.conn)
    assert sorted(calls) == [("creator_c1", "ua", False), ("post_p1", "ua", False)]
    calls.clear()
    await hub.remove_connection(b.conn)
    await hub.remove_connection(a.conn)
    assert calls == [], "removed twice, or holding no key: no leave"


async def test_a_failed_join_is_a_join_and_a_leave(hub: Hub, broker: FakeBroker) -> None:
    calls = record_members(hub)
    client = await connected(hub, "ua")
    broker.fail = RuntimeError("broker refused")
    with pytest.raises(RuntimeError):
        await hub.join(client.conn, "creator_c1")
    assert calls == [("creator_c1", "ua", True), ("creator_c1", "ua", False)], "the count stays balanced"


PRESENCE_SIDE = "presence:creator_c1"


async def test_a_side_key_s_messages_reach_that_connection_only(hub: Hub, broker: FakeBroker) -> None:
    calls = record_members(hub)
    watcher = await connected(hub, "ua", "creator_c1")
    member = await connected(hub, "ub", "creator_c1")
    await hub.add_side(watcher.conn, "creator_c1", PRESENCE_SIDE)
    await hub.add_side(watcher.conn, "creator_c1", PRESENCE_SIDE)  # a repeat: held once
    assert watcher.conn.keys == {"creator_c1"}, "a side key is no channel of the socket's"
    assert hub.sides == {watcher.conn: {"creator_c1": PRESENCE_SIDE}}
    assert [c for c in calls if c[2]] == [("creator_c1", "ua", True), ("creator_c1", "ub", True)], (
        "a side key is no membership"
    )
    assert broker.calls.count(("subscribe", env.key_channel(PRESENCE_SIDE))) == 1
    event = {"type": "presence_join", "data": {"channelKey": "creator_c1"}}
    broker.deliver(env.key_channel(PRESENCE_SIDE), event)
    broker.deliver(env.key_channel("creator_c1"), {"type": "creator_updated"})
    await next_turn()
    assert watcher.events() == [event, {"type": "creator_updated"}]
    assert member.events() == [{"type": "creator_updated"}]


async def test_leaving_the_key_ends_its_side(hub: Hub, broker: FakeBroker) -> None:
    watcher = await connected(hub, "ua", "creator_c1", "post_p1")
    await hub.add_side(watcher.conn, "creator_c1", PRESENCE_SIDE)
    await hub.add_side(watcher.conn, "post_p1", "presence:post_p1")
    hub.leave(watcher.conn, "creator_c1")
    assert hub.sides == {watcher.conn: {"post_p1": "presence:post_p1"}} and PRESENCE_SIDE not in hub.by_key
    broker.deliver(env.key_channel(PRESENCE_SIDE), {"type": "presence_leave"})
    broker.deliver(env.key_channel("presence:post_p1"), {"type": "presence_count"})
    await next_turn()
    assert watcher.events() == [{"type": "presence_count"}], "the other key's side goes on"
    await asyncio.sleep(0)
    assert ("unsubscribe", env.key_channel(PRESENCE_SIDE)) in broker.calls
    assert hub.subscriptions.count(env.key_channel(PRESENCE_SIDE)) == 0


async def test_end_side_stops_the_side_only(hub: Hub, broker: FakeBroker) -> None:
    watcher = await connected(hub, "ua", "creator_c1")
    await hub.add_side(watcher.conn, "creator_c1", PRESENCE_SIDE)
    hub.end_side(watcher.conn, "creator_c1")
    hub.end_side(watcher.conn, "creator_c1")  # ended already: nothing
    assert hub.sides == {} and watcher.conn.keys == {"creator_c1"}
    broker.deliver(env.key_channel(PRESENCE_SIDE), {"type": "presence_leave"})
    broker.deliver(env.key_channel("creator_c1"), {"type": "creator_updated"})
    await next_turn()
    assert watcher.events() == [{"type": "creator_updated"}]


async def test_remove_connection_ends_every_side(hub: Hub, broker: FakeBroker) -> None:
    watcher = await connected(hub, "ua", "creator_c1", "post_p1")
    other = await connected(hub, "ub", "creator_c1")
    await hub.add_side(watcher.conn, "creator_c1", PRESENCE_SIDE)
    await hub.add_side(other.conn, "creator_c1", PRESENCE_SIDE)
    await hub.add_side(watcher.conn, "post_p1", "presence:post_p1")
    await hub.remove_connection(watcher.conn)
    assert watcher.conn not in hub.sides and hub.by_key[PRESENCE_SIDE] == {other.conn}
    assert "presence:post_p1" not in hub.by_key
    assert hub.subscriptions.count(env.key_channel(PRESENCE_SIDE)) == 1, "the other watcher holds it"
    assert hub.subscriptions.count(env.key_channel("presence:post_p1")) == 0
    broker.deliver(env.key_channel(PRESENCE_SIDE), {"type": "presence_join"})
    await next_turn()
    assert watcher.events() == [] and other.events() == [{"type": "presence_join"}]


async def test_a_failed_side_leaves_nothing_behind(hub: Hub, broker: FakeBroker) -> None:
    watcher = await connected(hub, "ua", "creator_c1")
    broker.fail = RuntimeError("broker refused")
    with pytest.raises(RuntimeError, match="broker refused"):
        await hub.add_side(watcher.conn, "creator_c1", PRESENCE_SIDE)
    assert hub.sides == {} and PRESENCE_SIDE not in hub.by_key
    assert hub.subscriptions.count(env.key_channel(PRESENCE_SIDE)) == 0
    assert watcher.conn.keys == {"creator_c1"}


async def test_remove_connection_ends_a_side_whatever_its_key(hub: Hub, broker: FakeBroker) -> None:
    watcher = await connected(hub, "ua")
    await hub.add_side(watcher.conn, "creator_c1", PRESENCE_SIDE)  # its key not (or no longer) joined
    await hub.remove_connection(watcher.conn)
    assert hub.sides == {} and PRESENCE_SIDE not in hub.by_key
    assert hub.subscriptions.count(env.key_channel(PRESENCE_SIDE)) == 0
