"""History and recovery (protocol §7.8) with real servers and real clients: one process on memory, two
processes on Redis and on PostgreSQL.

A client leaves (its socket dropped), events are published, and it subscribes again with ``since``: it
must get exactly what it missed, in order, then the live events, none twice, also while events keep
being published during the replay; a client too far behind, or of another epoch, is told
``recovered: false`` and gets no replay.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from fonana_ws.auth import create_token
from fonana_ws.db import demo

from .conftest import API_KEY, SECRET, Client, make_settings, process_pair, running

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def connect(url: str, user: str) -> Client:
    ws = await websockets.connect(f"{url}?token={create_token(SECRET, user, 600)}", close_timeout=1)
    client = Client(ws, raw=True)  # the history fields are what this file is about
    await client.recv_type("connected")
    return client


async def subscribe(client: Client, channel: dict[str, Any], since: dict[str, Any] | None = None) -> dict:
    frame: dict[str, Any] = {"type": "subscribe", "channel": channel}
    if since is not None:
        frame["since"] = since
    await client.send(frame)
    return (await client.recv_type("subscribed"))["data"]


async def publish_range(http: httpx.AsyncClient, key: str, numbers: range) -> None:
    for n in numbers:
        answer = await http.post(
            "/api/publish", json={"channel": key, "event": {"type": "tick", "n": n}}, headers=AUTH
        )
        assert answer.status_code == 202, answer.text


async def ticks(client: Client, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    out = []
    for _ in range(count):
        frame = await client.recv(timeout)
        assert frame["type"] == "tick", frame
        out.append(frame)
    return out


async def recovery_story(db: Any, sub_url: str, pub: httpx.AsyncClient, pub2: httpx.AsyncClient) -> None:
    """The §7.8 story on one deployment; ``pub`` and ``pub2`` publish (two processes, or one)."""
    creator, fan = uid("creator"), uid("fan")
    await demo.insert_user(db, creator, is_creator=True)
    await demo.insert_user(db, fan)
    post = uid("post")
    await demo.insert_post(db, post, creator)
    channel = {"type": "post", "postId": post}
    key = f"post_{post}"

    client = await connect(sub_url, fan)
    first = await subscribe(client, channel)
    assert first["offset"] == 0 and isinstance(first["epoch"], str) and "recovered" not in first, first
    epoch = first["epoch"]
    await publish_range(pub, key, range(1, 4))
    seen = await ticks(client, 3)
    assert [(f["n"], f["offset"], f["channelKey"]) for f in seen] == [(1, 1, key), (2, 2, key), (3, 3, key)]
    client.ws.transport.abort()  # gone without a close, as a phone losing its network

    # 100 published while it is away (all the history keeps), from the other process.
    await publish_range(pub2, key, range(4, 104))
    back = await connect(sub_url, fan)
    started = time.monotonic()
    again = await subscribe(back, channel, {"offset": 3, "epoch": epoch})
    assert again == {"channel": channel, "channelKey": key, "offset": 103, "epoch": epoch, "recovered": True}
    missed = await ticks(back, 100)
    took = time.monotonic() - started
    assert [f["offset"] for f in missed] == list(range(4, 104))
    assert [f["n"] for f in missed] == list(range(4, 104))
    print(f"\n[recovery] 100 events behind: subscribe to the last one replayed {1000 * took:.1f} ms")
    await publish_range(pub, key, range(104, 106))
    assert [f["offset"] for f in await ticks(back, 2)] == [104, 105], "then live, in order"

    # Events keep coming during the replay: no gap, no duplicate.
    await back.close()
    await publish_range(pub, key, range(106, 136))
    late = await connect(sub_url, fan)
    flood = asyncio.gather(
        publish_range(pub, key, range(136, 156)), publish_range(pub2, key, range(156, 176))
    )
    await asyncio.sleep(0.01)
    answer = await subscribe(late, channel, {"offset": 105, "epoch": epoch})
    assert answer["recovered"] is True, answer
    await flood
    got = await ticks(late, 175 - 105)
    assert [f["offset"] for f in got] == list(range(106, 176)), [f["offset"] for f in got]
    assert sorted(f["n"] for f in got) == list(range(106, 176))
    await late.nothing(0.3)

    # Another epoch, or too far behind (the history keeps 100): recovered false, no replay.
    last = 175
    for since in ({"offset": 100, "epoch": "another"}, {"offset": 2, "epoch": epoch}):
        stale = await connect(sub_url, fan)
        told = await subscribe(stale, channel, since)
        assert told["recovered"] is False and told["offset"] == last and told["epoch"] == epoch, told
        await stale.nothing(0.3)
        last += 1
        await publish_range(pub, key, range(last, last + 1))
        assert (await ticks(stale, 1))[0]["offset"] == last, "live after a refused recovery"
        assert (await ticks(late, 1))[0]["offset"] == last
        await stale.close()


async def test_recovery_on_one_process(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, None)) as srv:
        await recovery_story(srv.db, srv.ws_url, srv.http, srv.http)
        stats = srv.services.stats
        assert stats.recoveries == 2 and stats.recoveries_refused == 2, stats
        text = (await srv.http.get("/metrics")).text
        assert "fonana_ws_recoveries_total 2.0" in text and "fonana_ws_recoveries_refused_total 2.0" in text


@pytest.mark.parametrize("broker", ["redis", "postgresql"])
async def test_recovery_across_two_processes(tmp_path: Path, broker: str) -> None:
    async with process_pair(tmp_path, broker) as (procs, db):
        async with (
            httpx.AsyncClient(base_url=procs[0].http_url, timeout=10) as pub,
            httpx.AsyncClient(base_url=procs[1].http_url, timeout=10) as pub2,
        ):
            await recovery_story(db, procs[1].ws_url, pub, pub2)


@pytest.mark.parametrize("broker", ["redis", "postgresql"])
async def test_two_processes_publishing_at_once_give_one_sequence(tmp_path: Path, broker: str) -> None:
    async with process_pair(tmp_path, broker) as (procs, db):
        creator, fan = uid("creator"), uid("fan")
        await demo.insert_user(db, creator, is_creator=True)
        await demo.insert_user(db, fan)
        post = uid("post")
        await demo.insert_post(db, post, creator)
        client = await connect(procs[1].ws_url, fan)
        await subscribe(client, {"type": "post", "postId": post})
        async with (
            httpx.AsyncClient(base_url=procs[0].http_url, timeout=10) as one,
            httpx.AsyncClient(base_url=procs[1].http_url, timeout=10) as two,
        ):
            key = f"post_{post}"
            await asyncio.gather(
                *(publish_range(h, key, range(i, 200, 4)) for i, h in enumerate([one, two] * 2))
            )
        got = await ticks(client, 200)
        assert [f["offset"] for f in got] == list(range(1, 201))
        assert sorted(f["n"] for f in got) == list(range(200))


async def test_history_off_means_no_offsets(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, None, WS_HISTORY_TTL="0")) as srv:
        fan = await srv.user()
        client = await srv.connect(fan)
        channel = {"type": "feed", "userId": fan}
        answer = await subscribe(client, channel)
        assert answer == {"channel": channel, "channelKey": f"feed_{fan}"}
        await publish_range(srv.http, f"feed_{fan}", range(1))
        assert await client.recv() == {"type": "tick", "n": 0}
        answer = await subscribe(client, channel, {"offset": 1, "epoch": "e"})
        assert "recovered" not in answer, "no history: nothing to say about recovery"


async def test_a_malformed_since_is_invalid_format(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, None)) as srv:
        fan = await srv.user()
        client = await srv.connect(fan)
        channel = {"type": "feed", "userId": fan}
        for since in (
            [],
            {"offset": -1, "epoch": "e"},
            {"offset": 1},
            {"offset": "1", "epoch": "e"},
            {"offset": True, "epoch": "e"},
            {"offset": 1, "epoch": ""},
            {"offset": 1, "epoch": 5},
        ):
            await client.send({"type": "subscribe", "channel": channel, "since": since})
            assert (await client.recv())["data"]["message"] == "Invalid message format", since
