"""``--spawn-ours``: start fonana-ws for the benchmark, with its users, like ``--spawn-peer`` does the peer.

The server runs the embedded default (SQLite in a throwaway data directory) seeded with the bench users
and an open post ``bench``, pinned to the server CPUs, with the same secret and API key as the peer, and
logging at warning level (the peer logs nothing per connection either).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fonana_ws.db import Store, demo


async def seed(database_url: str, users: list[str]) -> None:
    """The schema, the bench users, and the open post ``bench`` (channel ``post_bench``)."""
    store = Store(database_url)
    await store.connect()
    try:
        await store.create_schema()
        async with store.db.transaction():
            for user in users:
                await demo.insert_user(store.db, user)
            await demo.insert_post(store.db, "bench", users[0])
    finally:
        await store.disconnect()


class Ours:
    """One fonana-ws process under test."""

    def __init__(
        self, port: int, secret: str, api_key: str, cpus: str, users: list[str], broker: str = "memory://"
    ) -> None:
        self.port = port
        self.secret = secret
        self.api_key = api_key
        self.cpus = cpus
        self.users = users
        self.broker = broker
        self.dir = Path(tempfile.mkdtemp(prefix="fonana-ws-bench-"))
        self.proc: subprocess.Popen | None = None
        self.logf = None

    def start(self) -> tuple[str, str, int]:
        """Start it; returns (ws url, http url, pid)."""
        database_url = f"sqlite+aiosqlite:///{self.dir / 'bench.db'}"
        asyncio.run(seed(database_url, self.users))
        env = dict(
            os.environ,
            JWT_SECRET=self.secret,
            WS_API_KEY=self.api_key,
            WS_PORT=str(self.port),
            DATABASE_URL=database_url,
            BROADCAST_URL=self.broker,
            FONANA_WS_DATA_DIR=str(self.dir),
            LOG_LEVEL="warning",
        )
        cmd = [sys.executable, "-m", "fonana_ws", "serve"]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", self.cpus, *cmd]
        self.logf = open(self.dir / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.dir, stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"fonana-ws exited with {self.proc.returncode}; see {self.dir / 'server.log'}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("fonana-ws did not start listening in 30 s")
        return f"ws://127.0.0.1:{self.port}/ws", f"http://127.0.0.1:{self.port}", self.proc.pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.logf:
            self.logf.close()
        shutil.rmtree(self.dir, ignore_errors=True)
