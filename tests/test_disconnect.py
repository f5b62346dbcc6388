"""Disconnect a user everywhere (protocol §7.7, close 4003 of §7.10): the HTTP route and ``fonana-ws
disconnect`` on real servers with real clients, one process (SQLite and PostgreSQL) and two over Redis."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import websockets

from fonana_ws.auth import create_token
from fonana_ws.broker import Broker
from fonana_ws.db import demo
from fonana_ws.fanout.connection import Connection
from fonana_ws.fanout.hub import Hub
from fonana_ws.fonana import disconnect
from fonana_ws.fonana.disconnect import DISCONNECTED, MAX_REASON
from fonana_ws.fonana.typing import Typing
from fonana_ws.protocol import envelope as env
from fonana_ws.stats import Stats

from .conftest import API_KEY, REDIS_URL, SECRET, Client, Server, clean_env, process_pair
from .unit.test_connection import FakeOutlet, FakeSocket

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def path(user: str) -> str:
    return f"/api/users/{user}/disconnect"


async def closed_with(client: Client, timeout: float = 5.0) -> tuple[int, str]:
    """The close code and reason the server sent ``client`` (frames before the close are skipped)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await client.ws.recv()
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None, "closed without a close frame from the server"
        return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("unreachable")


async def connect(ws_url: str, user: str) -> Client:
    ws = await websockets.connect(f"{ws_url}?token={create_token(SECRET, user, 600)}", close_timeout=1)
    client = Client(ws)
    await client.recv_type("connected")
    return client


async def still_served(clients: list[Client], publish_url: str, user: str) -> None:
    """Each of ``clients`` (all ``user``'s) receives an event published to the user after the disconnect."""
    event = {"type": "earnings_updated", "marker": uuid.uuid4().hex}
    async with httpx.AsyncClient() as http:
        response = await http.post(
            publish_url + "/api/publish", json={"user": user, "event": event}, headers=AUTH
        )
    assert response.status_code == 202, response.text
    for client in clients:
        # Status frames of the disconnected user may come first (protocol §7.3): skip to the marker.
        while (frame := await client.recv()) != event:
            assert frame.get("type") != "earnings_updated", frame


# -- the hub's dispatch, no sockets --------------------------------------------------------------------


