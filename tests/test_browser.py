"""End to end with a real browser: headless Chromium, driven over the Chrome DevTools Protocol.

The page's own ``WebSocket`` talks to the in-process server (``server`` fixture: SQLite and PostgreSQL),
exactly as Fonana's browser client does: token in the query string, ``subscribe`` sent from ``onopen``
before ``connected`` arrives, refusals read from ``CloseEvent.code`` / ``CloseEvent.reason``.

Chromium is Debian's package (``/usr/bin/chromium``), installed by ``./dev setup`` (CI runs it); without
it these tests skip with the reason, or fail under FONANA_WS_REQUIRE_SERVICES=1. One
browser serves the whole module; every page is a fresh tab on the server's own loopback origin. Nothing
listens beyond 127.0.0.1, and the browser and its profile directory are removed at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from fonana_ws.auth import create_token

from .browser_harness import JS_TIMEOUT, Browser, Page, js, launch
from .conftest import ANY_ISO, API_KEY, Server, without_history

pytestmark = pytest.mark.timeout(720)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the module (tests/browser_harness.py)."""
    async with launch() as found:
        yield found


@pytest.fixture
async def tabs(browser: Browser, server: Server) -> AsyncIterator[Callable[[], Any]]:
    """``await tabs()``: a new tab on the server's own origin (as nginx serves app and /ws together)."""
    opened: list[Page] = []

    async def open_tab() -> Page:
        page = await browser.new_page(f"http://127.0.0.1:{server.port}/health", SOCKET_HELPERS)
        opened.append(page)
        return page

    yield open_tab
    for page in opened:
        try:
            await page.close()
        except (AssertionError, ConnectionError, TimeoutError):
            pass  # the test closed it already, or the browser is gone


# -- What the page runs -------------------------------------------------------------------------------------

# fwsOpen(name, url, frames): a WebSocket like the Fonana client's, sending `frames` from onopen; its state
# (every message parsed, the close event) is kept in window.fws[name] for the test to read.
SOCKET_HELPERS = """
window.fws = {};
window.fwsSockets = {};
window.fwsOpen = (name, url, frames) => {
  const state = {opened: false, messages: [], closed: null, errored: false};
  window.fws[name] = state;
  const ws = new WebSocket(url);
  window.fwsSockets[name] = ws;
  ws.onopen = () => {
    state.opened = true;
    for (const frame of frames) ws.send(JSON.stringify(frame));
  };
  ws.onmessage = (event) => state.messages.push(JSON.parse(event.data));
  ws.onerror = () => { state.errored = true; };
  ws.onclose = (event) => {
    state.closed = {code: event.code, reason: event.reason, wasClean: event.wasClean};
  };
  return true;
};
true
"""


def socket_url(server: Server, token: str) -> str:
    """JavaScript that builds the client's URL, the token URL-encoded as the client does."""
    return f"{js(server.ws_url + '?token=')} + encodeURIComponent({js(token)})"


async def open_socket(page: Page, server: Server, name: str, token: str, frames: list[Any]) -> None:
    assert await page.eval(f"fwsOpen({js(name)}, {socket_url(server, token)}, {js(frames)})") is True


async def socket_state(page: Page, name: str) -> dict[str, Any]:
    """The page's socket ``name``: its messages (without their history fields, ``without_history``)."""
    state = await page.eval(f"window.fws[{js(name)}]")
    if isinstance(state, dict) and isinstance(state.get("messages"), list):
        state["messages"] = [without_history(m) for m in state["messages"]]
    return state


async def wait_messages(page: Page, name: str, count: int) -> list[dict[str, Any]]:
    """Poll the page until the socket ``name`` has received at least ``count`` messages."""
    deadline = time.monotonic() + JS_TIMEOUT
    while True:
        state = await socket_state(page, name)
        if len(state["messages"]) >= count:
            return state["messages"]
        assert state["closed"] is None, f"{name} closed after {state['messages']}: {state['closed']}"
        assert time.monotonic() < deadline, f"{name} received {state['messages']}, expected {count} messages"
        await asyncio.sleep(0.05)


