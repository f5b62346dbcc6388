"""Prometheus metrics (``GET /metrics``) and the same numbers as JSON (``GET /stats``).

Nothing here runs on the hot path: the hub, the endpoint and the publisher bump plain ``Stats``
counters, and a custom collector reads them (and the hub's tables) when someone scrapes. Each app has a
registry of its own, made at its first scrape, so that several apps can live in one process.

Both routes answer requests from loopback that no proxy forwarded (``net.is_local_request``) and
requests that carry the server API key as ``Authorization: Bearer``; anyone else gets 401.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from fonana_ws.auth import api_key_matches
from fonana_ws.net import is_local_request
from fonana_ws.protocol.channels import ID_FIELDS, channel_type
from fonana_ws.stats import Stats, publish_latency
from fonana_ws.transport.listener import side_listener

if TYPE_CHECKING:
    from fonana_ws.web.services import Services

#: Refusal causes (``AuthError.cause``) reported even before they happen once, so that rate() works.
AUTH_CAUSES = (
    "no_token",
    "malformed",
    "bad_signature",
    "expired",
    "invalid_claims",
    "unknown_user",
    "database",
)
CHANNEL_TYPES = tuple(ID_FIELDS)
#: Refusals by a limit (``Stats.limit_refusals``), reported from zero so that rate() works.
LIMIT_CAUSES = (
    "origin",
    "connect_rate",
    "user_connections",
    "client_rate",
    "client_rate_close",
    "handshake_timeout",
    "head_timeout",
    "body_timeout",
    "url_too_long",
    "headers_too_large",
    "body_too_large",
    "slow_consumer_pongs",
)
#: Why a typing event was relayed (``Stats.typing_relayed``), reported from zero so that rate() works.
TYPING_REASONS = ("frame", "expired", "disconnect", "new_message")
#: Channels listed in ``/stats``' ``top_channels`` (the console's table): bounded, whatever the count.
TOP_CHANNELS = 10


def snapshot(services: Services) -> dict[str, Any]:
    """Every number both routes report, read once, now."""
    stats, hub = services.stats, services.hub
    subscriptions = dict.fromkeys(CHANNEL_TYPES, 0)
    channels = dict.fromkeys(CHANNEL_TYPES, 0)
    for key, conns in hub.by_key.items():
        kind = channel_type(key)
        subscriptions[kind] = subscriptions.get(kind, 0) + len(conns)
        channels[kind] = channels.get(kind, 0) + 1
    auth_failures = dict.fromkeys(AUTH_CAUSES, 0)
    auth_failures.update(stats.auth_failures)
    subscribes = dict.fromkeys(CHANNEL_TYPES, 0)
    subscribes.update(stats.subscriptions)
    hist = publish_latency(stats)
    limit_refusals = dict.fromkeys(LIMIT_CAUSES, 0)
    limit_refusals.update(stats.limit_refusals)
    return {
        "connections": len(hub.connections),
        # A leak shows here first (the churn soak watches it): every task of this process's loop.
        "tasks": len(asyncio.all_tasks()),
        "connected_users": len(hub.by_user),
        "subscriptions": subscriptions,
        "channels": channels,
        "broker": {
            "kind": services.broker.kind,
            "up": bool(services.broker.is_up),
            "subscriptions": stats.broker_subscriptions,
        },
        "totals": {
            "connects": stats.connections_opened,
            "auth_failures": auth_failures,
            "subscribes": subscribes,
            "events_published": stats.events_published,
            "publish_failures": stats.publish_failures,
            "broker_messages": stats.events_received,
            "events_delivered": stats.deliveries,
            "bad_envelopes": stats.bad_envelopes,
            "slow_consumer_disconnects": stats.slow_consumer_disconnects,
            "limit_refusals": limit_refusals,
            "messages_relayed": stats.messages_relayed,
            "status_published": stats.status_published,
            "presence_published": stats.presence_published,
            "presence_failures": stats.presence_failures,
            "tokens_expired": stats.tokens_expired,
            "tokens_refreshed": stats.tokens_refreshed,
            "tokens_refused": stats.tokens_refused,
            "access_revoked": stats.access_revoked,
            "access_rechecks": stats.access_rechecks,
            "revoke_failures": stats.revoke_failures,
            "history_appends": stats.history_appends,
            "recoveries": stats.recoveries,
            "recoveries_refused": stats.recoveries_refused,
        },
        "typing": typing_numbers(stats),
        # One pass over the keys, as above; only the ten largest are kept.
        "top_channels": [
            {"channel": key, "subscribers": len(conns)}
            for key, conns in heapq.nlargest(TOP_CHANNELS, hub.by_key.items(), key=lambda item: len(item[1]))
        ],
        "publish_seconds": {
            "count": hist.count,
            "sum": hist.sum,
            "buckets": dict(hist.cumulative()),
        },
    }


def typing_numbers(stats: Stats) -> dict[str, Any]:
    """Typing (protocol §7.2): relayed by reason, swallowed by the throttle, lost, states held now."""
    relayed = dict.fromkeys(TYPING_REASONS, 0)
    relayed.update(stats.typing_relayed)
    return {
        "relayed": relayed,
        "swallowed": stats.typing_swallowed,
        "relay_failures": stats.typing_relay_failures,
        "active": stats.typing_active,
    }


def _labelled(family: GaugeMetricFamily | CounterMetricFamily, values: dict[str, int]) -> Metric:
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


class FonanaCollector(Collector):
    """Reads the app's ``Stats`` and hub at scrape time."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        snap = snapshot(self.services)
        totals = snap["totals"]
        p = "fonana_ws_"
        yield GaugeMetricFamily(
            p + "connections", "Open authenticated WebSocket connections.", snap["connections"]
        )
        yield GaugeMetricFamily(
            p + "connected_users", "Users with at least one open connection.", snap["connected_users"]
        )
        yield CounterMetricFamily(
            p + "connects", "Connections accepted after authentication.", totals["connects"]
        )
        yield _labelled(
            CounterMetricFamily(
                p + "auth_failures", "Connections refused (close 1008), by cause.", labels=["reason"]
            ),
            totals["auth_failures"],
        )
        yield _labelled(
            GaugeMetricFamily(
                p + "subscriptions", "Current channel subscriptions, by channel type.", labels=["type"]
            ),
            snap["subscriptions"],
        )
        yield _labelled(
            GaugeMetricFamily(
                p + "channels", "Channel keys with local subscribers, by type.", labels=["type"]
            ),
            snap["channels"],
        )
        yield _labelled(
            CounterMetricFamily(
                p + "subscribes", "Successful subscribe requests, by channel type.", labels=["type"]
            ),
            totals["subscribes"],
        )
        yield CounterMetricFamily(
            p + "events_published", "Events this process published to the broker.", totals["events_published"]
        )
        yield CounterMetricFamily(
            p + "publish_failures",
            "Publishes that failed (broker down, too large).",
            totals["publish_failures"],
        )
        yield CounterMetricFamily(
            p + "broker_messages",
            "Broker messages received for local subscribers.",
            totals["broker_messages"],
        )
        yield CounterMetricFamily(
            p + "events_delivered",
            "Events handed to connections (one per recipient).",
            totals["events_delivered"],
        )
        yield CounterMetricFamily(
            p + "bad_envelopes", "Broker messages dropped as not an envelope.", totals["bad_envelopes"]
        )
        yield CounterMetricFamily(
            p + "slow_consumer_disconnects",
            "Connections cut (close 1013) because their backlog passed WS_SEND_BUFFER.",
            totals["slow_consumer_disconnects"],
        )
        yield _labelled(
            CounterMetricFamily(
                p + "limit_refusals",
                "Connections, requests and frames refused by a limit (protocol §7.5), by cause.",
                labels=["cause"],
            ),
            totals["limit_refusals"],
        )
        yield CounterMetricFamily(
            p + "messages",
            "Direct messages (new_message events, protocol §7.1) this process published.",
            totals["messages_relayed"],
        )
        up = GaugeMetricFamily(p + "broker_up", "1 when the broker is reachable, else 0.", labels=["broker"])
        up.add_metric([snap["broker"]["kind"]], 1 if snap["broker"]["up"] else 0)
        yield up
        yield GaugeMetricFamily(
            p + "broker_subscriptions",
            "Broker channels this process listens to.",
            snap["broker"]["subscriptions"],
        )
        hist = snap["publish_seconds"]
        yield HistogramMetricFamily(
            p + "publish_seconds",
            "Time to publish one event to the broker (all its targets).",
            buckets=list(hist["buckets"].items()),
            sum_value=hist["sum"],
        )
        typing = snap["typing"]
        yield _labelled(
            CounterMetricFamily(
                p + "typing_relayed",
                "Typing events relayed to the other participant (protocol §7.2), by reason: frame (a "
                "client's, past the 2 s throttle) or the server's own false (expired, disconnect, "
                "new_message).",
                labels=["reason"],
            ),
            typing["relayed"],
        )
        yield CounterMetricFamily(
            p + "typing_swallowed",
            "Client typing frames not relayed: repeats within 2 s, falses with no true shown.",
            typing["swallowed"],
        )
        yield CounterMetricFamily(
            p + "typing_relay_failures",
            "Typing events the broker did not take (not retried).",
            typing["relay_failures"],
        )
        yield GaugeMetricFamily(
            p + "typing_active",
            "(user, conversation) typing states held; each ends at most 6 s after its last frame.",
            typing["active"],
        )
        yield CounterMetricFamily(
            p + "status_published",
            "user_status change frames published (protocol §7.3): online, and offline after the grace.",
            snap["totals"]["status_published"],
        )
        yield CounterMetricFamily(
            p + "presence_published",
            "presence_join, presence_leave and presence_count frames published (protocol §7.4).",
            snap["totals"]["presence_published"],
        )
        yield CounterMetricFamily(
            p + "presence_failures",
            "Writes and reads of the shared channel presence that failed (backend unreachable).",
            snap["totals"]["presence_failures"],
        )
        for name, text in (
            ("tokens_expired", "Connections closed with 4001: their token's exp plus the leeway passed."),
            ("tokens_refreshed", "Refresh frames whose token was accepted (protocol §7.6)."),
            ("tokens_refused", "Refresh frames whose token did not verify (Invalid token)."),
            ("access_revoked", "Subscribers who lost a post channel (a revoke call, an ended subscription)."),
            ("access_rechecks", "Access re-checks made, one per affected post channel (protocol §7.7)."),
            ("revoke_failures", "Access re-checks that could not be made (database down)."),
            ("history_appends", "Channel events given an offset and kept for recovery (protocol §7.8)."),
            ("recoveries", "Subscribes with since that received the events they missed."),
            ("recoveries_refused", "Subscribes with since told recovered: false (refetch over REST)."),
        ):
            yield CounterMetricFamily(p + name, text, snap["totals"][name])


