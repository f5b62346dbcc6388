"""Token lifetime (protocol §7.6) with a real server and real clients: ``expiresAt``, the 4001 close at
``exp`` plus the leeway, and the ``refresh`` frame's three outcomes."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path

import jwt
import pytest
import websockets

from fonana_ws.auth import create_token
from fonana_ws.db import demo

from .conftest import SECRET, Client, make_settings, running

LEEWAY = 0.5


def expires_at(frame: dict) -> float:
    return datetime.fromisoformat(frame["data"]["expiresAt"].replace("Z", "+00:00")).timestamp()


def token(user: str, seconds: float) -> str:
    """A token whose ``exp`` is ``seconds`` from now, to the millisecond (PyJWT accepts a float)."""
    now = time.time()
    return jwt.encode({"userId": user, "iat": int(now), "exp": now + seconds}, SECRET, algorithm="HS256")


async def connect(url: str, tok: str) -> tuple[Client, dict]:
    ws = await websockets.connect(f"{url}?token={tok}", close_timeout=1)
    client = Client(ws)
    return client, await client.recv_type("connected")


async def closed_with(client: Client, timeout: float) -> tuple[int | None, str | None, float]:
    """Wait for the server's close; (code, reason, when on the monotonic clock)."""
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(client.ws.recv(), timeout)
    return client.ws.close_code, client.ws.close_reason, time.monotonic()


@pytest.fixture
async def srv(tmp_path: Path):
    async with running(make_settings(tmp_path, None, JWT_LEEWAY=str(LEEWAY))) as server:
        for user in ("tl-a", "tl-b"):
            await demo.insert_user(server.db, user)
        yield server


async def test_connected_says_when_the_token_expires_and_4001_closes_it_then(srv) -> None:
    tok = token("tl-a", 2.0)
    exp = jwt.decode(tok, options={"verify_signature": False})["exp"]
    started = time.monotonic()
    client, hello = await connect(srv.ws_url, tok)
    assert abs(expires_at(hello) - exp) < 0.002, hello
    code, reason, at = await closed_with(client, 10)
    assert (code, reason) == (4001, "Token expired")
    waited = at - started
    assert 2.0 + LEEWAY - 0.3 <= waited <= 2.0 + LEEWAY + 1.5, f"closed {waited:.2f} s after connecting"
    assert srv.services.stats.tokens_expired == 1
    assert "fonana_ws_tokens_expired_total 1.0" in (await srv.http.get("/metrics")).text


async def test_a_refresh_keeps_the_connection_past_the_old_exp(srv) -> None:
    client, _ = await connect(srv.ws_url, token("tl-a", 1.5))
    fresh = token("tl-a", 600)
    await client.send({"type": "refresh", "token": fresh})
    answer = await client.recv_type("refreshed")
    assert abs(expires_at(answer) - jwt.decode(fresh, options={"verify_signature": False})["exp"]) < 0.002
    await asyncio.sleep(1.5 + LEEWAY + 0.7)
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}, "still open past the first token's exp"
    assert srv.services.stats.tokens_refreshed == 1


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-jwt",
        jwt.encode(
            {"userId": "tl-a", "exp": time.time() + 600}, "another-secret-" + "x" * 32, algorithm="HS256"
        ),
        create_token(SECRET, "tl-a", -120),  # expired, beyond the leeway
    ],
    ids=["malformed", "wrong-secret", "expired"],
)
async def test_a_bad_refresh_leaves_the_old_expiry(srv, bad: str) -> None:
    started = time.monotonic()
    client, _ = await connect(srv.ws_url, token("tl-a", 1.5))
    await client.send({"type": "refresh", "token": bad})
    assert await client.recv() == {"type": "error", "data": {"message": "Invalid token"}}
    code, reason, at = await closed_with(client, 10)
    assert (code, reason) == (4001, "Token expired")
    assert at - started <= 1.5 + LEEWAY + 1.5
    assert srv.services.stats.tokens_refused >= 1


async def test_another_user_s_token_closes_1008(srv) -> None:
    client, _ = await connect(srv.ws_url, token("tl-a", 600))
    await client.send({"type": "refresh", "token": token("tl-b", 600)})
    code, reason, _ = await closed_with(client, 5)
    assert (code, reason) == (1008, "Unauthorized: token for another user")


async def test_a_malformed_refresh_frame_is_invalid_format(srv) -> None:
    client, _ = await connect(srv.ws_url, token("tl-a", 600))
    for frame in ({"type": "refresh"}, {"type": "refresh", "token": 5}, {"type": "refresh", "token": ""}):
        await client.send(frame)
        assert await client.recv() == {"type": "error", "data": {"message": "Invalid message format"}}
    await client.send({"type": "refresh", "token": "x" * 9000})
    assert await client.recv() == {"type": "error", "data": {"message": "Invalid message format"}}


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4321])
async def test_a_close_the_client_starts_is_answered_with_its_code(srv, code: int) -> None:
    """RFC 6455 §5.5.1: the server's close frame echoes the client's code (the README's close table)."""
    client, _ = await connect(srv.ws_url, token("tl-a", 600))
    await client.ws.close(code, "bye")
    assert client.ws.protocol.close_rcvd is not None
    assert client.ws.protocol.close_rcvd.code == code
