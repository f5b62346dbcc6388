"""Idle sockets without a task: the endpoint detaches from ASGI once a connection is set up.

A detached socket is a protocol object and the app's state: frames are handed to the endpoint as they
arrive and handled by a short task, one at a time and in order; the disconnect runs the same cleanup as
before; graceful shutdown waits for it. Real server, real clients.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fonana_ws.fanout.sink import FdSink
from fonana_ws.protocol import session as session_module
from fonana_ws.transport.wire import FonanaWSProtocol

from .conftest import Server, make_settings, running


def server_tasks() -> list[str]:
    """Names of the coroutines of the server's per-socket tasks in this loop (clients excluded)."""
    names = []
    for task in asyncio.all_tasks():
        name = task.get_coro().__qualname__
        if name.endswith(("run_asgi", "FonanaEndpoint.drain")):
            names.append(name)
    return names


def protocols(srv: Server) -> list[FonanaWSProtocol]:
    return [conn._outlet._protocol for conn in srv.services.hub.connections]  # type: ignore[union-attr]


async def settled(check: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


async def test_idle_connections_hold_no_task_and_still_work(tmp_path) -> None:
    async with running(make_settings(tmp_path, None)) as srv:
        user = await srv.user()
        clients = [await srv.connect(user) for _ in range(25)]
        for c in clients:
            assert (await c.subscribe({"type": "creator", "id": "idle"}))["type"] == "subscribed"
        await settled(lambda: not server_tasks())
        assert len(srv.services.hub.connections) == 25
        assert all(p.detached and p.scope is None for p in protocols(srv))
        # uvicorn sets nothing outside the slots: an idle socket has no instance dict to fill.
        assert all(not vars(p) for p in protocols(srv))
        if FdSink is not None:  # plain TCP: frames go out through the C sink on the descriptor
            assert all(type(c._sink) is FdSink for c in srv.services.hub.connections)

        await srv.publish({"channel": "creator_idle", "event": {"type": "creator_updated", "n": 1}})
        for c in clients:
            assert await c.recv() == {"type": "creator_updated", "n": 1}
        await clients[0].send({"type": "ping"})
        assert await clients[0].recv() == {"type": "pong"}

        for c in clients[:10]:
            await c.close()
        await settled(lambda: len(srv.services.hub.connections) == 15)  # on_disconnect ran for each
        await settled(lambda: not server_tasks())


async def test_frames_sent_at_once_are_answered_in_order(tmp_path) -> None:
    async with running(make_settings(tmp_path, None)) as srv:
        client = await srv.connect(await srv.user())
        await settled(lambda: not server_tasks())
        frames = []
        for i in range(10):
            frames.append({"type": "subscribe", "channel": {"type": "creator", "id": f"c{i}"}})
            frames.append({"type": "ping"})
        for frame in frames:  # no await for a reply between them: they arrive together
            await client.send(frame)
        replies = [await client.recv() for _ in frames]
        expected = []
        for i in range(10):
            expected += [("subscribed", f"creator_c{i}"), ("pong", None)]
        assert [(r["type"], (r.get("data") or {}).get("channelKey")) for r in replies] == [
            (t, k if t == "subscribed" else None) for t, k in expected
        ]


async def test_a_failure_while_handling_a_frame_closes_1011_and_cleans_up(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(make_settings(tmp_path, None)) as srv:
        user = await srv.user()
        client = await srv.connect(user)
        other = await srv.connect(await srv.user())
        await settled(lambda: not server_tasks())

        real = session_module.Session.receive

        def receive(self: Any, data: Any) -> Any:
            if "boom" in str(data):
                raise RuntimeError("a bug in frame handling")
            return real(self, data)

        monkeypatch.setattr(session_module.Session, "receive", receive)
        await client.send({"type": "boom"})
        await asyncio.wait_for(client.ws.wait_closed(), 5)
        assert client.ws.close_code == 1011
        await settled(lambda: all(c.user_id != user for c in srv.services.hub.connections))
        await other.send({"type": "ping"})  # the others are untouched
        assert await other.recv() == {"type": "pong"}


async def test_disconnect_while_a_frame_is_being_handled_runs_after_it(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(make_settings(tmp_path, None)) as srv:
        user = await srv.user()
        client = await srv.connect(user)
        await settled(lambda: not server_tasks())
        store = srv.services.store
        real = store.unread_notifications
        gate = asyncio.Event()
        order: list[str] = []

        async def slow_unread(user_id: str) -> Any:
            order.append("lookup started")
            await gate.wait()
            order.append("lookup done")
            return await real(user_id)

        monkeypatch.setattr(store, "unread_notifications", slow_unread)
        await client.send({"type": "subscribe", "channel": {"type": "notifications", "userId": user}})
        await settled(lambda: order == ["lookup started"])
        await client.close()  # the disconnect arrives while the subscribe is still being handled
        await asyncio.sleep(0.2)
        assert any(c.user_id == user for c in srv.services.hub.connections)  # not cleaned up under it
        gate.set()
        await settled(lambda: all(c.user_id != user for c in srv.services.hub.connections))
        assert order == ["lookup started", "lookup done"]
        await settled(lambda: not server_tasks())
