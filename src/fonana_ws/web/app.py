"""``create_app(settings)``: build every piece, connect them at start, disconnect them at stop."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from fonana_ws.broker import Broker, mask_url
from fonana_ws.broker.history import HistoryLimits
from fonana_ws.config import Settings, load_settings
from fonana_ws.db import Store
from fonana_ws.db.demo import DEMO_USERS, seed_demo
from fonana_ws.fanout.hub import Hub
from fonana_ws.fonana import disconnect, presence_store, user_connections
from fonana_ws.fonana.presence import ChannelPresence
from fonana_ws.fonana.publisher import Publisher
from fonana_ws.fonana.revocation import Revocation
from fonana_ws.fonana.status import OnlineStatus
from fonana_ws.fonana.typing import Typing
from fonana_ws.protocol.frames import CLOSE_SERVICE_RESTART
from fonana_ws.stats import Stats
from fonana_ws.web import access_api, api, batch_api, events_api, metrics, presence_api, users_api
from fonana_ws.web.admission import RateLimits
from fonana_ws.web.console import routes as console_routes
from fonana_ws.web.console_peers import install as install_console_peers
from fonana_ws.web.endpoint import FonanaEndpoint
from fonana_ws.web.services import Services

log = logging.getLogger("fonana_ws")


def build_services(settings: Settings) -> Services:
    stats = Stats()
    broker = Broker(settings.broadcast_url)
    return Services(
        settings=settings,
        store=Store(settings.database_url, user_cache_ttl=settings.user_cache_ttl),
        broker=broker,
        hub=Hub(broker, stats),
        publisher=Publisher(
            broker,
            stats,
            max_event_size=settings.max_event_size,
            history=HistoryLimits(settings.history_size, settings.history_ttl),
        ),
        stats=stats,
        rate_limits=RateLimits(settings),
        user_connections=user_connections.for_settings(settings),
    )


async def seed_embedded(store: Store) -> None:
    """The embedded default's schema and demo users (idempotent)."""
    await store.create_schema()
    if await seed_demo(store.db):
        log.info("embedded database: added demo users")


async def prepare_embedded(settings: Settings) -> None:
    """Seed the embedded database once, before worker processes start (they would race to)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.database_url)
    await store.connect()
    try:
        await seed_embedded(store)
    finally:
        await store.disconnect()


async def start(services: Services) -> None:
    settings = services.settings
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    await services.store.connect()
    if settings.embedded:
        await seed_embedded(services.store)
        for user_id, what in DEMO_USERS.items():
            log.info("demo user %s: %s", user_id, what)
    await services.broker.connect()
    status = services.status = OnlineStatus(
        services.user_connections,
        services.broker,
        services.store,
        services.stats,
        grace=settings.offline_grace,
    )
    services.user_connections.on_offline = status.went_offline
    # Made at the start, not at the first typing frame: it must hear the throttle's claims of other
    # processes for users whose tabs here have not typed yet. Idle, it holds nothing and no timer.
    services.typing = Typing(services.hub, services.stats)
    if settings.console:
        install_console_peers(services)  # after Typing: it chains in front of the hub's watcher
    disconnect.install(services.hub)  # closes this process's connections of a user asked for (4003)
    await services.user_connections.start()
    presence = services.presence = ChannelPresence(
        presence_store.for_settings(settings),
        services.broker,
        services.store,
        services.stats,
        grace=settings.offline_grace,
        ttl=settings.presence_ttl,
        list_limit=settings.presence_list_limit,
        count_interval=settings.presence_count_interval,
    )
    services.hub.on_member = presence.on_member
    presence.start()
    services.revocation = Revocation(services.hub, services.store, services.stats)
    if settings.metrics_port:
        services.metrics_server = await metrics.start_metrics_server(
            services, settings.metrics_host, settings.metrics_port
        )
        log.info("metrics also on http://%s:%s/metrics", settings.metrics_host, settings.metrics_port)
    log.info(
        "fonana-ws ready: database=%s broker=%s secret from %s",
        mask_url(settings.database_url),
        mask_url(settings.broadcast_url),
        settings.jwt_secret_source,
    )
    if settings.jwt_secret_source.startswith("dev secret"):
        log.warning(
            "USING A DEVELOPMENT SECRET (%s): tokens from the web app will be refused. "
            "Set JWT_SECRET (or NEXTAUTH_SECRET) to the web app's secret for real use.",
            settings.jwt_secret_source,
        )


async def stop(services: Services) -> None:
    if services.metrics_server is not None:
        server, task = services.metrics_server
        server.should_exit = True
        await task
    services.begin_shutdown()  # already, when uvicorn closed the sockets first
    await services.hub.close(CLOSE_SERVICE_RESTART, "Server shutting down")
    await services.user_connections.stop()
    if services.status is not None:
        await services.status.stop()
    if services.presence is not None:
        await services.presence.stop()
    if services.expiry is not None:
        services.expiry.clear()
    if services.revocation is not None:
        services.revocation.stop()
    await services.rate_limits.close()
    await services.broker.disconnect()
    await services.store.disconnect()


WS_PATHS = frozenset(("/ws", "/"))
CONFORMANCE_PATH = "/conformance/echo"


class FonanaApp:
    """The Starlette app, with WebSocket upgrades on ``/ws`` and ``/`` handed straight to the endpoint.

    Starlette's middleware stack and router stay on the stack of every open socket: ~2.5 KB of
    coroutine frames per idle connection, for two fixed paths that need no routing. HTTP, and any
    other WebSocket path, go through Starlette as usual.
    """

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state
        self.echo = app.state.services.settings.conformance_echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            path = scope["path"]
            if path in WS_PATHS:
                scope["app"] = self.app
                await FonanaEndpoint(scope, receive, send)
                return
            if path == CONFORMANCE_PATH:
                if self.echo:
                    from fonana_ws.web.conformance import EchoEndpoint

                    scope["app"] = self.app
                    await EchoEndpoint(scope, receive, send)
                    return
                if "websocket.http.response" in scope.get("extensions", {}):
                    # Off: a plain 404 (Starlette's router would refuse the upgrade, which is a 403).
                    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"9")]
                    await send({"type": "websocket.http.response.start", "status": 404, "headers": headers})
                    await send({"type": "websocket.http.response.body", "body": b"Not Found"})
                    return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FonanaApp:
    """The ASGI app: WebSocket on ``/ws`` and ``/``, and the HTTP API."""
    settings = settings or load_settings()
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await start(services)
        try:
            yield
        finally:
            await stop(services)

    routes = [
        WebSocketRoute("/ws", FonanaEndpoint),
        WebSocketRoute("/", FonanaEndpoint),
        Route("/api/publish", api.publish, methods=["POST"]),
        Route(access_api.PATH, access_api.revoke, methods=["POST"]),
        Route(batch_api.PATH, batch_api.publish_batch, methods=["POST"]),
        Route(users_api.PATH, users_api.disconnect_user, methods=["POST"]),
        Route(presence_api.PATH, presence_api.users, methods=["GET"]),
        Route("/health", api.health),
        Route("/ready", api.ready),
        *events_api.routes,
        *metrics.routes,
        *console_routes(settings),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.services = services
    return FonanaApp(app)
