"""A second HTTP listener in the running server (METRICS_PORT): the same edge limits, no signals."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from fonana_ws.transport.http_edge import EdgeHttpProtocol


class _QuietServer(uvicorn.Server):
    """The main server owns the signals; this one stops when the app does."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def side_listener(
    app: Any, host: str, port: int, *, setting: str
) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """Serve ``app`` on ``host:port`` until the returned server is told to exit; errors name ``setting``."""
    # Bound here, so that a taken port is an OSError naming it rather than uvicorn's sys.exit().
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{setting}: cannot listen on {host}:{port}: {exc.strerror}") from None
    config = uvicorn.Config(
        app, lifespan="off", log_config=None, access_log=False, http=EdgeHttpProtocol, ws="none"
    )
    server = _QuietServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises why it could not start (port taken, ...)
            raise RuntimeError(f"{setting} listener on {host}:{port} did not start")
        await asyncio.sleep(0.01)
    return server, task
