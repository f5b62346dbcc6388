"""Run the app under uvicorn with the settings that the fan-out design depends on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from uvicorn.supervisors import Multiprocess

from fonana_ws.config import ConfigError, Settings, load_settings
from fonana_ws.logs import configure_logging
from fonana_ws.transport.http_edge import EdgeHttpProtocol
from fonana_ws.transport.wire import FonanaWSProtocol
from fonana_ws.web.app import FonanaApp, create_app, prepare_embedded


def uvicorn_config(settings: Settings, workers: int = 1) -> uvicorn.Config:
    ping = settings.ping_interval or None
    return uvicorn.Config(
        # Worker processes build their own app (from the same environment) after the fork.
        "fonana_ws.server:worker_app" if workers > 1 else create_app(settings),
        factory=workers > 1,
        workers=workers,
        host=settings.host,
        port=settings.port,
        ws=FonanaWSProtocol,
        ws_ping_interval=ping,
        # "drops a connection that did not answer the previous ping" (protocol §1)
        ws_ping_timeout=ping,
        ws_max_size=settings.max_message_size,
        # Its zlib state alone would dwarf a connection's memory; off unless asked for.
        ws_per_message_deflate=settings.per_message_deflate,
        loop="uvloop",
        # Both read their limits from the app's settings (picklable for --workers: no class per setting).
        http=EdgeHttpProtocol,
        lifespan="on",
        timeout_graceful_shutdown=settings.shutdown_timeout,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
    )


class Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT that led to a clean shutdown exits 0.

    uvicorn re-raises the captured signal after shutting down, so the process dies of it (-15); process
    managers and scripts read that as a crash.
    """

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                if self._captured_signals:
                    logging.getLogger("fonana_ws").info("stopped by signal %s", self._captured_signals[-1])
                self._captured_signals.clear()


def worker_app() -> FonanaApp:
    """The app of one worker process (``serve --workers N``): settings from the environment."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)


def serve(settings: Settings, workers: int = 1) -> bool:
    """Serve until SIGTERM/SIGINT (sockets closed with 1012); False when the start failed.

    With ``workers`` > 1, that many processes share the listening socket and reach each other through
    the broker, so it must be one they share (Redis or PostgreSQL).
    """
    configure_logging(settings.log_level, settings.log_json)
    log = logging.getLogger("fonana_ws")
    if workers > 1:
        if settings.broker_kind == "memory":
            raise ConfigError(
                "--workers needs a broker the processes share: set BROADCAST_URL (or REDIS_URL) to "
                "redis://... or postgresql://..."
            )
        if settings.embedded:
            asyncio.run(prepare_embedded(settings))  # once, before the workers race to seed it
        config = uvicorn_config(settings, workers)
        log.info("listening on ws://%s:%s/ws with %d workers", settings.host, settings.port, workers)
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return True
    log.info("listening on ws://%s:%s/ws", settings.host, settings.port)
    server = Server(uvicorn_config(settings))
    server.run()
    return server.started
