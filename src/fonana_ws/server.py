"""Run the app under uvicorn with the settings that the fan-out design depends on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from .app import create_app
from .config import Settings
from .logs import configure_logging
from .wire import FonanaWSProtocol


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    ping = settings.ping_interval or None
    return uvicorn.Config(
        create_app(settings),
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
        http="httptools",
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


def serve(settings: Settings) -> bool:
    """Serve until SIGTERM/SIGINT (sockets closed with 1012); False when the start failed."""
    configure_logging(settings.log_level, settings.log_json)
    logging.getLogger("fonana_ws").info("listening on ws://%s:%s/ws", settings.host, settings.port)
    server = Server(uvicorn_config(settings))
    server.run()
    return server.started
