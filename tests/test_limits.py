"""The limits of protocol §7.5 over real sockets: origin, connect rate, connections per user, inbound rate.

Each refusal is counted (``/metrics``: ``fonana_ws_limit_refusals_total{cause=...}``) and logged once.
The defaults stay out of real use's way: a browser resubscribing 30 channels on reconnect passes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import websockets

from fonana_ws.web.admission import origin_allowed

from .conftest import API_KEY, REDIS_URL, make_settings, need_service, redis_reachable, running

ALLOWED = ("https://fonana.me", "https://*.fonana.me")


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        (None, True),
        ("https://fonana.me", True),
        ("https://FONANA.me/", True),
        ("https://app.fonana.me", True),
        ("https://a.b.fonana.me", False),
        ("http://app.fonana.me", False),
        ("https://evilfonana.me", False),
        ("https://fonana.me.evil.com", False),
        ("null", False),
    ],
)
@pytest.mark.unit
def test_origin_rules(origin: str | None, ok: bool) -> None:
    assert origin_allowed(origin, ALLOWED) is ok


async def status_of(url: str, **kwargs: object) -> int:
    try:
        ws = await websockets.connect(url, close_timeout=1, **kwargs)
    except websockets.InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


async def test_an_origin_not_listed_gets_403_before_the_upgrade(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None, WS_ALLOWED_ORIGINS=",".join(ALLOWED))
    async with running(settings) as srv:
        user = await srv.user()
        url = f"{srv.ws_url}?token={srv.token(user)}"
        assert await status_of(url, origin="https://evil.example") == 403
        assert await status_of(url, origin="https://app.fonana.me") == 101
        assert await status_of(url) == 101  # no Origin: not a browser
        metrics = (await srv.http.get("/metrics")).text
        assert 'fonana_ws_limit_refusals_total{cause="origin"} 1.0' in metrics


async def test_connect_rate_per_address_gets_429(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, None, WS_CONNECT_RATE="3/10 seconds")) as srv:
        user = await srv.user()
        url = f"{srv.ws_url}?token={srv.token(user)}"
        codes = [await status_of(url) for _ in range(5)]
        assert codes == [101, 101, 101, 429, 429]
        assert srv.services.stats.limit_refusals["connect_rate"] == 2


async def test_connect_rate_holds_across_processes_on_redis(tmp_path: Path) -> None:
    if (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    async for key in client.scan_iter("fonana-ws:rate*"):
        await client.delete(key)
    await client.aclose()
    env = {"WS_CONNECT_RATE": "4/30 seconds", "BROADCAST_URL": REDIS_URL}
    async with (
        running(make_settings(tmp_path / "a", None, **env)) as a,
        running(make_settings(tmp_path / "b", None, **env)) as b,
    ):
        user = await a.user()
        codes = []
        for srv in (a, b, a, b, a, b):
            codes.append(await status_of(f"{srv.ws_url}?token={srv.token(user)}"))
        assert codes == [101, 101, 101, 101, 429, 429]


async def test_connections_past_the_per_user_cap_are_closed_4008(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, None, WS_MAX_CONNECTIONS_PER_USER="2")) as srv:
        user = await srv.user()
        first = await srv.connect(user)
        await srv.connect(user)
        third = await srv.connect(user, expect_connected=False)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await third.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4008, "Too many connections")
        await first.close()
        await asyncio.sleep(0.2)
        await srv.connect(user)  # a slot freed by a close is usable again
        other = await srv.user()
        await srv.connect(other)  # the cap is per user
        assert srv.services.stats.limit_refusals["user_connections"] == 1


async def test_inbound_frames_over_the_rate_are_dropped_then_closed_4029(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, None, WS_CLIENT_RATE="5/1 minute")) as srv:
        user = await srv.user()
        client = await srv.connect(user)
        for _ in range(5):
            await client.send({"type": "ping"})
            assert (await client.recv())["type"] == "pong"
        await client.send({"type": "ping"})
        assert await client.recv() == {"type": "error", "data": {"message": "Rate limit exceeded"}}
        for _ in range(100):  # drops 2..101: the 101st within the minute closes
            await client.send({"type": "ping"})
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                frame = await client.recv()
                assert frame["data"]["message"] == "Rate limit exceeded"
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4029, "Rate limit exceeded")
        stats = (await srv.http.get("/stats", headers={"Authorization": f"Bearer {API_KEY}"})).json()
        assert stats["totals"]["limit_refusals"]["client_rate"] == 100
        assert stats["totals"]["limit_refusals"]["client_rate_close"] == 1


async def test_default_rate_lets_a_browser_resubscribe_30_channels(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, None)) as srv:
        user = await srv.user()
        client = await srv.connect(user)
        for i in range(30):
            await client.send({"type": "subscribe", "channel": {"type": "creator", "id": f"c{i}"}})
        for _ in range(30):
            assert (await client.recv())["type"] == "subscribed"
