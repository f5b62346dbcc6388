"""``fonana-ws test-client``: talk to a running server as the browser and the web app would.

Every check is one row of the table; the exit code is 1 when any of them failed. Events it publishes go
to a channel made up for this run (``creator_fonana-ws-test-<nonce>``) and to the test user's own
connections, so that no real browser sees them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import orjson
import typer
import websockets
from rich.table import Table

from fonana_ws.auth import create_token
from fonana_ws.config import Settings

from .common import DatabaseProblem, err, find_open_post, find_user, open_store, out, settings_or_exit

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
TEST_EVENT = "fonana_ws_test"


class CheckFailed(Exception):
    pass


class Skipped(Exception):
    pass


def http_base(ws_url: str) -> str:
    """``ws://h:p/ws`` -> ``http://h:p``; ``wss://`` -> ``https://``."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None:
        raise typer.BadParameter(f"{ws_url!r} is not a ws:// or wss:// URL", param_hint="--url")
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def with_token(url: str, token: str | None) -> str:
    if token is None:
        return url
    return url + ("&" if "?" in url else "?") + "token=" + quote(token, safe="")


@dataclass
class Session:
    """One connection of the test user, and the frames it has not looked at yet."""

    ws: Any
    timeout: float

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def expect(self, what: str, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The next frame that ``match`` accepts (others, such as real events, are passed over)."""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckFailed(f"no {what} within {self.timeout:g} s")
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except TimeoutError:
                continue
            except websockets.ConnectionClosed as exc:
                raise CheckFailed(
                    f"connection closed while waiting for {what}: {describe_close(exc)}"
                ) from None
            try:
                frame = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise CheckFailed(f"a frame that is not JSON: {str(raw)[:80]}") from None
            if isinstance(frame, dict) and frame.get("type") == "error" and what.startswith("subscribed"):
                raise CheckFailed(f"refused: {frame.get('data', {}).get('message')}")
            if isinstance(frame, dict) and match(frame):
                return frame


def describe_close(exc: websockets.ConnectionClosed) -> str:
    if exc.rcvd is None:
        return "no close frame"
    return f"code {exc.rcvd.code} {exc.rcvd.reason!r}"


@dataclass
class Run:
    settings: Settings
    url: str
    http_url: str
    timeout: float
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    async def check(self, name: str, step: Callable[[], Awaitable[str]], *, needs: bool = True) -> bool:
        """Run one check; ``needs`` False marks it failed at once (what it depends on failed)."""
        if not needs:
            self.rows.append((name, FAIL, "not run: the connection failed"))
            return False
        try:
            detail = await asyncio.wait_for(step(), self.timeout * 3)
        except Skipped as exc:
            self.rows.append((name, SKIP, str(exc)))
            return True
        except CheckFailed as exc:
            self.rows.append((name, FAIL, str(exc)))
            return False
        except TimeoutError:
            self.rows.append((name, FAIL, f"no answer within {self.timeout * 3:g} s"))
            return False
        except Exception as exc:
            self.rows.append((name, FAIL, f"{type(exc).__name__}: {exc}"))
            return False
        self.rows.append((name, PASS, detail))
        return True

    def token(self, user: str, expires: float = 300) -> str:
        return create_token(self.settings.jwt_secret, user, expires)

    async def connect(self, token: str | None) -> Any:
        try:
            return await websockets.connect(
                with_token(self.url, token), open_timeout=self.timeout, close_timeout=1, max_size=None
            )
        except (OSError, TimeoutError) as exc:
            raise CheckFailed(f"cannot connect to {self.url}: {exc or type(exc).__name__}") from None
        except websockets.InvalidStatus as exc:
            raise CheckFailed(
                f"{self.url} answered HTTP {exc.response.status_code}, not a WebSocket"
            ) from None
        except websockets.InvalidHandshake as exc:
            raise CheckFailed(f"{self.url}: handshake failed: {exc}") from None

    async def refused(self, token: str | None, cause: str) -> str:
        ws = await self.connect(token)
        try:
            frame = await asyncio.wait_for(ws.recv(), self.timeout)
            raise CheckFailed(f"accepted: first frame {str(frame)[:80]}")
        except websockets.ConnectionClosed as exc:
            rcvd = exc.rcvd
            if rcvd is None or rcvd.code != 1008 or not rcvd.reason.startswith("Unauthorized"):
                raise CheckFailed(f"closed with {describe_close(exc)}, expected 1008 Unauthorized") from None
            if cause not in rcvd.reason:
                raise CheckFailed(f"1008 {rcvd.reason!r} does not name {cause!r}") from None
            return f"1008 {rcvd.reason!r}"
        except TimeoutError:
            raise CheckFailed(f"still open after {self.timeout:g} s") from None
        finally:
            await ws.close()

    async def publish(self, body: dict[str, Any]) -> None:
        key = self.settings.api_key
        if not key:
            raise CheckFailed("WS_API_KEY is not set here: cannot publish (set it to the server's key)")
        url = self.http_url.rstrip("/") + "/api/publish"
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as http:
                response = await http.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
        except httpx.HTTPError as exc:
            raise CheckFailed(f"POST {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 202:
            raise CheckFailed(f"POST {url} answered {response.status_code}: {response.text[:120]}")


async def targets(
    settings: Settings, user: str | None, wait: float
) -> tuple[str, str | None, str | None, str]:
    """``(user, creator, open post, note)`` from the database; ``user`` as given when given."""
    note = ""
    try:
        async with open_store(settings, wait) as store:
            if user is None:
                row = await find_user(store)
                if row is None:
                    raise CheckFailed("no user in the database: pass --user ID")
                user = str(row["id"])
            post = await find_open_post(store)
            creator = await find_user(store, creator=True)
    except DatabaseProblem as exc:
        if user is None:
            raise CheckFailed(f"cannot pick a user, database unavailable ({exc}): pass --user ID") from None
        return user, None, None, f"database unavailable: {exc}"
    creator_id = str(post["creator"]) if post else (str(creator["id"]) if creator else None)
    return user, creator_id, str(post["id"]) if post else None, note


async def run_all(run: Run, user_opt: str | None) -> None:
    settings = run.settings

    async def health() -> str:
        url = run.http_url.rstrip("/") + "/health"
        try:
            async with httpx.AsyncClient(timeout=run.timeout) as http:
                response = await http.get(url)
        except httpx.HTTPError as exc:
            raise CheckFailed(f"GET {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise CheckFailed(f"GET {url} answered {response.status_code}")
        return f"GET {url}: {response.json()}"

    await run.check("health", health)

    picked: dict[str, Any] = {}

    async def pick() -> str:
        user, creator, post, note = await targets(settings, user_opt, run.timeout)
        picked.update(user=user, creator=creator, post=post)
        return f"user {user}, creator {creator or '-'}, open post {post or '-'}" + (
            f" ({note})" if note else ""
        )

    if not await run.check("test user", pick):
        return
    user: str = picked["user"]
    session: Session | None = None

    async def connect() -> str:
        nonlocal session
        ws = await run.connect(run.token(user))
        session = Session(ws, run.timeout)
        frame = await session.expect("connected", lambda f: f.get("type") == "connected")
        if frame.get("data", {}).get("userId") != user:
            raise CheckFailed(f"connected as {frame.get('data')}, expected user {user}")
        return f"connected as {user}"

    connected = await run.check("connect", connect)

    async def subscribe(channel: dict[str, Any], key: str) -> str:
        assert session is not None
        await session.send({"type": "subscribe", "channel": channel})
        await session.expect(
            f"subscribed to {key}",
            lambda f: f.get("type") == "subscribed" and f.get("data", {}).get("channelKey") == key,
        )
        return f"subscribed {key}"

    def sub_step(channel: dict[str, Any], key: str) -> Callable[[], Awaitable[str]]:
        return lambda: subscribe(channel, key)

    await run.check(
        "notifications",
        sub_step({"type": "notifications", "userId": user}, f"notifications_{user}"),
        needs=connected,
    )
    await run.check("feed", sub_step({"type": "feed", "userId": user}, f"feed_{user}"), needs=connected)
    creator = picked["creator"] or user
    await run.check(
        "creator", sub_step({"type": "creator", "id": creator}, f"creator_{creator}"), needs=connected
    )

    async def post() -> str:
        if picked["post"] is None:
            raise Skipped("no open post found in the database")
        return await subscribe({"type": "post", "postId": picked["post"]}, f"post_{picked['post']}")

    await run.check("open post", post, needs=connected)

    async def ping() -> str:
        assert session is not None
        await session.send({"type": "ping"})
        await session.expect("pong", lambda f: f.get("type") == "pong")
        return "pong"

    await run.check("ping", ping, needs=connected)

    async def denied() -> str:
        assert session is not None
        other = f"{user}-not-me"
        channel = {"type": "notifications", "userId": other}
        await session.send({"type": "subscribe", "channel": channel})
        frame = await session.expect(
            "an answer",
            lambda f: (
                f.get("type") in ("error", "subscribed") and f.get("data", {}).get("channel") == channel
            ),
        )
        if frame["type"] != "error" or frame["data"].get("message") != "Access denied to channel":
            raise CheckFailed(f"another user's notifications were not refused: {frame}")
        return f"notifications_{other}: Access denied to channel"

    await run.check("refused sub", denied, needs=connected)
    nonce = secrets.token_hex(6)

    async def round_trip_channel() -> str:
        assert session is not None
        key = f"creator_fonana-ws-test-{nonce}"
        await subscribe({"type": "creator", "id": f"fonana-ws-test-{nonce}"}, key)
        started = time.perf_counter()
        await run.publish({"channel": key, "event": {"type": TEST_EVENT, "nonce": nonce, "route": "channel"}})
        await session.expect(
            "the published event", lambda f: f.get("type") == TEST_EVENT and f.get("route") == "channel"
        )
        return f"POST /api/publish -> {key} -> client in {(time.perf_counter() - started) * 1000:.0f} ms"

    await run.check("event (channel)", round_trip_channel, needs=connected)

    async def round_trip_user() -> str:
        assert session is not None
        started = time.perf_counter()
        await run.publish({"user": user, "event": {"type": TEST_EVENT, "nonce": nonce, "route": "user"}})
        await session.expect(
            "the published event",
            lambda f: f.get("type") == TEST_EVENT and f.get("nonce") == nonce and f.get("route") == "user",
        )
        return (
            f"POST /api/publish -> user {user} -> client in {(time.perf_counter() - started) * 1000:.0f} ms"
        )

    await run.check("event (user)", round_trip_user, needs=connected)
    if session is not None:
        await session.ws.close()

    forged = create_token("not-the-server-secret-" + secrets.token_hex(8), user, 300)
    expired = create_token(settings.jwt_secret, user, -(settings.jwt_leeway + 120))
    await run.check("no token", lambda: run.refused(None, "no token"))
    await run.check("bad token", lambda: run.refused(forged, "signature"))
    await run.check("expired token", lambda: run.refused(expired, "expired"))


def test_client(
    url: str = typer.Option(None, help="The server's WebSocket URL (default: ws://WS_HOST:WS_PORT/ws)."),
    user: str = typer.Option(
        None, "--user", "-u", help="Test as this user id (default: one from the database)."
    ),
    http_url: str = typer.Option(
        None, help="Base URL of the publish API (default: http(s)://HOST:PORT of --url)."
    ),
    timeout: float = typer.Option(5.0, help="Seconds to wait for each answer."),
) -> None:
    """Check a running server end to end: connect with a minted token, subscribe to notifications, feed,
    a creator and an open post, ping, a refused subscription, refused connections (no, bad, expired
    token), and events through the publish API. Prints a table; exit 1 when any check failed."""
    settings = settings_or_exit()
    if url is None:
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(settings.host, settings.host)
        url = f"ws://{host}:{settings.port}/ws"
    run = Run(settings, url, http_url or http_base(url), timeout)
    err.print(f"testing {url} (publish API {run.http_url})")
    asyncio.run(run_all(run, user))

    table = Table(title=f"fonana-ws test-client {url}", header_style="bold")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    style = {PASS: "green", FAIL: "red bold", SKIP: "yellow"}
    for name, result, detail in run.rows:
        table.add_row(name, f"[{style[result]}]{result}[/]", detail)
    out.print(table)
    counts = {r: sum(row[1] == r for row in run.rows) for r in (PASS, FAIL, SKIP)}
    out.print(f"test-client: {counts[PASS]} ok, {counts[FAIL]} failing, {counts[SKIP]} skipped")
    if counts[FAIL]:
        raise typer.Exit(1)