@pytest.mark.unit
async def test_the_hub_hands_each_control_kind_to_its_own_handler(caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker("memory://")
    hub = Hub(broker, Stats())
    await broker.connect()
    try:
        outlets = {user: [FakeOutlet(), FakeOutlet()] for user in ("ua", "ub")}
        for user, outs in outlets.items():
            for outlet in outs:
                await hub.add_connection(
                    Connection(FakeSocket(), user, hub.outbox, limit=1 << 20, outlet=outlet)
                )
        typing = Typing(hub, Stats())
        disconnect.install(hub)
        assert set(hub.controls) == {"typing", "disconnect"}

        claim = {"type": "typing", "userId": "ua", "conversationId": "c1", "to": "ub", "by": "elsewhere"}
        hub.on_message(env.user_channel("ua"), env.encode(claim, "e1", control="typing"))
        assert ("ua", "c1") in typing.states  # the typing claim reached the typing handler only
        assert all(not o.cuts for outs in outlets.values() for o in outs)

        for kind in ("future-kind", "future-kind"):
            hub.on_message(env.user_channel("ua"), env.encode({"type": kind}, "e2", control=kind))
        assert [r.getMessage() for r in caplog.records if "unknown kind" in r.getMessage()] == [
            "ignored control messages of unknown kind 'future-kind'"
        ]

        topic, message = disconnect.message("ua", "banned")
        assert topic == env.user_channel("ua")
        hub.on_message(topic, message)
        assert [o.cuts for o in outlets["ua"]] == [[(4003, DISCONNECTED)]] * 2
        assert [o.cuts for o in outlets["ub"]] == [[], []]
        assert all(not o.writes for outs in outlets.values() for o in outs)  # no socket saw a control
    finally:
        await hub.close(1012, "done")
        await broker.disconnect()


# -- one process -----------------------------------------------------------------------------------------


async def test_every_tab_of_the_user_closes_4003_and_nobody_else(server: Server) -> None:
    user, other = await server.user(), await server.user()
    tabs = [await server.connect(user) for _ in range(3)]
    others = [await server.connect(other) for _ in range(2)]
    response = await server.http.post(path(user), json={"reason": "banned"}, headers=AUTH)
    assert response.status_code == 202, response.text
    assert response.json() == {"ok": True, "userId": user}
    for tab in tabs:
        assert await closed_with(tab) == (4003, DISCONNECTED)
    await still_served(others, f"http://127.0.0.1:{server.port}", other)


async def test_no_body_or_an_empty_one_is_no_reason(server: Server) -> None:
    for content in (b"", b"{}", b'{"reason": ""}'):
        user = await server.user()
        tab = await server.connect(user)
        response = await server.http.post(path(user), content=content, headers=AUTH)
        assert response.status_code == 202, (content, response.text)
        assert await closed_with(tab) == (4003, DISCONNECTED)


async def test_a_user_without_connections_is_202(server: Server) -> None:
    response = await server.http.post(path("nobody-" + uuid.uuid4().hex[:8]), headers=AUTH)
    assert response.status_code == 202 and response.json()["ok"] is True


async def test_the_route_needs_the_api_key_and_a_sound_body(server: Server) -> None:
    user = await server.user()
    tab = await server.connect(user)
    assert (await server.http.post(path(user))).status_code == 401
    wrong = await server.http.post(path(user), headers={"Authorization": "Bearer wrong-" + API_KEY})
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
    for body, words in [
        ({"reason": "r" * (MAX_REASON + 1)}, f"at most {MAX_REASON} characters"),
        ({"reason": None}, "reason must be a string"),
        ({"reason": 5}, "reason must be a string"),
        (["banned"], "body must be a JSON object"),
    ]:
        response = await server.http.post(path(user), json=body, headers=AUTH)
        assert response.status_code == 400, (body, response.text)
        assert words in response.json()["error"], (body, response.json())
    bad_json = await server.http.post(path(user), content=b"{", headers=AUTH)
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
    too_long_id = await server.http.post(path("u" * 201), headers=AUTH)
    assert too_long_id.status_code == 400
    # None of these closed anything.
    await tab.send({"type": "ping"})
    assert (await tab.recv())["type"] == "pong"
    assert (
        await server.http.post(path(user), json={"reason": "r" * MAX_REASON}, headers=AUTH)
    ).status_code == 202
    assert await closed_with(tab) == (4003, DISCONNECTED)


# -- two processes over Redis ------------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_every_connection_of_the_user_on_both_processes_closes(tmp_path: Path) -> None:
    async with process_pair(tmp_path) as (procs, db):
        u, v = f"u-{uuid.uuid4().hex[:8]}", f"v-{uuid.uuid4().hex[:8]}"
        for user in (u, v):
            await demo.insert_user(db, user)
        u_tabs = [await connect(procs[i].ws_url, u) for i in (0, 0, 1)]
        v_tabs = [await connect(procs[i].ws_url, v) for i in (0, 1)]
        async with httpx.AsyncClient() as http:
            response = await http.post(
                procs[1].http_url + path(u), json={"reason": "password changed"}, headers=AUTH
            )
        assert response.status_code == 202, response.text
        for tab in u_tabs:
            assert await closed_with(tab) == (4003, DISCONNECTED)
        await still_served(v_tabs, procs[1].http_url, v)
        await asyncio.sleep(0.2)  # the log lines of the closes
        token = create_token(SECRET, u, 600)
        # One lifecycle line per connection closed, on the process that held it, with the reason.
        lines = {
            i: [x for x in proc.log().splitlines() if " server disconnect " in x]
            for i, proc in enumerate(procs)
        }
        assert [len(lines[0]), len(lines[1])] == [2, 1], lines
        assert all(f"user={u} " in x and 'reason="password changed"' in x for x in lines[0] + lines[1]), lines
        assert not any(token in proc.log() for proc in procs)


# -- the CLI ---------------------------------------------------------------------------------------------


async def fonana_ws(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``python -m fonana_ws ARGS`` without blocking the loop the test server runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fonana_ws",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_cli_disconnects_over_http(server: Server, tmp_path: Path) -> None:
    user, other = await server.user(), await server.user()
    tabs = [await server.connect(user) for _ in range(2)]
    bystander = await server.connect(other)
    url = ["--url", f"http://127.0.0.1:{server.port}"]
    code, out, err = await fonana_ws(
        "disconnect",
        "--user",
        user,
        "--reason",
        "banned",
        *url,
        cwd=tmp_path,
        env=clean_env(WS_API_KEY=API_KEY),
    )
    assert code == 0, (out, err)
    assert orjson.loads(out) == {"ok": True, "userId": user}
    for tab in tabs:
        assert await closed_with(tab) == (4003, DISCONNECTED)
    await still_served([bystander], f"http://127.0.0.1:{server.port}", other)

    code, out, err = await fonana_ws(
        "disconnect", "--user", other, *url, cwd=tmp_path, env=clean_env(WS_API_KEY="wrong-" + API_KEY)
    )
    assert code == 1 and "401" in err and "API key" in err, (out, err)
    code, out, err = await fonana_ws(
        "disconnect",
        "--user",
        other,
        "--reason",
        "r" * (MAX_REASON + 1),
        *url,
        cwd=tmp_path,
        env=clean_env(WS_API_KEY=API_KEY),
    )
    assert code == 2 and "--reason" in err, (out, err)
    await still_served([bystander], f"http://127.0.0.1:{server.port}", other)


@pytest.mark.timeout(90)
async def test_the_cli_disconnects_through_the_broker(tmp_path: Path) -> None:
    async with process_pair(tmp_path) as (procs, db):
        user = f"u-{uuid.uuid4().hex[:8]}"
        await demo.insert_user(db, user)
        tabs = [await connect(proc.ws_url, user) for proc in procs]
        env = clean_env(BROADCAST_URL=REDIS_URL, JWT_SECRET=SECRET, FONANA_WS_DATA_DIR=str(tmp_path / "cli"))
        code, out, err = await fonana_ws("disconnect", "--user", user, "--broker", cwd=tmp_path, env=env)
        assert code == 0, (out, err)
        for tab in tabs:
            assert await closed_with(tab) == (4003, DISCONNECTED)
        memory = clean_env(JWT_SECRET=SECRET, FONANA_WS_DATA_DIR=str(tmp_path / "cli"))
        code, out, err = await fonana_ws("disconnect", "--user", user, "--broker", cwd=tmp_path, env=memory)
        assert code == 2 and "memory://" in err, (out, err)
