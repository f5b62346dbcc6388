"""The live console (``/console``), in a real browser: Debian's Chromium over the DevTools protocol.

The page is driven as a person would use it (fields filled, buttons clicked) and read back through what
it shows and through ``window.fonanaConsole`` (the frames it logged, the closes it saw, its charts'
series). The test writes a screenshot of each tab into docs/screenshots/, which the README shows.
The page's connection is the browser client (clients/js), served as a copy of its one-file build.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fonana_ws.auth import create_token
from fonana_ws.config import load_settings

from .browser_harness import JS_TIMEOUT, Browser, Page, js, launch
from .conftest import (
    API_KEY,
    REDIS_URL,
    SECRET,
    Server,
    make_settings,
    need_service,
    redis_reachable,
    running,
)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "screenshots"
CLIENT_BUILD = ROOT / "clients" / "js" / "dist" / "fonana.iife.min.js"
CONSOLE_COPY = ROOT / "src" / "fonana_ws" / "web" / "console" / "fonana.iife.min.js"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with launch() as found:
        yield found


@pytest.fixture(scope="module")
async def console_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    """The embedded default (SQLite, memory broker, demo users): the console is on without being asked."""
    settings = make_settings(tmp_path_factory.mktemp("console"), None)
    assert settings.console, "the embedded default must turn the console on"
    async with running(settings) as srv:
        yield srv


async def until(page: Page, expression: str, what: str) -> Any:
    """Poll ``expression`` in the page until it is truthy; its value."""
    deadline = time.monotonic() + JS_TIMEOUT
    while True:
        value = await page.eval(expression)
        if value:
            return value
        assert time.monotonic() < deadline, f"the page did not show {what}: {expression} -> {value!r}"
        await asyncio.sleep(0.05)


async def fill(page: Page, field: str, value: str) -> None:
    await page.eval(f"document.getElementById({js(field)}).value = {js(value)}, true")


async def click(page: Page, button: str) -> None:
    assert await page.eval(f"(b => (b.click(), !b.disabled || true))(document.getElementById({js(button)}))")


def frames_in(direction: str) -> str:
    """JavaScript: the parsed frames the page logged in ``direction``."""
    return f"fonanaConsole.frames.filter(f => f.direction === {js(direction)}).map(f => JSON.parse(f.text))"


async def test_console_client_and_server_tabs(console_server: Server, browser: Browser) -> None:
    srv = console_server
    page = await browser.new_page(f"http://127.0.0.1:{srv.port}/console")
    try:
        await until(page, "window.fonanaConsole && fonanaConsole.samples >= 1", "a first /stats sample")
        assert await page.eval("typeof Fonana.FonanaRealtime === 'function'"), "the client did not load"
        connections_before = await page.eval("fonanaConsole.charts.connections[0].slice(-1)[0]")

        # Mint (embedded default, loopback), connect, subscribe.
        await fill(page, "mint-user", "demo-subscriber")
        await click(page, "mint")
        token = await until(page, "document.getElementById('token').value", "a minted token")
        assert token.count(".") == 2
        await click(page, "connect")
        connected = await until(
            page, f"{frames_in('in')}.find(f => f.type === 'connected')", "the connected frame"
        )
        assert connected["data"]["userId"] == "demo-subscriber"
        await fill(page, "channel-type", "post")
        await fill(page, "channel-id", "demo-post-locked")
        await click(page, "subscribe")
        await until(page, f"{frames_in('in')}.find(f => f.type === 'subscribed')", "the subscribed frame")
        assert "post_demo-post-locked" in await page.eval("document.getElementById('subscribed').textContent")
        await click(page, "ping")
        await until(page, f"{frames_in('in')}.find(f => f.type === 'pong')", "the pong")
        await click(page, "presence")
        who = await until(page, f"{frames_in('in')}.find(f => f.type === 'presence')", "the presence reply")
        assert who["data"]["channelKey"] == "post_demo-post-locked"
        await click(page, "typing-on")
        await click(page, "typing-off")
        out = await page.eval(frames_in("out"))
        assert [f["type"] for f in out] == ["subscribe", "ping", "presence", "typing", "typing"]
        assert out[3] == {"type": "typing", "conversationId": "demo-conversation", "isTyping": True}
        sizes = await page.eval(
            "fonanaConsole.frames.map(f => [f.size, new TextEncoder().encode(f.text).length])"
        )
        assert sizes and all(size == real for size, real in sizes)

        # An event published over HTTP by the web app (here: the test) ...
        response = await srv.publish(
            {
                "channel": "post_demo-post-locked",
                "event": {"type": "post_liked", "postId": "demo-post-locked", "likesCount": 7},
            }
        )
        assert response.status_code == 202, response.text
        liked = f"{frames_in('in')}.find(f => f.type === 'post_liked' && f.likesCount === %d)"
        await until(page, liked % 7, "the event published over HTTP")
        # ... and one the page publishes itself, with the API key typed into it.
        await fill(page, "api-key", API_KEY)
        await fill(page, "publish-channel", "post_demo-post-locked")
        await fill(
            page, "publish-event", '{"type": "post_liked", "postId": "demo-post-locked", "likesCount": 8}'
        )
        await click(page, "publish")
        await until(page, liked % 8, "the event the page published")
        # The event can reach the socket before the page has read the HTTP reply: wait for the reply too.
        reply = "document.getElementById('publish-result').textContent"
        result = await until(page, reply, "the publish reply")
        assert result.startswith("202"), result
        assert API_KEY not in await page.eval(
            "location.href + document.cookie + JSON.stringify(sessionStorage)"
        )
        shot = await page.screenshot(SHOTS / "console-client.png", height=900)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # The server tab: the charts move (this connection arrived), the top channel is ours.
        await click(page, "tab-server")
        await until(
            page,
            f"fonanaConsole.charts.connections[0].slice(-1)[0] === {connections_before + 1}",
            "the connection on the chart",
        )
        delivered = await until(
            page, "fonanaConsole.charts.deliveries[0].some(v => v > 0)", "deliveries per second above 0"
        )
        assert delivered
        samples = await page.eval("fonanaConsole.samples")
        await until(page, f"fonanaConsole.samples > {samples}", "a later sample (once a second)")
        top = await page.eval("document.getElementById('top-channels').textContent")
        assert "post_demo-post-locked" in top
        assert "memory up" in await page.eval("document.getElementById('processes').textContent")
        await until(page, "fonanaConsole.charts.latency[0].some(v => v !== null)", "a publish latency")
        await until(page, "fonanaConsole.samples >= 6", "a few seconds of samples (for the screenshot)")
        shot = await page.screenshot(SHOTS / "console-server.png", height=900)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # Unsubscribe goes through the client: the server's answer, and the chip is gone.
        await click(page, "tab-client")
        await click(page, "unsubscribe")
        await until(page, f"{frames_in('in')}.find(f => f.type === 'unsubscribed')", "the unsubscribed frame")
        assert (await page.eval(frames_in("out")))[-1] == {
            "type": "unsubscribe",
            "channel": {"type": "post", "postId": "demo-post-locked"},
        }
        assert await page.eval("document.getElementById('subscribed').textContent") == ""

        # A refusal: the close code and reason are shown, and the client does not try again.
        await click(page, "disconnect")
        await until(page, "fonanaConsole.closes.length === 1", "the first close")
        await fill(page, "token", "not-a-token")
        await click(page, "connect")
        close = await until(page, "fonanaConsole.closes[1]", "the refusal")
        assert close["code"] == 1008, close
        assert close["reason"], close
        shown = await page.eval("document.getElementById('socket-state').textContent")
        assert shown == f"closed: 1008 {close['reason']}"
        assert close["willReconnect"] is False, close
        assert not await page.eval("document.getElementById('connect').disabled")
        assert page.problems() == [], page.problems()
    finally:
        await page.close()


async def test_console_shows_the_clients_reconnect_then_its_stop(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A 2 s token: the server closes 4001, the client reconnects at once by itself (the page says so),
    with the same token, now refused with 1008, after which the client stops (no retry loop)."""
    settings = make_settings(tmp_path_factory.mktemp("console-expiry"), None, JWT_LEEWAY="0")
    async with running(settings) as srv:
        page = await browser.new_page(f"http://127.0.0.1:{srv.port}/console")
        try:
            await until(page, "window.fonanaConsole", "the page")
            await fill(page, "token", create_token(SECRET, "demo-subscriber", 2))
            await click(page, "connect")
            expired = await until(page, "fonanaConsole.closes[0]", "the expiry close")
            assert expired == {"code": 4001, "reason": "Token expired", "willReconnect": True}, expired
            refused = await until(page, "fonanaConsole.closes[1]", "the refused reconnect")
            assert refused["code"] == 1008 and refused["willReconnect"] is False, refused
            connects = await page.eval(f"{frames_in('in')}.filter(f => f.type === 'connected').length")
            assert connects == 1  # the reconnect was made, and refused before a connected frame
            notes = await page.eval(
                "fonanaConsole.frames.filter(f => f.direction === 'note').map(f => f.text)"
            )
            assert any("the client reconnects in" in n for n in notes), notes
            shown = await page.eval("document.getElementById('socket-state').textContent")
            assert shown == f"closed: 1008 {refused['reason']}"
            assert not await page.eval("document.getElementById('connect').disabled")
            assert page.problems() == [], page.problems()
        finally:
            await page.close()


