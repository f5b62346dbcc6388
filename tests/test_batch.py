"""``POST /api/publish/batch`` (protocol §7.7) on a real server with real clients: SQLite and PostgreSQL on
the memory broker, and on Redis, including the broker lost part way through a batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fonana_ws.web.batch_api import MAX_ITEMS, PATH

from .conftest import (
    API_KEY,
    REDIS_URL,
    Client,
    Server,
    make_settings,
    need_service,
    redis_reachable,
    running,
)


async def post_batch(server: Server, body: Any, key: str | None = API_KEY) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return await server.http.post(PATH, json=body, headers=headers)


async def listener(server: Server) -> tuple[str, Client]:
    """A user connected and subscribed to their own ``creator_`` channel: reached by both kinds of item."""
    user = await server.user()
    client = await server.connect(user)
    assert (await client.subscribe({"type": "creator", "id": user}))["type"] == "subscribed"
    return user, client


def items_for(user: str, count: int) -> list[dict[str, Any]]:
    """``count`` items, alternately to the user's channel and to the user, numbered in order."""
    return [
        {"channel": f"creator_{user}", "event": {"type": "earnings_updated", "n": n}}
        if n % 2 == 0
        else {"user": user, "event": {"type": "earnings_updated", "n": n}, "id": f"batch-{user}-{n}"}
        for n in range(count)
    ]


async def received(client: Client, count: int) -> list[int]:
    return [(await client.recv())["n"] for _ in range(count)]


async def test_a_hundred_items_arrive_in_order_with_one_result_each(server: Server) -> None:
    user, client = await listener(server)
    response = await post_batch(server, {"items": items_for(user, MAX_ITEMS)})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["ok"] is True
    assert [r["index"] for r in body["results"]] == list(range(MAX_ITEMS))
    assert all(r["ok"] is True and r["id"] for r in body["results"])
    assert body["results"][1]["id"] == f"batch-{user}-1"  # an id given is the id used
    assert await received(client, MAX_ITEMS) == list(range(MAX_ITEMS))
    await client.nothing()


async def test_one_invalid_item_refuses_the_batch_and_nothing_is_published(server: Server) -> None:
    user, client = await listener(server)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"channel": f"creator_{user}", "event": {"no": "type"}}, "event.type"),
        ({"channel": "bogus", "event": {"type": "x"}}, "channel"),
        ({"event": {"type": "x"}}, "channel or user is required"),
        ({"user": user, "event": {"type": "x"}, "id": "i" * 101}, "id must be"),
        ({"user": user, "event": {"type": "x"}, "id": None}, "id must be"),
        ({"user": "", "event": {"type": "x"}}, "user must be"),
        ("text", "body must be a JSON object"),
    ]
    for item, reason in bad:
        items = items_for(user, MAX_ITEMS)
        items[57] = item
        response = await post_batch(server, {"items": items})
        assert response.status_code == 400, (item, response.text)
        error = response.json()["error"]
        assert error.startswith("items[57]: ") and reason in error, (item, error)
    await client.nothing(0.5)


async def test_the_size_of_the_batch_and_its_shape(server: Server) -> None:
    user, client = await listener(server)
    cases: list[tuple[Any, str]] = [
        ({"items": items_for(user, MAX_ITEMS + 1)}, f"1 to {MAX_ITEMS}"),
        ({"items": []}, f"1 to {MAX_ITEMS}"),
        ({}, "items is required"),
        ({"items": {"0": items_for(user, 1)[0]}}, "items must be a list"),
        ([items_for(user, 1)[0]], "body must be a JSON object"),
    ]
    for body, reason in cases:
        response = await post_batch(server, body)
        assert response.status_code == 400, (body, response.text)
        assert reason in response.json()["error"], (body, response.json())
    await client.nothing(0.5)


async def test_the_batch_needs_the_api_key(server: Server) -> None:
    user, client = await listener(server)
    body = {"items": items_for(user, 2)}
    missing = await post_batch(server, body, key=None)
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    assert (await post_batch(server, body, key="wrong-" + API_KEY)).status_code == 401
    await client.nothing(0.5)


async def test_an_item_over_the_event_size_is_413_naming_it(server: Server) -> None:
    """The envelope size rule of ``/api/publish`` applies to each item, before anything is published."""
    user, client = await listener(server)
    limit = server.settings.max_event_size
    items = [{"user": user, "event": {"type": "x", "pad": ""}}]
    # Within the limit as a body; over it once wrapped in its envelope (an event id of 32 characters).
    items[0]["event"]["pad"] = "p" * (limit - 10 - len(orjson.dumps({"items": items})))
    body = orjson.dumps({"items": items})
    assert len(body) <= limit
    response = await server.http.post(PATH, content=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 413, response.text
    assert response.json()["error"].startswith("items[0]: the event is "), response.json()
    await client.nothing(0.5)


# -- on Redis, and Redis lost part way ------------------------------------------------------------------


class PublishCutter:
    """A TCP proxy to the test Redis that forwards everything until ``allow`` PUBLISH commands went
    through; then it closes any connection that sends another (and keeps doing so), so that the server's
    publishing fails from there on while its subscriptions keep working."""

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.published = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
        host, _, port = target.partition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port or 6379))

        async def upstream() -> None:
            while data := await reader.read(65536):
                # A batch publishes item by item: one PUBLISH command each (RESP: "$7\r\nPUBLISH\r\n"),
                # or, to a channel with history (protocol §7.8), one script that publishes.
                upper = data.upper()
                count = sum(upper.count(b"\r\n" + cmd + b"\r\n") for cmd in (b"PUBLISH", b"EVALSHA", b"EVAL"))
                if count and self.published + count > self.allow:
                    break
                self.published += count
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            w.close()


@contextlib.asynccontextmanager
async def on_redis(tmp: Path, url: str = REDIS_URL) -> AsyncIterator[Server]:
    if (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    async with running(make_settings(tmp, None, BROADCAST_URL=url)) as srv:
        yield srv


async def test_a_hundred_items_in_order_on_redis(tmp_path: Path) -> None:
    async with on_redis(tmp_path) as server:
        user, client = await listener(server)
        response = await post_batch(server, {"items": items_for(user, MAX_ITEMS)})
        assert response.status_code == 202, response.text
        assert await received(client, MAX_ITEMS) == list(range(MAX_ITEMS))


@pytest.mark.timeout(60)
async def test_redis_lost_part_way_says_exactly_which_items_were_delivered(tmp_path: Path) -> None:
    if (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    cutter = PublishCutter(allow=10**9)
    async with cutter as url, on_redis(tmp_path, url) as server:
        user, client = await listener(server)
        # From now on 40 more PUBLISH commands, then none. The server's own (a status announcement of
        # the listener) may take one or two of them: the answer says how many items went through.
        cutter.allow = cutter.published + 40
        response = await post_batch(server, {"items": items_for(user, 100)})
        assert response.status_code == 503, response.text
        body = response.json()
        delivered = body["published"]
        assert body["ok"] is False and 35 <= delivered <= 40, body
        assert body["error"].startswith(f"items[{delivered}]: broker unavailable"), body
        results = body["results"]
        assert [r["index"] for r in results] == list(range(100))
        assert all(r["ok"] is True and r["id"] for r in results[:delivered])
        assert all(r["ok"] is False and "id" not in r for r in results[delivered:])
        assert "error" in results[delivered] and all("error" not in r for r in results[delivered + 1 :])
        # Exactly the items answered as delivered arrive, in order, and nothing else.
        assert await received(client, delivered) == list(range(delivered))
        await client.nothing(0.5)
