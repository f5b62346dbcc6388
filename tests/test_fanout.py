"""Connections and fan-out: many tabs per user, one broker subscription per key, encode once,
at most once per connection, and slow consumers cut off without holding anyone else up."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from fonana_ws.fanout import hub as hub_module
from fonana_ws.protocol import envelope

from .conftest import Server, make_settings, running


async def test_every_connection_of_a_user_receives_direct_events(server: Server) -> None:
    user = await server.user()
    first, second = await server.connect(user), await server.connect(user)
    event = {"type": "notification", "userId": user, "notification": {"id": "n1"}}
    assert (await server.publish({"user": user, "event": event})).status_code == 202
    assert await first.recv() == event
    assert await second.recv() == event
    await first.close()
    await asyncio.sleep(0.05)
    event2 = {"type": "notifications_cleared", "userId": user}
    await server.publish({"user": user, "event": event2})
    assert await second.recv() == event2


async def test_other_users_do_not_receive_direct_events(server: Server) -> None:
    me, other = await server.user(), await server.user()
    mine, theirs = await server.connect(me), await server.connect(other)
    await server.publish({"user": me, "event": {"type": "notification", "userId": me}})
    assert (await mine.recv())["type"] == "notification"
    await theirs.nothing(0.3)


async def test_event_on_two_routes_arrives_once(server: Server) -> None:
    creator, fan = await server.user("c", creator=True), await server.user()
    client = await server.connect(fan)
    await client.subscribe({"type": "creator", "id": creator})
    await client.subscribe({"type": "feed", "userId": fan})
    await client.subscribe({"type": "notifications", "userId": fan})
    publisher = server.services.publisher
    await publisher.publish(
        {"type": "post_created", "creatorId": creator}, channels=[f"creator_{creator}", f"feed_{fan}"]
    )
    await publisher.publish(
        {"type": "notification", "userId": fan}, users=[fan], channels=[f"notifications_{fan}"]
    )
    assert (await client.recv())["type"] == "post_created"
    assert (await client.recv())["type"] == "notification"
    await client.nothing(0.4)


async def test_one_broker_subscription_per_key_and_released_by_the_last(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = server.services.broker
    calls: list[tuple[str, str]] = []
    for name in ("subscribe", "unsubscribe"):
        real = getattr(broker.backend, name)

        async def counted(channel: str, real=real, name=name) -> None:
            calls.append((name, channel))
            await real(channel)

        monkeypatch.setattr(broker.backend, name, counted)
    users = [await server.user() for _ in range(3)]
    clients = [await server.connect(users[i % 3]) for i in range(30)]
    key = f"creator_shared-{users[0]}"
    channel = envelope.key_channel(key)
    await asyncio.gather(*(c.subscribe({"type": "creator", "id": key.split("_", 1)[1]}) for c in clients))
    hub = server.services.hub
    assert channel in hub.subscriptions and len(hub.by_key[key]) == 30
    assert hub.subscriptions.count(channel) == 30
    assert calls.count(("subscribe", channel)) == 1
    # the users' direct channels: one each, however many tabs
    assert sorted(c for n, c in calls if n == "subscribe" and c != channel) == sorted(
        envelope.user_channel(u) for u in users
    )
    for c in clients:
        await c.close()
    for _ in range(100):
        if ("unsubscribe", channel) in calls:
            break
        await asyncio.sleep(0.02)
    assert key not in hub.by_key and channel not in hub.subscriptions
    assert hub.subscriptions.count(channel) == 0
    assert calls.count(("unsubscribe", channel)) == 1


async def test_event_is_encoded_once_for_all_recipients(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = hub_module.text_frame
    monkeypatch.setattr(hub_module, "text_frame", lambda payload: calls.append(payload) or real(payload))
    user = await server.user()
    clients = [await server.connect(user) for _ in range(20)]
    for c in clients:
        await c.subscribe({"type": "creator", "id": f"once-{user}"})
    await server.publish({"channel": f"creator_once-{user}", "event": {"type": "creator_updated", "n": 1}})
    for c in clients:
        assert await c.recv() == {"type": "creator_updated", "n": 1}
    assert len(calls) == 1


async def test_direct_write_path_is_taken(server: Server) -> None:
    client = await server.connect(await server.user())
    await client.send({"type": "ping"})
    await client.recv_type("pong")
    assert server.services.hub.connections
    assert all(conn.direct for conn in server.services.hub.connections)


async def test_asgi_path_when_permessage_deflate_is_negotiated(tmp_path) -> None:
    settings = make_settings(tmp_path, None, WS_PERMESSAGE_DEFLATE="true")
    async with running(settings) as srv:
        user = await srv.user()
        client = await srv.connect(user, compression="deflate")
        conns = list(srv.services.hub.connections)
        assert len(conns) == 1 and not conns[0].direct
        await client.subscribe({"type": "creator", "id": "x"})
        await srv.publish({"channel": "creator_x", "event": {"type": "creator_updated", "pad": "a" * 5000}})
        assert (await client.recv())["pad"] == "a" * 5000


@pytest.mark.parametrize("deflate", [False, True], ids=["direct", "asgi"])
async def test_slow_consumer_is_cut_and_others_keep_receiving(tmp_path, deflate: bool) -> None:
    settings = make_settings(tmp_path, None, WS_SEND_BUFFER="65536", WS_PERMESSAGE_DEFLATE=str(deflate))
    async with running(settings) as srv:
        slow_user, fast_user = await srv.user(), await srv.user()
        kwargs = {"compression": "deflate" if deflate else None, "max_queue": 4}
        slow = await srv.connect(slow_user, **kwargs)
        fast = await srv.connect(fast_user)
        for c in (slow, fast):
            await c.subscribe({"type": "creator", "id": "busy"})
        slow.ws.transport.pause_reading()  # a browser tab that stopped reading
        pads = [secrets.token_hex(20_000) for _ in range(8)]
        received = 0

        async def read_fast() -> None:
            nonlocal received
            while received < 200:
                await fast.recv(10)
                received += 1

        reader = asyncio.create_task(read_fast())
        for i in range(200):
            # Random payloads, so that deflate does not shrink the volume away.
            body = {
                "channel": "creator_busy",
                "event": {"type": "creator_updated", "i": i, "pad": pads[i % 8]},
            }
            assert (await srv.publish(body)).status_code == 202
        await asyncio.wait_for(reader, 20)
        assert received == 200
        for _ in range(100):
            if srv.services.stats.slow_consumer_disconnects:
                break
            await asyncio.sleep(0.05)
        assert srv.services.stats.slow_consumer_disconnects == 1
        for _ in range(100):
            if all(c.user_id != slow_user for c in srv.services.hub.connections):
                break
            await asyncio.sleep(0.05)
        assert all(c.user_id != slow_user for c in srv.services.hub.connections)


async def test_connection_that_stops_answering_pings_is_dropped(tmp_path) -> None:
    settings = make_settings(tmp_path, None, WS_PING_INTERVAL="0.5")
    async with running(settings) as srv:
        user = await srv.user()
        alive = await srv.connect(user)
        dead = await srv.connect(user)
        dead.ws.transport.pause_reading()  # a vanished peer: our pings go unanswered
        hub = srv.services.hub
        for _ in range(60):
            if len(hub.by_user.get(user, ())) == 1:
                break
            await asyncio.sleep(0.1)
        assert len(hub.by_user[user]) == 1  # the silent one is gone, the answering one stays
        await alive.send({"type": "ping"})
        assert await alive.recv() == {"type": "pong"}
