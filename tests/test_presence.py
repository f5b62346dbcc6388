"""Channel presence (protocol §7.4) with real servers and real clients: one process on memory, two
processes on Redis and on PostgreSQL, a process killed with SIGKILL, and a channel above the list limit.

Every "no frame" is proved able to fail as in ``test_status.py``: after waiting out the grace, a marker
event is published on the channel itself, and the next frame the watcher receives must be that marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from fonana_ws.auth import create_token
from fonana_ws.db import demo

from .conftest import API_KEY, SECRET, Client, ServerProcess, make_settings, process_pair, running

GRACE = 0.6
TTL = 3.0
QUIET = GRACE + 0.5
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Node:
    def __init__(self, ws_url: str, http_url: str) -> None:
        self.ws_url = ws_url
        self.http_url = http_url


def user_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def connect(node: Node, user: str) -> Client:
    ws = await websockets.connect(f"{node.ws_url}?token={create_token(SECRET, user, 600)}", close_timeout=1)
    client = Client(ws)
    await client.recv_type("connected")
    return client


async def enter(node: Node, user: str, channel: dict[str, Any], *, presence: bool = False) -> Client:
    """A connection of ``user`` subscribed to ``channel`` (asking for presence frames when ``presence``)."""
    client = await connect(node, user)
    frame: dict[str, Any] = {"type": "subscribe", "channel": channel}
    if presence:
        frame["presence"] = True
    await client.send(frame)
    assert (await client.recv_type("subscribed"))["data"]["channel"] == channel
    return client


async def ask(client: Client, channel: dict[str, Any]) -> dict[str, Any]:
    await client.send({"type": "presence", "channel": channel})
    return await client.recv()


def join(key: str, user: str) -> dict[str, Any]:
    named = {"userId": user, "nickname": user, "avatar": None}
    return {"type": "presence_join", "data": {"channelKey": key, "user": named}}


def leave(key: str, user: str) -> dict[str, Any]:
    return {"type": "presence_leave", "data": {"channelKey": key, "userId": user}}


async def nothing_but_marker(client: Client, node: Node, key: str) -> None:
    """Wait out the grace, then prove the socket still receives: the next frame is our marker."""
    await asyncio.sleep(QUIET)
    marker = {"type": "marker", "n": uuid.uuid4().hex}
    async with httpx.AsyncClient(base_url=node.http_url) as http:
        answer = await http.post("/api/publish", json={"channel": key, "event": marker}, headers=AUTH)
    assert answer.status_code == 202, answer.text
    assert await client.recv() == marker


async def hide(db: Any, user: str) -> None:
    await db.execute(
        'INSERT INTO user_settings (id, "userId", "showOnlineStatus", "allowMessages") '
        "VALUES (:id, :u, FALSE, TRUE)",
        {"id": f"s-{user}", "u": user},
    )


async def presence_story(db: Any, watcher_node: Node, b_node: Node, b_other_node: Node) -> None:
    """A watches creator C's channel; B comes, opens a second tab, closes the first, closes the last,
    reloads; H (hidden) comes and goes; the query agrees at each step; a non-member is refused."""
    a, b, h, c = user_id("a"), user_id("b"), user_id("h"), user_id("c")
    for user in (a, b, h, c):
        await demo.insert_user(db, user)
    await hide(db, h)
    channel = {"type": "creator", "id": c}
    key = f"creator_{c}"

    watcher = await enter(watcher_node, a, channel, presence=True)
    assert await watcher.recv() == join(key, a), "the watcher's own arrival is a join like any other"
    answer = await ask(watcher, channel)
    assert answer == {
        "type": "presence",
        "data": {
            "channel": channel,
            "channelKey": key,
            "count": 1,
            "users": [{"userId": a, "nickname": a, "avatar": None}],
            "truncated": False,
        },
    }, answer

    first = await enter(b_node, b, channel)
    assert await watcher.recv() == join(key, b)
    second = await enter(b_other_node, b, channel)
    answer = (await ask(watcher, channel))["data"]
    assert answer["count"] == 2, "two tabs of B count once"
    assert sorted(u["userId"] for u in answer["users"]) == sorted([a, b])
    await first.close()
    await nothing_but_marker(watcher, watcher_node, key)  # a second tab, then the first closed: no frame

    closed = time.monotonic()
    await second.close()
    assert await watcher.recv(timeout=GRACE + 5) == leave(key, b)
    waited = time.monotonic() - closed
    assert waited >= GRACE * 0.9, f"leave sent {waited:.2f} s after the close, within the grace"
    assert (await ask(watcher, channel))["data"]["count"] == 1

    back = await enter(b_node, b, channel)
    assert await watcher.recv() == join(key, b)
    await back.close()
    reloaded = await enter(b_other_node, b, channel)  # within the grace (on the other process, if two)
    await nothing_but_marker(watcher, watcher_node, key)
    assert (await ask(watcher, channel))["data"]["count"] == 2
    await reloaded.close()
    assert await watcher.recv(timeout=GRACE + 5) == leave(key, b)

    tab = await enter(b_node, h, channel)  # hidden: counted, never named
    await nothing_but_marker(watcher, watcher_node, key)
    answer = (await ask(watcher, channel))["data"]
    assert answer["count"] == 2 and [u["userId"] for u in answer["users"]] == [a], answer
    await tab.close()
    await nothing_but_marker(watcher, watcher_node, key)

    # Unsubscribed, the watcher is no member: refused; asking of another channel type is malformed.
    outsider = await connect(watcher_node, b)
    assert await ask(outsider, channel) == {
        "type": "error",
        "data": {"message": "Access denied to channel", "channel": channel},
    }
    feed = {"type": "notifications", "userId": b}
    await outsider.send({"type": "subscribe", "channel": feed})
    await outsider.recv_type("subscribed")
    assert await ask(outsider, feed) == {
        "type": "error",
        "data": {"message": "Invalid message format", "channel": feed},
    }
    # A subscribe without "presence" gets no presence frames, and ends the watch of the one it repeats.
    await outsider.send({"type": "subscribe", "channel": channel})
    await outsider.recv_type("subscribed")
    assert await watcher.recv() == join(key, b)
    await watcher.send({"type": "subscribe", "channel": channel})
    await watcher.recv_type("subscribed")
    await outsider.close()
    await nothing_but_marker(watcher, watcher_node, key)
    await watcher.close()


async def test_presence_on_one_process(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None, WS_OFFLINE_GRACE=str(GRACE))
    async with running(settings) as srv:
        node = Node(srv.ws_url, f"http://127.0.0.1:{srv.port}")
        await presence_story(srv.db, node, node, node)
        # Joins: a, b, b back, the outsider b; leaves: b, b after the reload, the outsider (published,
        # though nobody watches by then). The hidden user: none.
        assert srv.services.stats.presence_published == 7
        assert "fonana_ws_presence_published_total 7.0" in (await srv.http.get("/metrics")).text


def node(proc: ServerProcess) -> Node:
    return Node(proc.ws_url, proc.http_url)


@pytest.mark.parametrize("broker", ["redis", "postgresql"])
async def test_presence_across_two_processes(tmp_path: Path, broker: str) -> None:
    async with process_pair(tmp_path, broker, WS_PRESENCE_TTL=str(TTL), WS_OFFLINE_GRACE=str(GRACE)) as (
        procs,
        db,
    ):
        await presence_story(db, node(procs[1]), node(procs[0]), node(procs[1]))


@pytest.mark.parametrize("broker", ["redis", "postgresql"])
async def test_a_killed_process_s_users_leave_exactly_once(tmp_path: Path, broker: str) -> None:
    async with process_pair(tmp_path, broker, WS_PRESENCE_TTL=str(TTL), WS_OFFLINE_GRACE=str(GRACE)) as (
        procs,
        db,
    ):
        a, b, c = user_id("a"), user_id("b"), user_id("c")
        for user in (a, b, c):
            await demo.insert_user(db, user)
        channel = {"type": "creator", "id": c}
        key = f"creator_{c}"
        watcher = await enter(node(procs[1]), a, channel, presence=True)
        assert await watcher.recv() == join(key, a)
        await enter(node(procs[0]), b, channel)
        await enter(node(procs[0]), b, channel)  # two tabs on the doomed process: one leave
        assert await watcher.recv() == join(key, b)
        await nothing_but_marker(watcher, node(procs[1]), key)
        assert (await ask(watcher, channel))["data"]["count"] == 2

        procs[0].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert await watcher.recv(timeout=TTL * 2 + GRACE + 3) == leave(key, b)
        after = time.monotonic() - killed
        print(f"\n[presence] {broker}: leave {after:.2f} s after SIGKILL (TTL {TTL} s, grace {GRACE} s)")
        assert GRACE <= after <= TTL + TTL / 3 + GRACE + 1.0, f"leave {after:.2f} s after the kill"
        assert (await ask(watcher, channel))["data"]["count"] == 1
        await asyncio.sleep(TTL / 3)  # another sweep or two: nothing more
        await nothing_but_marker(watcher, node(procs[1]), key)


async def crowd(node: Node, db: Any, channel: dict[str, Any], n: int) -> list[Client]:
    users = [user_id("u") for _ in range(n)]
    for user in users:
        await demo.insert_user(db, user)
    return [await enter(node, user, channel) for user in users]


async def test_above_the_list_limit_only_counts_arrive(tmp_path: Path) -> None:
    """Limit 3: the fourth present user makes a count, not a join; counts come at most every interval,
    and the last change is always counted; the list holds 3 and says it is truncated."""
    interval = 1.0
    settings = make_settings(
        tmp_path,
        None,
        WS_OFFLINE_GRACE="0",
        WS_PRESENCE_LIST_LIMIT="3",
        WS_PRESENCE_COUNT_INTERVAL=str(interval),
    )
    async with running(settings) as srv:
        n = Node(srv.ws_url, f"http://127.0.0.1:{srv.port}")
        a, c = user_id("a"), user_id("c")
        for user in (a, c):
            await demo.insert_user(srv.db, user)
        channel = {"type": "post", "postId": demo.OPEN_POST}
        key = f"post_{demo.OPEN_POST}"
        watcher = await enter(n, a, channel, presence=True)
        assert await watcher.recv() == join(key, a)
        others = await crowd(n, srv.db, channel, 2)
        for _ in others:
            frame = await watcher.recv()
            assert frame["type"] == "presence_join", frame
        started = time.monotonic()
        others += await crowd(n, srv.db, channel, 5)  # 3 -> 8 present
        counts = []
        while not counts or counts[-1]["data"]["count"] != 8:
            frame = await watcher.recv(timeout=interval + 3)
            assert frame["type"] == "presence_count", frame
            counts.append(frame)
        assert len(counts) <= 1 + (time.monotonic() - started) / interval + 1, counts
        answer = (await ask(watcher, channel))["data"]
        assert answer["count"] == 8 and len(answer["users"]) == 3 and answer["truncated"] is True, answer
        for other in others[:5]:
            await other.close()  # 8 -> 3: back under the limit, owed one last count
        frame = await watcher.recv(timeout=2 * interval + 3)
        while frame["data"]["count"] != 3:
            assert frame["type"] == "presence_count", frame
            frame = await watcher.recv(timeout=2 * interval + 3)
        assert frame == {"type": "presence_count", "data": {"channelKey": key, "count": 3}}
        await others[5].close()  # 3 -> 2: a leave again
        left = await watcher.recv(timeout=3)
        assert left["type"] == "presence_leave", left


@pytest.mark.parametrize("broker", ["redis", "postgresql"])
async def test_a_stopped_process_s_users_leave_unless_they_reconnect(tmp_path: Path, broker: str) -> None:
    """SIGTERM on process 0, where B and D are joined; D rejoins on process 1 within the grace, B does
    not: the watcher on process 1 gets B's leave once and nothing about D."""
    async with process_pair(tmp_path, broker, WS_PRESENCE_TTL=str(TTL), WS_OFFLINE_GRACE=str(GRACE)) as (
        procs,
        db,
    ):
        a, b, d, c = user_id("a"), user_id("b"), user_id("d"), user_id("c")
        for user in (a, b, d, c):
            await demo.insert_user(db, user)
        channel = {"type": "creator", "id": c}
        key = f"creator_{c}"
        watcher = await enter(node(procs[1]), a, channel, presence=True)
        assert await watcher.recv() == join(key, a)
        await enter(node(procs[0]), b, channel)
        assert await watcher.recv() == join(key, b)
        tab = await enter(node(procs[0]), d, channel)
        assert await watcher.recv() == join(key, d)

        procs[0].proc.terminate()
        stopped = time.monotonic()
        with contextlib.suppress(Exception):
            await tab.ws.recv()  # closed 1012 by the shutdown
        await enter(node(procs[1]), d, channel)
        assert await watcher.recv(timeout=TTL / 3 + GRACE + 5) == leave(key, b)
        after = time.monotonic() - stopped
        print(f"\n[presence] {broker}: leave {after:.2f} s after SIGTERM (TTL {TTL} s, grace {GRACE} s)")
        assert after <= TTL / 3 + GRACE + 2.0, f"leave {after:.2f} s after the stop"
        await nothing_but_marker(watcher, node(procs[1]), key)
        assert (await ask(watcher, channel))["data"]["count"] == 2
