"""Protocol §1: every way a connection is refused or accepted."""

from __future__ import annotations

import contextlib
import time
import uuid

import jwt
import orjson
import pytest
import websockets

from fonana_ws.auth import AuthError, verify_token
from fonana_ws.db import demo

from .conftest import SECRET, Server, make_settings, running


async def refused(server: Server, url_suffix: str = "", **kwargs: object) -> tuple[int, str]:
    async with websockets.connect(server.ws_url + url_suffix, **kwargs) as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    rcvd = info.value.rcvd
    assert rcvd is not None
    return rcvd.code, rcvd.reason


async def test_no_token_is_refused_with_1008(server: Server) -> None:
    code, reason = await refused(server)
    assert code == 1008
    assert reason.startswith("Unauthorized") and "no token" in reason


async def test_bad_signature_and_expired_are_told_apart(server: Server) -> None:
    user = await server.user()
    forged = jwt.encode({"userId": user, "exp": time.time() + 60}, "another-secret-" + "z" * 32, "HS256")
    code, forged_reason = await refused(server, f"?token={forged}")
    assert code == 1008 and forged_reason.startswith("Unauthorized") and "signature" in forged_reason
    expired = jwt.encode({"userId": user, "exp": time.time() - 3600}, SECRET, "HS256")
    code, expired_reason = await refused(server, f"?token={expired}")
    assert code == 1008 and expired_reason.startswith("Unauthorized") and "expired" in expired_reason
    assert forged_reason != expired_reason


async def test_malformed_token_and_missing_claims(server: Server) -> None:
    code, reason = await refused(server, "?token=not.a.jwt")
    assert code == 1008 and reason.startswith("Unauthorized")
    no_user = jwt.encode({"exp": time.time() + 60}, SECRET, "HS256")
    code, reason = await refused(server, f"?token={no_user}")
    assert code == 1008 and "userId" in reason
    no_exp = jwt.encode({"userId": await server.user()}, SECRET, "HS256")
    code, reason = await refused(server, f"?token={no_exp}")
    assert code == 1008 and "exp" in reason


async def test_unknown_user_is_refused(server: Server) -> None:
    code, reason = await refused(server, f"?token={server.token('nobody-at-all')}")
    assert code == 1008 and reason == "Unauthorized: unknown user"


async def test_user_id_from_userid_or_sub_claim(server: Server) -> None:
    user = await server.user()
    client = await server.connect(user)  # userId claim
    await client.close()
    sub_token = jwt.encode({"sub": user, "exp": time.time() + 60}, SECRET, "HS256")
    client = await server.connect(user, token=sub_token)
    await client.close()


async def test_old_issuer_and_audience_claims_are_accepted_while_checks_are_off(server: Server) -> None:
    user = await server.user()
    token = server.token(user, iss="fonana.me", aud="fonana-websocket", wallet="w1")
    client = await server.connect(user, token=token)
    await client.close()


async def test_authorization_header_and_root_path(server: Server) -> None:
    user = await server.user()
    ws = await websockets.connect(
        f"ws://127.0.0.1:{server.port}/", additional_headers={"Authorization": f"Bearer {server.token(user)}"}
    )
    frame = orjson.loads(await ws.recv())
    assert frame["type"] == "connected" and frame["data"]["userId"] == user
    await ws.close()


async def test_subprotocol_token(server: Server) -> None:
    user = await server.user()
    ws = await websockets.connect(server.ws_url, subprotocols=["bearer", f"bearer.{server.token(user)}"])
    assert ws.subprotocol == "bearer"
    assert orjson.loads(await ws.recv())["type"] == "connected"
    await ws.close()


async def test_frames_sent_before_auth_are_processed_after_connected(server: Server) -> None:
    user = await server.user()
    ws = await websockets.connect(f"{server.ws_url}?token={server.token(user)}")
    # Like the browser client: frames go out in onopen, before `connected` arrives.
    await ws.send(orjson.dumps({"type": "ping"}).decode())
    await ws.send(orjson.dumps({"type": "subscribe", "channel": {"type": "creator", "id": "c1"}}).decode())
    kinds = [orjson.loads(await ws.recv())["type"] for _ in range(3)]
    assert kinds == ["connected", "pong", "subscribed"]
    await ws.close()


async def test_refused_socket_is_never_registered(server: Server) -> None:
    before = len(server.services.hub.connections)
    async with websockets.connect(f"{server.ws_url}?token=garbage") as ws:
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send('{"type":"subscribe","channel":{"type":"creator","id":"refused-only"}}')
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert len(server.services.hub.connections) == before
    assert "creator_refused-only" not in server.services.hub.by_key


@pytest.mark.unit
def test_issuer_and_audience_checks_when_configured() -> None:
    token = jwt.encode({"userId": "u", "exp": time.time() + 60, "iss": "a", "aud": "b"}, SECRET, "HS256")
    assert verify_token(token, SECRET, issuer="a", audience="b")[0] == "u"
    with pytest.raises(AuthError, match="issuer"):
        verify_token(token, SECRET, issuer="other")
    with pytest.raises(AuthError, match="audience"):
        verify_token(token, SECRET, audience="other")


@pytest.mark.unit
def test_small_leeway_on_expiry() -> None:
    token = jwt.encode({"userId": "u", "exp": time.time() - 5}, SECRET, "HS256")
    assert verify_token(token, SECRET, leeway=30)[0] == "u"
    with pytest.raises(AuthError, match="expired"):
        verify_token(token, SECRET, leeway=0)


@pytest.mark.unit
def test_other_algorithms_are_refused() -> None:
    token = jwt.encode({"userId": "u", "exp": time.time() + 60}, SECRET, "HS512")
    with pytest.raises(AuthError, match="algorithm"):
        verify_token(token, SECRET)


async def test_a_new_user_connects_at_once_and_a_known_one_is_remembered(server: Server) -> None:
    user_id = f"late-{uuid.uuid4().hex[:8]}"
    code, reason = await refused(server, f"?token={server.token(user_id)}")
    assert code == 1008 and reason == "Unauthorized: unknown user"
    await demo.insert_user(server.db, user_id)  # the web app creates the user: no negative caching
    client = await server.connect(user_id)
    await client.close()
    queries = []
    real = server.services.store.q.fetch_val

    async def counting(query: str, values: dict | None = None) -> object:
        queries.append(query)
        return await real(query, values)

    server.services.store.q.fetch_val = counting  # type: ignore[method-assign]
    try:
        client = await server.connect(user_id)
        await client.close()
    finally:
        del server.services.store.q.fetch_val
    assert not any("FROM users" in q for q in queries)  # remembered for WS_USER_CACHE_TTL


async def test_without_the_user_cache_every_connect_asks(tmp_path) -> None:
    async with running(make_settings(tmp_path, None, WS_USER_CACHE_TTL="0")) as srv:
        user_id = await srv.user()
        client = await srv.connect(user_id)
        await client.close()
        await srv.db.execute("DELETE FROM users WHERE id = :id", {"id": user_id})
        code, reason = await refused(srv, f"?token={srv.token(user_id)}")
        assert code == 1008 and reason == "Unauthorized: unknown user"
