"""The browser client (clients/js) in real Chromium against real servers: recovery across a server
restart, a token refreshed before it expires, typing between two pages, and the adapter of the old client.

The page is the server's own /health origin with the built IIFE (dist/fonana.iife.min.js) evaluated in it,
so no static server is needed. The dist must match src: the test rebuilds into a temporary file and
compares (or, without node_modules, compares modification times).
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import databases
import httpx
import pytest

from fonana_ws.auth import create_token
from fonana_ws.db import create_schema, demo

from .browser_harness import Browser, Page, js, launch
from .conftest import API_KEY, SECRET, ServerProcess, fresh_pg_database, make_settings, running

CLIENT = Path(__file__).resolve().parent.parent / "clients" / "js"
IIFE = CLIENT / "dist" / "fonana.iife.min.js"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def built_client() -> str:
    """The IIFE build, failing clearly when it is missing or older than src."""
    assert IIFE.exists(), "clients/js/dist is missing: run `npm run build` in clients/js (./dev test does)"
    esbuild = CLIENT / "node_modules" / ".bin" / "esbuild"
    if esbuild.exists():
        fresh = subprocess.run(
            [str(esbuild), "src/browser.ts", "--bundle", "--minify", "--format=iife", "--global-name=Fonana"],
            cwd=CLIENT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        assert fresh == IIFE.read_bytes(), (
            "clients/js/dist is stale vs src: run `npm run build` in clients/js"
        )
    else:
        newest = max(p.stat().st_mtime for p in (CLIENT / "src").glob("*.ts"))
        assert IIFE.stat().st_mtime >= newest, "clients/js/dist is older than src: run `npm run build`"
    return IIFE.read_text()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with launch() as b:
        yield b


async def client_page(browser: Browser, http_url: str) -> Page:
    page = await browser.new_page(f"{http_url}/health", built_client())
    assert await page.eval("typeof Fonana.FonanaRealtime") == "function"
    return page


EXPECTED = (
    "favicon.ico",
    "ERR_CONNECTION_REFUSED",
)  # the page's own 404 icon; dials while the server is down


def unexpected(page: Page) -> list[str]:
    """What the page logged or threw, apart from what a reconnect test must cause."""
    return [p for p in page.problems() if not any(e in p for e in EXPECTED)]


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def wait_js(page: Page, condition: str, timeout: float = 10.0) -> None:
    """Poll a JavaScript condition in the page (the page's state, not a sleep, decides)."""
    await page.eval(
        f"""new Promise((ok, fail) => {{ const t0 = Date.now(); const f = () => {{
             if ({condition}) return ok(true);
             if (Date.now() - t0 > {timeout * 1000}) return fail(new Error('timeout: ' + {js(condition)}));
             setTimeout(f, 20); }}; f(); }})""",
        timeout=timeout + 5,
    )


async def test_restart_mid_stream_recovers_in_order_without_duplicates(
    tmp_path: Path, browser: Browser
) -> None:
    async with fresh_pg_database() as db_url:
        db = databases.Database(db_url)
        await db.connect()
        try:
            await create_schema(db)
            user, creator = uid("u"), uid("c")
            await demo.insert_user(db, user)
            await demo.insert_user(db, creator, is_creator=True)
            post = uid("p")
            await demo.insert_post(db, post, creator)
            # PostgreSQL as broker: the history (§7.8) survives the process, so recovery spans a restart.
            env = {
                "JWT_SECRET": SECRET,
                "WS_API_KEY": API_KEY,
                "DATABASE_URL": db_url,
                "BROADCAST_URL": db_url,
            }
            first = ServerProcess(env, tmp_path / "a")
            port = first.port
            token = create_token(SECRET, user, 600)
            async with httpx.AsyncClient(timeout=10) as http:

                async def publish(url: str, numbers: range) -> None:
                    for n in numbers:
                        body = {"channel": f"post_{post}", "event": {"type": "tick", "n": n}}
                        answer = await http.post(f"{url}/api/publish", json=body, headers=AUTH)
                        assert answer.status_code == 202, answer.text

                async with first:
                    page = await client_page(browser, first.http_url)
                    await page.eval(
                        f"""window.got = []; window.rec = []; window.downs = 0;
                        window.c = new Fonana.FonanaRealtime({{url: {js(first.ws_url)},
                          getToken: () => {js(token)},
                          backoff: {{base: 100, cap: 500}}}});
                        c.on('disconnected', () => downs++);
                        c.subscribe({{type: 'post', postId: {js(post)}}}, {{
                          onEvent: (e) => got.push(e.n), onRecovery: (r) => rec.push(r)}});
                        new Promise((ok) => c.on('subscribed', ok))"""
                    )
                    await publish(first.http_url, range(0, 5))
                    await wait_js(page, "got.length === 5")
                # the server is gone: publish what the page misses once it is back, then the page reconnects
                await wait_js(page, "downs >= 1")
                async with ServerProcess(env, tmp_path / "b", port=port) as second:
                    await publish(second.http_url, range(5, 10))
                    await wait_js(page, "rec.length === 1 && got.length >= 10")
                    await publish(second.http_url, range(10, 12))
                    await wait_js(page, "got.length >= 12")
                    assert await page.eval("got") == list(range(12))
                    assert await page.eval("rec") == [True]
                    assert unexpected(page) == [], unexpected(page)
                    await page.eval("c.close()")
                    await page.close()
        finally:
            await db.disconnect()


async def test_short_token_is_refreshed_without_disconnect(tmp_path: Path, browser: Browser) -> None:
    async with running(make_settings(tmp_path, None, JWT_LEEWAY="0")) as srv:
        user = await srv.user()
        tokens = [create_token(SECRET, user, 3)] + [
            create_token(SECRET, user, 3 + 2 * i) for i in range(1, 6)
        ]
        page = await client_page(browser, f"http://127.0.0.1:{srv.port}")
        await page.eval(
            f"""window.tokens = {js(tokens)}; window.refreshed = 0; window.downs = 0; window.ups = 0;
            window.c = new Fonana.FonanaRealtime({{url: {js(srv.ws_url)}, getToken: () => tokens.shift(),
              refreshMargin: 1500}});
            c.on('connected', () => ups++); c.on('disconnected', () => downs++);
            c.on('refreshed', () => refreshed++); true"""
        )
        await wait_js(page, "refreshed >= 2", timeout=12)  # past the first token's 3 s (leeway 0)
        assert await page.eval("[ups, downs]") == [1, 0]
        await page.eval("c.close()")
        assert unexpected(page) == [], unexpected(page)
        await page.close()


async def test_typing_between_two_pages(tmp_path: Path, browser: Browser) -> None:
    async with running(make_settings(tmp_path, None)) as srv:
        a, b = await srv.user("a"), await srv.user("b")
        conv = await srv.conversation(a, b)
        origin = f"http://127.0.0.1:{srv.port}"
        pages = []
        for user in (a, b):
            page = await client_page(browser, origin)
            await page.eval(
                f"""window.typing = []; window.c = new Fonana.FonanaRealtime({{url: {js(srv.ws_url)},
                  getToken: () => {js(srv.token(user))}}});
                c.subscribe({{type: 'conversation', id: {js(conv)}}}, {{onEvent: (e) => {{
                  if (e.type === 'typing') typing.push([e.userId, e.isTyping]); }}}});
                new Promise((ok) => c.on('subscribed', ok))"""
            )
            pages.append(page)
        # many keystrokes: the client sends one true, the server relays it once
        sent = await pages[0].eval(f"[1,2,3,4,5].map(() => c.typing({js(conv)})).filter(Boolean).length")
        assert sent == 1
        await wait_js(pages[1], "typing.length === 1")
        await pages[0].eval(f"c.typing({js(conv)}, false)")
        await wait_js(pages[1], "typing.length === 2")
        assert await pages[1].eval("typing") == [[a, True], [a, False]]
        assert await pages[0].eval("typing") == []
        for page in pages:
            await page.eval("c.close()")
            assert unexpected(page) == [], unexpected(page)
            await page.close()


async def test_adapter_runs_the_old_clients_scenarios(tmp_path: Path, browser: Browser) -> None:
    async with running(make_settings(tmp_path, None)) as srv:
        user, creator = await srv.user(), await srv.user("c", creator=True)
        post = await srv.post(creator)
        page = await client_page(browser, f"http://127.0.0.1:{srv.port}")
        await page.eval(
            f"""window.seen = {{}}; window.svc = new Fonana.WebSocketService({{url: {js(srv.ws_url)}}});
            for (const t of ['connected', 'subscribed', 'notification', 'feed_update', 'post_created',
                             'post_liked', 'comment_added'])
              svc.on(t, (d) => {{ (seen[t] = seen[t] || []).push(d); }});
            svc.connect({js(srv.token(user))});
            svc.subscribeToNotifications({js(user)}); svc.subscribeToFeed({js(user)});
            svc.subscribeToCreator({js(creator)}); svc.subscribeToPost({js(post)}); true"""
        )
        await wait_js(page, "svc.isConnected() && (seen.subscribed || []).length === 4")
        events = [
            ("notification", {"userId": user, "type": "SYSTEM_ANNOUNCEMENT", "title": "t", "message": "m"}),
            ("feed-update", {"userId": user, "posts": []}),
            ("post-liked", {"postId": post, "userId": user}),
            ("comment-added", {"postId": post, "comment": {"id": "k1", "userId": user, "content": "hi"}}),
            ("post-created", {"post": post}),
        ]
        for route, body in events:
            answer = await srv.http.post(f"/api/events/{route}", json=body, headers=AUTH)
            assert answer.status_code == 202, answer.text
        await wait_js(
            page,
            "['notification', 'feed_update', 'post_liked', 'comment_added', 'post_created']"
            ".every((t) => seen[t])",
        )
        assert await page.eval("seen.post_liked[0].postId") == post
        assert await page.eval("seen.post_created[0].creatorId") == creator
        await page.eval("svc.disconnect()")
        assert unexpected(page) == [], unexpected(page)
        await page.close()


async def test_dist_is_fresh() -> None:
    await asyncio.to_thread(built_client)