def registry_for(request: Request) -> CollectorRegistry:
    """The app's own registry, made at its first scrape (never prometheus_client's global one)."""
    state = request.app.state
    registry = getattr(state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(FonanaCollector(request.app.state.services))
        ProcessCollector(registry=registry)
        state.metrics_registry = registry
    return registry


def allowed(request: Request) -> bool:
    """Loopback and not forwarded by a proxy, or the server API key as a Bearer token."""
    if is_local_request(request.scope):
        return True
    key = request.app.state.services.settings.api_key
    return api_key_matches(request.headers.get("authorization", ""), key)


def unauthorized() -> Response:
    return JSONResponse(
        {"error": "metrics are served to local requests or with Authorization: Bearer <WS_API_KEY>"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text (or OpenMetrics when the scraper asks for it)."""
    if not allowed(request):
        return unauthorized()
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(registry_for(request)), media_type=content_type)


async def stats(request: Request) -> Response:
    """``GET /stats``: the same numbers as JSON."""
    if not allowed(request):
        return unauthorized()
    return JSONResponse(snapshot(request.app.state.services))


routes: list[BaseRoute] = [
    Route("/metrics", metrics, methods=["GET"]),
    Route("/stats", stats, methods=["GET"]),
]


async def start_metrics_server(services: Any, host: str, port: int) -> tuple[Any, asyncio.Task[None]]:
    """Serve ``/metrics`` and ``/stats`` (same access rule) on a port of their own, as METRICS_PORT did."""
    app = Starlette(routes=routes)
    app.state.services = services
    return await side_listener(app, host, port, setting="METRICS_PORT")