def connected(user_id: str) -> dict[str, Any]:
    return {
        "type": "connected",
        "data": {
            "userId": user_id,
            "message": "Successfully connected to WebSocket server",
            "expiresAt": ANY_ISO,
        },
    }


async def publish(server: Server, body: dict[str, Any]) -> None:
    response = await server.publish(body)
    assert response.status_code == 202, response.text


async def send_frame(page: Page, name: str, frame: dict[str, Any]) -> None:
    """The page's socket ``name`` sends ``frame``, as the client does from its input handlers."""
    assert await page.eval(f"window.fwsSockets[{js(name)}].send(JSON.stringify({js(frame)})), true") is True


# -- Tests --------------------------------------------------------------------------------------------------


async def test_browser_subscribes_on_open_and_receives_a_post_event(server: Server, tabs: Any) -> None:
    """The client's real flow: subscribe from onopen (before `connected`), then a published event arrives."""
    creator = await server.user("creator", creator=True)
    fan = await server.user("fan")
    post = await server.post(creator)
    page = await tabs()
    channel = {"type": "post", "postId": post}
    await open_socket(page, server, "live", server.token(fan), [{"type": "subscribe", "channel": channel}])

    assert await wait_messages(page, "live", 2) == [
        connected(fan),
        {"type": "subscribed", "data": {"channel": channel, "channelKey": f"post_{post}"}},
    ]
    event = {"type": "post_liked", "postId": post, "userId": creator, "likesCount": 7}
    await publish(server, {"channel": f"post_{post}", "event": event})

    messages = await wait_messages(page, "live", 3)
    assert messages[2] == event
    await asyncio.sleep(0.3)
    state = await socket_state(page, "live")
    assert len(state["messages"]) == 3, f"delivered more than once: {state['messages']}"
    assert state["opened"] and state["closed"] is None and not state["errored"], state


async def test_browser_sees_refusals_as_1008_with_distinct_reasons(server: Server, tabs: Any) -> None:
    """Forged and expired tokens: accepted, then closed 1008 `Unauthorized...`, each naming its cause."""
    user = await server.user("refused")
    post = await server.post(await server.user("creator", creator=True))
    forged = create_token("not-the-server-secret-" + "z" * 32, user, 600)
    expired = server.token(user, expires=-3600)
    page = await tabs()
    frame = {"type": "subscribe", "channel": {"type": "post", "postId": post}}
    results = await page.eval(
        f"""
        (() => {{
          const attempt = (url) => new Promise((resolve) => {{
            const seen = {{opened: false, messages: []}};
            const ws = new WebSocket(url);
            ws.onopen = () => {{ seen.opened = true; ws.send(JSON.stringify({js(frame)})); }};
            ws.onmessage = (event) => seen.messages.push(event.data);
            ws.onclose = (event) => resolve({{...seen, code: event.code, reason: event.reason}});
            setTimeout(() => {{
              resolve({{...seen, code: null, reason: "no close event in {int(JS_TIMEOUT)} s"}});
              ws.close();
            }}, {int(JS_TIMEOUT * 1000)});
          }});
          return Promise.all([attempt({socket_url(server, forged)}), attempt({socket_url(server, expired)})]);
        }})()
        """
    )
    forged_close, expired_close = results
    for close in results:
        assert close["opened"], f"the browser must see accept-then-close, not a failed handshake: {results}"
        assert close["code"] == 1008, results
        assert close["reason"].startswith("Unauthorized"), results
        assert close["messages"] == [], f"a refused socket received frames: {results}"
    assert forged_close["reason"] != expired_close["reason"], results
    assert "expired" in expired_close["reason"].lower(), results
    assert "expired" not in forged_close["reason"].lower(), results


