"""``GET /metrics`` and ``GET /stats``: what they count, who may read them, one registry per app."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from fonana_ws.auth import create_token
from fonana_ws.net import is_local_request

from .conftest import API_KEY, Server, free_port, make_settings, running

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: str) -> Samples:
    """Every sample of the exposition, by sample name, then by its sorted labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


async def scrape(srv: Server, **kwargs: Any) -> Samples:
    response = await srv.http.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def refused(srv: Server, token: str | None) -> str:
    url = srv.ws_url + (f"?token={token}" if token is not None else "")
    async with websockets.connect(url, close_timeout=1) as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    return info.value.rcvd.reason


async def test_metrics_count_what_happened_one_registry_per_app(tmp_path: Path) -> None:
    """Two apps in one process: each /metrics reports its own connections, refusals and events."""
    async with (
        running(make_settings(tmp_path / "a", None)) as srv,
        running(make_settings(tmp_path / "b", None)) as other,
    ):
        empty = await scrape(srv)
        assert value(empty, "fonana_ws_connections") == 0
        assert value(empty, "fonana_ws_auth_failures_total", reason="expired") == 0  # reported before use
        assert value(empty, "fonana_ws_subscriptions", type="post") == 0

        alice, bob = await srv.user(), await srv.user()
        creator = await srv.user("c", creator=True)
        post = await srv.post(creator)
        a1, a2, b1 = await srv.connect(alice), await srv.connect(alice), await srv.connect(bob)
        assert (await a1.subscribe({"type": "notifications", "userId": alice}))["type"] == "subscribed"
        assert (await a1.subscribe({"type": "creator", "id": creator}))["type"] == "subscribed"
        assert (await a1.subscribe({"type": "post", "postId": post}))["type"] == "subscribed"
        assert (await a2.subscribe({"type": "creator", "id": creator}))["type"] == "subscribed"
        assert (await b1.subscribe({"type": "feed", "userId": bob}))["type"] == "subscribed"
        assert (await b1.subscribe({"type": "feed", "userId": alice}))["type"] == "error"  # not counted

        assert "no token" in await refused(srv, None)
        forged = create_token("another-secret-" + "z" * 20, alice)
        assert "signature" in await refused(srv, forged)
        assert "signature" in await refused(srv, forged + "x")
        assert "expired" in await refused(srv, srv.token(alice, expires=-600))
        assert "unknown user" in await refused(srv, srv.token("nobody-" + secrets.token_hex(4)))

        for i in range(3):
            body = {"channel": f"creator_{creator}", "event": {"type": "creator_updated", "i": i}}
            assert (await srv.publish(body)).status_code == 202
        assert (await srv.publish({"user": alice, "event": {"type": "notification"}})).status_code == 202
        for client, count in ((a1, 4), (a2, 4)):
            for _ in range(count):
                await client.recv()

        m = await scrape(srv)
        assert value(m, "fonana_ws_connections") == 3
        assert value(m, "fonana_ws_connected_users") == 2
        assert value(m, "fonana_ws_connects_total") == 3
        assert value(m, "fonana_ws_auth_failures_total", reason="no_token") == 1
        assert value(m, "fonana_ws_auth_failures_total", reason="bad_signature") == 2
        assert value(m, "fonana_ws_auth_failures_total", reason="expired") == 1
        assert value(m, "fonana_ws_auth_failures_total", reason="unknown_user") == 1
        for kind, current in (("notifications", 1), ("creator", 2), ("post", 1), ("feed", 1)):
            assert value(m, "fonana_ws_subscriptions", type=kind) == current, kind
            assert value(m, "fonana_ws_subscribes_total", type=kind) == current, kind
        assert value(m, "fonana_ws_channels", type="creator") == 1
        assert value(m, "fonana_ws_events_published_total") == 4
        assert value(m, "fonana_ws_events_delivered_total") == 3 * 2 + 2
        assert value(m, "fonana_ws_publish_failures_total") == 0
        assert value(m, "fonana_ws_slow_consumer_disconnects_total") == 0
        assert value(m, "fonana_ws_broker_up", broker="memory") == 1
        # the user channels of alice and bob, and four keys
        assert value(m, "fonana_ws_broker_subscriptions") == 6
        assert value(m, "process_resident_memory_bytes") > 0

        # The other app in this process has its own registry and numbers.
        o = await scrape(other)
        assert value(o, "fonana_ws_connections") == 0
        assert value(o, "fonana_ws_connects_total") == 0
        assert value(o, "fonana_ws_events_published_total") == 0

        # /stats says the same as JSON.
        stats = (await srv.http.get("/stats")).json()
        assert stats["connections"] == 3 and stats["connected_users"] == 2
        current = {"notifications": 1, "creator": 2, "post": 1, "feed": 1, "conversation": 0, "status": 0}
        assert stats["subscriptions"] == current
        assert stats["totals"]["auth_failures"]["bad_signature"] == 2
        assert stats["totals"]["events_delivered"] == 8
        assert stats["broker"] == {"kind": "memory", "up": True, "subscriptions": 6}

        # Leaving and disconnecting bring the gauges back down.
        await a1.send({"type": "unsubscribe", "channel": {"type": "post", "postId": post}})
        assert (await a1.recv())["type"] == "unsubscribed"
        await b1.close()

        async def settled() -> bool:
            now = await scrape(srv)
            return (
                value(now, "fonana_ws_connections") == 2
                and value(now, "fonana_ws_subscriptions", type="feed") == 0
            )

        await eventually(settled)
        final = await scrape(srv)
        assert value(final, "fonana_ws_subscriptions", type="post") == 0
        assert value(final, "fonana_ws_subscribes_total", type="post") == 1
        assert value(final, "fonana_ws_connected_users") == 1