async def test_console_files_and_token_route(console_server: Server) -> None:
    http = console_server.http
    page = await http.get("/console")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name in ("console.js", "charts.js", "socket.js", "console.css"):
        assert (await http.get(f"/console/{name}")).status_code == 200
    client = await http.get("/console/fonana.iife.min.js")
    assert client.status_code == 200 and client.headers["content-type"].startswith("text/javascript")
    assert client.content == CLIENT_BUILD.read_bytes()  # what the browser runs is the client's build
    assert (await http.get("/console/index.html")).status_code == 404  # only the listed files
    assert (await http.get("/console/..%2Fconsole.py")).status_code == 404
    minted = await http.post("/console/token", json={"userId": "demo-creator"})
    assert minted.status_code == 200 and minted.json()["expiresIn"] == 1800
    assert (await http.post("/console/token", json={"userId": ""})).status_code == 400
    proxied = await http.post(
        "/console/token", json={"userId": "demo-creator"}, headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert proxied.status_code == 403  # forwarded by a proxy: not loopback's own request


async def test_console_is_off_unless_asked_outside_the_embedded_default(tmp_path: Path) -> None:
    base = {"FONANA_WS_DATA_DIR": str(tmp_path), "JWT_SECRET": "s" * 32}
    assert load_settings(base, env_file=None).console is True
    assert (
        load_settings({**base, "BROADCAST_URL": "redis://127.0.0.1:6379/0"}, env_file=None).console is False
    )
    assert load_settings({**base, "DATABASE_URL": "postgresql://x@h/db"}, env_file=None).console is False
    assert load_settings({**base, "WS_CONSOLE": "0"}, env_file=None).console is False
    on = load_settings(
        {**base, "BROADCAST_URL": "redis://127.0.0.1:6379/0", "WS_CONSOLE": "1"}, env_file=None
    )
    assert on.console is True

    async with running(make_settings(tmp_path, None, WS_CONSOLE="0")) as srv:
        assert (await srv.http.get("/console")).status_code == 404
        assert (await srv.http.post("/console/token", json={"userId": "demo-creator"})).status_code == 404


async def test_console_shows_the_processes_behind_a_shared_broker(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two processes on one Redis: each one's console lists the other, asked over the broker."""
    if (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    env = {"BROADCAST_URL": REDIS_URL, "WS_CONSOLE": "1"}
    a_settings = make_settings(tmp_path_factory.mktemp("console-a"), None, **env)
    b_settings = make_settings(tmp_path_factory.mktemp("console-b"), None, **env)
    async with running(a_settings) as a, running(b_settings) as b:
        await b.connect("demo-creator")
        page = await browser.new_page(f"http://127.0.0.1:{a.port}/console")
        try:
            b_id = f":{b.port}"
            row = await until(
                page,
                f"(fonanaConsole.processes || [])"
                f".find(p => p.id.endsWith({js(b_id)}) && p.connections === 1)",
                "the other process, with its connection",
            )
            assert row["self"] is False and row["broker"] == "redis" and row["up"] is True
            mine = await page.eval("fonanaConsole.processes[0]")
            assert mine["self"] is True and mine["id"].endswith(f":{a.port}")
            assert b_id in await page.eval("document.getElementById('processes').textContent")
            assert page.problems() == [], page.problems()
        finally:
            await page.close()


@pytest.mark.unit
def test_console_ships_the_client_build_byte_for_byte() -> None:
    """The console's copy of the browser client is clients/js's build, not a fork of it."""
    assert CLIENT_BUILD.exists(), "clients/js/dist is missing: run `npm run build` in clients/js"
    assert CONSOLE_COPY.exists(), "the console's client is missing: run `npm run build` in clients/js"
    assert CONSOLE_COPY.read_bytes() == CLIENT_BUILD.read_bytes(), (
        "src/fonana_ws/web/console/fonana.iife.min.js differs from clients/js/dist: "
        "run `npm run build` in clients/js (it copies the build)"
    )