async def test_two_tabs_of_one_user_both_receive_a_notification(server: Server, tabs: Any) -> None:
    """Every tab of the user gets a user-directed event; another user's tab does not; closing one tab
    leaves the other receiving."""
    user = await server.user("tabs")
    other = await server.user("other")
    first, second = await tabs(), await tabs()
    await open_socket(first, server, "mine", server.token(user), [])
    await open_socket(second, server, "mine", server.token(user), [])
    await open_socket(second, server, "theirs", server.token(other), [])
    for page, name, owner in ((first, "mine", user), (second, "mine", user), (second, "theirs", other)):
        assert await wait_messages(page, name, 1) == [connected(owner)]

    def notification(n: int) -> dict[str, Any]:
        return {
            "type": "notification",
            "userId": user,
            "notification": {
                "id": f"n-{n}-{user}",
                "userId": user,
                "type": "SYSTEM_ANNOUNCEMENT",
                "title": f"Hello {n}",
                "message": "From the browser test",
                "isRead": False,
                "metadata": None,
                "createdAt": "2025-01-01T00:00:00.000Z",
            },
        }

    await publish(server, {"user": user, "event": notification(1)})
    assert (await wait_messages(first, "mine", 2))[1] == notification(1)
    assert (await wait_messages(second, "mine", 2))[1] == notification(1)

    await first.close()  # the tab goes away with its socket; the other tab must not notice
    await publish(server, {"user": user, "event": notification(2)})
    assert await wait_messages(second, "mine", 3) == [connected(user), notification(1), notification(2)]
    await asyncio.sleep(0.3)
    assert (await socket_state(second, "theirs"))["messages"] == [connected(other)]
    assert len((await socket_state(second, "mine"))["messages"]) == 3


async def test_browser_pair_types_and_messages(server: Server, tabs: Any) -> None:
    """A types in a conversation: B sees `typing` true, then false when A's message is published (the web
    app's call, as for its /api/messages route); the message reaches B's conversation channel and B's other
    tab, once each, and A's own tab through the channel only, with no typing frame of A's own."""
    alice, bob = await server.user("alice"), await server.user("bob")
    conversation = await server.conversation(alice, bob)
    channel = {"type": "conversation", "id": conversation}
    subscribed = {
        "type": "subscribed",
        "data": {"channel": channel, "channelKey": f"conversation_{conversation}"},
    }
    page_a, page_b, page_b_other = await tabs(), await tabs(), await tabs()
    await open_socket(
        page_a, server, "chat", server.token(alice), [{"type": "subscribe", "channel": channel}]
    )
    await open_socket(page_b, server, "chat", server.token(bob), [{"type": "subscribe", "channel": channel}])
    await open_socket(page_b_other, server, "other", server.token(bob), [])
    assert await wait_messages(page_a, "chat", 2) == [connected(alice), subscribed]
    assert await wait_messages(page_b, "chat", 2) == [connected(bob), subscribed]
    assert await wait_messages(page_b_other, "other", 1) == [connected(bob)]

    def typing(is_typing: bool) -> dict[str, Any]:
        return {"type": "typing", "conversationId": conversation, "userId": alice, "isTyping": is_typing}

    for _ in range(3):  # a keystroke each: one true is shown
        await send_frame(page_a, "chat", {"type": "typing", "conversationId": conversation, "isTyping": True})
    assert (await wait_messages(page_b, "chat", 3))[2] == typing(True)
    assert (await wait_messages(page_b_other, "other", 2))[1] == typing(True)

    body = {
        "conversationId": conversation,
        "message": {"id": f"m-{conversation}", "senderId": alice, "content": "Hi!"},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = await server.http.post("/api/events/new-message", json=body, headers=headers)
    assert response.status_code == 202, response.text
    message = response.json()["event"]
    assert message["message"]["content"] == "Hi!"

    def unordered(frames: list[dict[str, Any]]) -> list[bytes]:
        return sorted(orjson.dumps(f, option=orjson.OPT_SORT_KEYS) for f in frames)

    expected = unordered([message, typing(False)])
    assert unordered((await wait_messages(page_b, "chat", 5))[3:]) == expected
    assert unordered((await wait_messages(page_b_other, "other", 4))[2:]) == expected
    assert (await wait_messages(page_a, "chat", 3))[2] == message
    await asyncio.sleep(0.5)
    assert len((await socket_state(page_b, "chat"))["messages"]) == 5
    assert len((await socket_state(page_b_other, "other"))["messages"]) == 4
    assert len((await socket_state(page_a, "chat"))["messages"]) == 3, "A received typing or a duplicate"
