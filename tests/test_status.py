"""Online status (protocol §7.3) with real servers and real clients: one process on memory, two processes on
Redis and on PostgreSQL, and a process killed with SIGKILL.

Every "no frame" below is proved able to fail: after waiting out the grace, a marker event is published
on the same ``status_U`` channel, and the next frame the watcher receives must be that marker. A status
frame sent in the meantime would arrive before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from fonana_ws.auth import create_token
from fonana_ws.db import demo

from .conftest import (
    API_KEY,
    SECRET,
    Client,
    ServerProcess,
    make_settings,
    process_pair,
    running,
)

#: Short, so that the file stays fast; the rules do not depend on the length.
GRACE = 0.6
#: WS_PRESENCE_TTL of the kill test: entries are refreshed every TTL/3 = 1 s.
TTL = 3.0
#: How long "nothing happens" is waited for, past the grace.
QUIET = GRACE + 0.5
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Node:
    """One server process, as the tests reach it."""

    ws_url: str
    http_url: str


def user_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def connect(node: Node, user: str) -> Client:
    ws = await websockets.connect(f"{node.ws_url}?token={create_token(SECRET, user, 600)}", close_timeout=1)
    client = Client(ws)
    await client.recv_type("connected")
    return client


async def watch(node: Node, watcher: str, target: str) -> tuple[Client, dict[str, Any]]:
    """A connection of ``watcher`` subscribed to ``target``'s status, and the snapshot it got."""
    client = await connect(node, watcher)
    channel = {"type": "status", "userId": target}
    reply = await client.subscribe(channel)
    assert reply == {"type": "subscribed", "data": {"channel": channel, "channelKey": f"status_{target}"}}, (
        reply
    )
    snapshot = await client.recv_type("user_status")
    return client, snapshot


def status(user: str, online: bool, last_seen: Any = None) -> dict[str, Any]:
    return {"type": "user_status", "userId": user, "online": online, "lastSeen": last_seen}


async def nothing_but_marker(client: Client, node: Node, target: str) -> None:
    """Wait out the grace, then prove the channel delivers: the next frame is our marker, nothing before."""
    await asyncio.sleep(QUIET)
    marker = {"type": "marker", "n": uuid.uuid4().hex}
    async with httpx.AsyncClient(base_url=node.http_url) as http:
        answer = await http.post(
            "/api/publish", json={"channel": f"status_{target}", "event": marker}, headers=AUTH
        )
    assert answer.status_code == 202, answer.text
    assert await client.recv() == marker