async def test_publish_latency_histogram(tmp_path: Path) -> None:
    """Each successful publish (HTTP API or Python API) is one observation of fonana_ws_publish_seconds."""
    async with running(make_settings(tmp_path, None)) as srv:
        for i in range(5):
            assert (
                await srv.publish({"channel": "creator_x", "event": {"type": "t", "i": i}})
            ).status_code == 202
        await srv.services.publisher.publish({"type": "t"}, users=["u1", "u2"])
        m = await scrape(srv)
        count = value(m, "fonana_ws_publish_seconds_count")
        assert count == 6, "publishes are not timed: Publisher.publish needs @metrics.timed_publish"
        assert 0 < value(m, "fonana_ws_publish_seconds_sum") < 6 * 2.5
        buckets = sorted(
            ((float(dict(labels)["le"]), v) for labels, v in m["fonana_ws_publish_seconds_bucket"].items()),
        )
        assert buckets[-1] == (float("inf"), 6)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert buckets[0][1] < 6 or buckets[0][0] > 0  # not everything in a zero-width bucket
        stats = (await srv.http.get("/stats")).json()
        assert stats["publish_seconds"]["count"] == 6 and stats["publish_seconds"]["buckets"]["+Inf"] == 6


async def test_slow_consumer_disconnect_is_counted(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, None, WS_SEND_BUFFER="65536")) as srv:
        user = await srv.user()
        slow = await srv.connect(user, max_queue=2)
        await slow.subscribe({"type": "creator", "id": "busy"})
        slow.ws.transport.pause_reading()
        pad = secrets.token_hex(50_000)
        for i in range(300):
            body = {"channel": "creator_busy", "event": {"type": "creator_updated", "i": i, "pad": pad}}
            assert (await srv.publish(body)).status_code == 202
            if srv.services.stats.slow_consumer_disconnects:
                break

        async def counted() -> bool:
            return value(await scrape(srv), "fonana_ws_slow_consumer_disconnects_total") == 1

        await eventually(counted)
        assert value(await scrape(srv), "fonana_ws_connections") == 0
        slow.ws.transport.resume_reading()


async def test_openmetrics_when_the_scraper_asks(server: Server) -> None:
    response = await server.http.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    assert "fonana_ws_connections" in response.text


@pytest.mark.parametrize("path", ["/metrics", "/stats"])
async def test_only_local_or_api_key_may_read(server: Server, path: str) -> None:
    """Loopback not forwarded by a proxy, or the API key; a proxied or remote request gets 401."""
    base = f"http://127.0.0.1:{server.port}"
    assert (await server.http.get(path)).status_code == 200
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        proxied = await server.http.get(path, headers={header: "203.0.113.7"})
        assert proxied.status_code == 401, header
        assert proxied.headers["www-authenticate"] == "Bearer"
    with_key = {"X-Forwarded-For": "203.0.113.7", "Authorization": f"Bearer {API_KEY}"}
    assert (await server.http.get(path, headers=with_key)).status_code == 200
    wrong = {"X-Forwarded-For": "203.0.113.7", "Authorization": f"Bearer {API_KEY}x"}
    assert (await server.http.get(path, headers=wrong)).status_code == 401
    jwt_secret = {"X-Forwarded-For": "203.0.113.7", "Authorization": f"Bearer {server.settings.jwt_secret}"}
    assert (await server.http.get(path, headers=jwt_secret)).status_code == 401

    # Any loopback peer is local (127.0.0.0/8 too), a proxied or remote one is not.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=base, transport=transport, timeout=5) as other_loopback:
        assert (await other_loopback.get(path)).status_code == 200


@pytest.mark.unit
def test_which_peers_count_as_local() -> None:
    def scope(host: str, *headers: tuple[bytes, bytes]) -> dict:
        return {"client": (host, 40000), "headers": list(headers)}

    for host in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):
        assert is_local_request(scope(host)), host
    for host in ("203.0.113.7", "10.0.0.5", "::ffff:203.0.113.7", "2001:db8::1", ""):
        assert not is_local_request(scope(host)), host
    assert not is_local_request(scope("127.0.0.1", (b"x-forwarded-for", b"203.0.113.7")))


async def test_metrics_port_serves_metrics_on_a_second_listener(tmp_path) -> None:
    """The old server's METRICS_PORT keeps working, on loopback by default, under the same access rule."""
    metrics_port = free_port()
    async with running(make_settings(tmp_path, None, METRICS_PORT=str(metrics_port))) as srv:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}", timeout=5) as http:
            response = await http.get("/metrics")
            assert response.status_code == 200
            names = {f.name for f in text_string_to_metric_families(response.text)}
            assert "fonana_ws_connections" in names
            assert (await http.get("/stats")).json()["connections"] == 0
            proxied = await http.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
            assert proxied.status_code == 401
            assert (await http.get("/api/publish")).status_code == 404  # only metrics live there
        assert (await srv.http.get("/metrics")).status_code == 200
    with socket.socket() as probe:  # the listener is closed with the server
        probe.bind(("127.0.0.1", metrics_port))
