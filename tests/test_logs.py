"""The server's log, read as an operator reads it: one line per connection lifecycle event with the user,
the connection id and the real client address, plain or JSON, and never a token, secret or password."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets

from fonana_ws.auth import create_token
from fonana_ws.config import normalize_database_url
from fonana_ws.db import Store, demo

from .conftest import API_KEY, SECRET, ServerProcess, fresh_pg_database

CLI = [sys.executable, "-m", "fonana_ws"]


@asynccontextmanager
async def served(tmp: Path, **env: str) -> AsyncIterator[tuple[int, Path]]:
    """``fonana-ws serve`` as a process from a clean environment, its log in one file; exit 0 at the end."""
    settings = {"JWT_SECRET": SECRET, "WS_API_KEY": API_KEY, "FONANA_WS_DATA_DIR": str(tmp / "data"), **env}
    async with ServerProcess(settings, tmp, inherit=False) as proc:
        yield proc.port, proc.log_path
    assert proc.proc.returncode == 0, proc.log()


async def connect(port: int, token: str | None = None, **kwargs: Any) -> Any:
    query = f"?token={token}" if token is not None else ""
    return await websockets.connect(f"ws://127.0.0.1:{port}/ws{query}", close_timeout=1, **kwargs)


async def first_frame(ws: Any) -> dict[str, Any]:
    return orjson.loads(await asyncio.wait_for(ws.recv(), 5))


async def refused(ws: Any) -> int:
    try:
        await asyncio.wait_for(ws.recv(), 5)
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None
        return exc.rcvd.code
    raise AssertionError("not refused")


def read(path: Path) -> str:
    return path.read_text()


async def wait_for_line(log: Path, pattern: str, timeout: float = 5) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        if match := re.search(pattern, read(log)):
            return match
        assert time.monotonic() < deadline, f"no log line matching {pattern!r} in:\n{read(log)}"
        await asyncio.sleep(0.05)


def secrets_in(text: str, *tokens: str, others: tuple[str, ...] = ()) -> list[str]:
    """Every token (or its claims or signature part) and every secret that appears in ``text``."""
    found = []
    for token in tokens:
        _header, payload, signature = token.split(".")
        found += [part for part in (token, payload, signature) if part in text]
    return found + [s for s in (SECRET, API_KEY, *others) if s in text]


async def test_lifecycle_lines_with_real_client_address_and_no_token(tmp_path: Path) -> None:
    async with served(tmp_path, LOG_LEVEL="debug") as (port, log):
        good = create_token(SECRET, "demo-subscriber", 600)
        header_token = create_token(SECRET, "demo-outsider", 600)
        proto_token = create_token(SECRET, "demo-creator", 600)
        forged = create_token("not-the-secret-" + "f" * 30, "demo-subscriber", 600)
        expired = create_token(SECRET, "demo-subscriber", -600)
        unknown = create_token(SECRET, "nobody-at-all", 600)

        # Behind a trusted proxy (127.0.0.1 by default) the address comes from X-Forwarded-For.
        proxied = await connect(
            port, good, additional_headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
        )
        assert (await first_frame(proxied))["type"] == "connected"
        line = await wait_for_line(log, r"connected conn=(\S+) user=demo-subscriber client=(\S+)")
        conn_id, client = line.groups()
        assert client == "203.0.113.7"  # the rightmost address that is not a trusted proxy

        # A peer that is not a trusted proxy cannot choose its address by sending the header.
        direct = await connect(
            port,
            header_token,
            additional_headers={"X-Forwarded-For": "192.0.2.66"},
            local_addr=("127.0.0.2", 0),
        )
        assert (await first_frame(direct))["type"] == "connected"
        await wait_for_line(log, r"connected conn=\S+ user=demo-outsider client=127\.0\.0\.2\b")
        await direct.send(
            orjson.dumps({"type": "subscribe", "channel": {"type": "post", "postId": "demo-post-locked"}})
        )
        assert (await first_frame(direct))["type"] == "error"
        await wait_for_line(
            log, r"denied conn=\S+ user=demo-outsider client=127\.0\.0\.2 key=post_demo-post-locked"
        )

        # Tokens by header and by subprotocol.
        by_header = await connect(port, additional_headers={"Authorization": f"Bearer {header_token}"})
        assert (await first_frame(by_header))["type"] == "connected"
        by_proto = await connect(port, subprotocols=[f"bearer.{proto_token}"])
        assert (await first_frame(by_proto))["type"] == "connected"
        await wait_for_line(log, r"connected conn=\S+ user=demo-creator client=127\.0\.0\.1\b")

        for token, cause in (
            (forged, "bad_signature"),
            (expired, "expired"),
            (unknown, "unknown_user"),
            (None, "no_token"),
        ):
            ws = await connect(port, token, additional_headers={"X-Forwarded-For": "203.0.113.99"})
            assert await refused(ws) == 1008
            await wait_for_line(log, rf"refused (user=\S+ )?client=203\.0\.113\.99 cause={cause} token=")

        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"http://127.0.0.1:{port}/api/publish",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={"user": "demo-subscriber", "event": {"type": "notification"}},
            )
            assert r.status_code == 202
            wrong = await http.post(
                f"http://127.0.0.1:{port}/api/publish?token={good}",
                headers={"Authorization": f"Bearer {SECRET}"},
                json={"user": "demo-subscriber", "event": {"type": "notification"}},
            )
            assert wrong.status_code == 401
        assert (await first_frame(proxied))["type"] == "notification"

        await proxied.close()
        await wait_for_line(
            log,
            rf"disconnected conn={re.escape(conn_id)} user=demo-subscriber client=203\.0\.113\.7 code=1000",
        )
        for ws in (direct, by_header, by_proto):
            await ws.close()

    text = log.read_text()
    assert not secrets_in(text, good, header_token, proto_token, forged, expired, unknown)
    # One line per lifecycle event: 4 connects, 4 refusals, 4 disconnects.
    assert len(re.findall(r" connected conn=", text)) == 4
    assert len(re.findall(r" refused (?:user=\S+ )?client=", text)) == 4
    assert len(re.findall(r" disconnected conn=", text)) == 4
    # Plain lines for a terminal: time, level, logger, message.
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO +fonana_ws\.connection: connected ", text, re.M
    )


async def test_json_logs_every_line_an_object_and_no_password(tmp_path: Path) -> None:
    """LOG_JSON=true against PostgreSQL (database and broker URLs with a password): only JSON lines."""
    password = "pw-" + os.urandom(6).hex()
    async with fresh_pg_database() as url:
        with_password = url.replace("postgres@", f"postgres:{password}@", 1)
        assert password in with_password
        store = Store(normalize_database_url(url))
        await store.connect()
        await store.create_schema()
        await demo.insert_user(store.db, "json-user")
        await store.disconnect()
        async with served(
            tmp_path, DATABASE_URL=with_password, BROADCAST_URL=with_password, LOG_JSON="true"
        ) as (
            port,
            log,
        ):
            token = create_token(SECRET, "json-user", 600)
            ws = await connect(port, token, additional_headers={"X-Forwarded-For": "203.0.113.7"})
            assert (await first_frame(ws))["type"] == "connected"
            bad = await connect(port, token + "x")
            assert await refused(bad) == 1008
            await ws.close()
            await wait_for_line(log, r"disconnected conn=")

    lines = log.read_text().splitlines()
    records = [orjson.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    messages = [r["message"] for r in records]
    assert any(
        re.fullmatch(r"connected conn=\S+ user=json-user client=203\.0\.113\.7 direct=\S+", m)
        for m in messages
    )
    assert any(m.startswith("refused client=127.0.0.1 cause=bad_signature") for m in messages)
    connected = [r for r in records if r.get("event") == "connected"]
    assert connected and connected[0]["user"] == "json-user" and connected[0]["client"] == "203.0.113.7"
    assert isinstance(connected[0]["conn"], int)
    assert any(m.startswith("disconnected conn=") and "user=json-user" in m for m in messages)
    assert any("secret from JWT_SECRET" in m for m in messages)
    assert not secrets_in("\n".join(lines), token, others=(password,))