async def query(node: Node, *ids: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=node.http_url) as http:
        answer = await http.get("/api/presence/users", params={"ids": ",".join(ids)}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()["users"]


async def hide(db: Any, user: str) -> None:
    await db.execute(
        'INSERT INTO user_settings (id, "userId", "showOnlineStatus", "allowMessages") '
        "VALUES (:id, :u, FALSE, TRUE)",
        {"id": f"s-{user}", "u": user},
    )


async def a_watches_b(db: Any, watcher_node: Node, b_node: Node, b_other_node: Node) -> None:
    """The §7.3 story: online, a second tab, the last one closing, a reload, a hidden user, the HTTP query.

    ``b_node`` and ``b_other_node`` hold B's two tabs (the same process, or two).
    """
    a, b, h = user_id("a"), user_id("b"), user_id("h")
    for user in (a, b, h):
        await demo.insert_user(db, user)
    await hide(db, h)

    watcher, snapshot = await watch(watcher_node, a, b)
    assert snapshot == status(b, False), "never seen: offline, lastSeen null"

    first = await connect(b_node, b)
    assert await watcher.recv() == status(b, True)
    second = await connect(b_other_node, b)
    await first.close()
    await nothing_but_marker(watcher, watcher_node, b)  # a second tab, then the first closed: no frame
    assert (await query(watcher_node, b))[b] == {"online": True, "lastSeen": None}

    closed = time.monotonic()
    await second.close()
    went = await watcher.recv(timeout=GRACE + 5)
    waited = time.monotonic() - closed
    assert went["online"] is False and isinstance(went["lastSeen"], str) and went["lastSeen"].endswith("Z"), (
        went
    )
    assert went == status(b, False, went["lastSeen"])
    assert waited >= GRACE * 0.9, f"offline announced {waited:.2f} s after the close, within the grace"
    assert (await query(watcher_node, b))[b] == {"online": False, "lastSeen": went["lastSeen"]}
    _, again = await watch(watcher_node, a, b)
    assert again == went, "a new watcher's snapshot agrees"

    back = await connect(b_node, b)
    assert await watcher.recv() == status(b, True)
    await back.close()
    reloaded = await connect(b_other_node, b)  # within the grace, on the other process when there are two
    await nothing_but_marker(watcher, watcher_node, b)
    assert (await query(watcher_node, b))[b] == {"online": True, "lastSeen": None}
    await reloaded.close()
    assert (await watcher.recv(timeout=GRACE + 5))["online"] is False

    hidden_watcher, hidden_snapshot = await watch(watcher_node, a, h)
    assert hidden_snapshot == status(h, False)
    tab = await connect(b_node, h)
    await nothing_but_marker(hidden_watcher, watcher_node, h)
    assert (await query(watcher_node, h, b))[h] == {"online": False, "lastSeen": None}
    await tab.close()
    await nothing_but_marker(hidden_watcher, watcher_node, h)
    assert (await query(watcher_node, h))[h] == {"online": False, "lastSeen": None}


async def test_a_watches_b_on_one_process(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None, WS_OFFLINE_GRACE=str(GRACE))
    async with running(settings) as srv:
        node = Node(srv.ws_url, f"http://127.0.0.1:{srv.port}")
        await a_watches_b(srv.db, node, node, node)
        assert srv.services.stats.status_published == 5, (
            "online, offline, online, offline... and nothing else"
        )
        metrics = (await srv.http.get("/metrics")).text
        assert "fonana_ws_status_published_total 5.0" in metrics


async def test_the_presence_query_refuses_what_it_cannot_answer(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None, WS_OFFLINE_GRACE=str(GRACE))
    async with running(settings) as srv:
        for params in ({}, {"ids": ""}, {"ids": "a,,b"}, {"ids": ",".join(f"u{i}" for i in range(501))}):
            answer = await srv.http.get("/api/presence/users", params=params, headers=AUTH)
            assert answer.status_code == 400 and "ids" in answer.json()["error"], (params, answer.text)
        answer = await srv.http.get("/api/presence/users", params={"ids": "a"})
        assert answer.status_code == 401
        answer = await srv.http.get(
            "/api/presence/users", params={"ids": ",".join(f"u{i}" for i in range(500))}, headers=AUTH
        )
        assert answer.status_code == 200 and len(answer.json()["users"]) == 500


def pair(tmp: Path, broker: str) -> contextlib.AbstractAsyncContextManager[tuple[list[ServerProcess], Any]]:
    """Two processes on ``broker`` with this file's short TTL and grace."""
    return process_pair(tmp, broker, WS_PRESENCE_TTL=str(TTL), WS_OFFLINE_GRACE=str(GRACE))


def node(proc: ServerProcess) -> Node:
    return Node(proc.ws_url, proc.http_url)


@pytest.mark.parametrize("broker", ["redis", "postgresql"])
async def test_a_watches_b_across_two_processes(tmp_path: Path, broker: str) -> None:
    """A on process 1; B's tabs on process 0 and process 1, so the reload moves B between them."""
    async with pair(tmp_path, broker) as (procs, db):
        await a_watches_b(db, node(procs[1]), node(procs[0]), node(procs[1]))


@pytest.mark.parametrize("broker", ["redis", "postgresql"])
async def test_a_killed_process_s_users_go_offline_exactly_once(tmp_path: Path, broker: str) -> None:
    """B on process 0, A watching on process 1; SIGKILL process 0: process 1's sweep finds B's entries
    expired (at most TTL after the kill, seen within TTL/3 more) and announces B offline after the grace,
    once."""
    async with pair(tmp_path, broker) as (procs, db):
        a, b = user_id("a"), user_id("b")
        for user in (a, b):
            await demo.insert_user(db, user)
        watcher, snapshot = await watch(node(procs[1]), a, b)
        assert snapshot == status(b, False)
        await connect(node(procs[0]), b)
        assert await watcher.recv() == status(b, True)
        await connect(node(procs[0]), b)  # two tabs on the doomed process: still one offline
        await nothing_but_marker(watcher, node(procs[1]), b)

        procs[0].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        went = await watcher.recv(timeout=TTL * 2 + GRACE + 3)
        after = time.monotonic() - killed
        assert went["online"] is False and isinstance(went["lastSeen"], str), went
        print(f"\n[status] {broker}: offline {after:.2f} s after SIGKILL (TTL {TTL} s, grace {GRACE} s)")
        assert GRACE <= after <= TTL + TTL / 3 + GRACE + 1.0, f"offline {after:.2f} s after the kill"
        assert (await query(node(procs[1]), b))[b] == {"online": False, "lastSeen": went["lastSeen"]}
        await asyncio.sleep(TTL / 3)  # another sweep or two: nothing more
        await nothing_but_marker(watcher, node(procs[1]), b)


@pytest.mark.parametrize("broker", ["redis", "postgresql"])
async def test_a_stopped_process_s_users_go_offline_unless_back(tmp_path: Path, broker: str) -> None:
    """SIGTERM on process 0, where B and C are connected; C reconnects to process 1 within the grace (a
    rolling restart), B does not: A, watching both on process 1, sees B offline once (a survivor's sweep
    finds B's entries, made to expire after the grace at shutdown) and nothing about C."""
    async with pair(tmp_path, broker) as (procs, db):
        a, b, c = user_id("a"), user_id("b"), user_id("c")
        for user in (a, b, c):
            await demo.insert_user(db, user)
        watch_b, snapshot = await watch(node(procs[1]), a, b)
        watch_c, _ = await watch(node(procs[1]), a, c)
        await connect(node(procs[0]), b)
        assert await watch_b.recv() == status(b, True)
        tab = await connect(node(procs[0]), c)
        assert await watch_c.recv() == status(c, True)

        procs[0].proc.terminate()
        stopped = time.monotonic()
        with contextlib.suppress(Exception):
            await tab.ws.recv()  # closed 1012 by the shutdown
        await connect(node(procs[1]), c)  # back within the grace, elsewhere
        went = await watch_b.recv(timeout=TTL / 3 + GRACE + 5)
        after = time.monotonic() - stopped
        assert went["online"] is False and isinstance(went["lastSeen"], str), went
        print(f"\n[status] {broker}: offline {after:.2f} s after SIGTERM (TTL {TTL} s, grace {GRACE} s)")
        assert after <= TTL / 3 + GRACE + 2.0, f"offline {after:.2f} s after the stop"
        await nothing_but_marker(watch_c, node(procs[1]), c)
        await nothing_but_marker(watch_b, node(procs[1]), b)
