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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import databases

from fonana_ws.db import Store, demo

#: More rows for one benchmark (e.g. a locked post and its subscriptions), inserted after the users in
#: the same transaction.
SeedExtra = Callable[[databases.Database], Awaitable[None]]


async def seed(database_url: str, users: list[str], extra: SeedExtra | None = None) -> None:
    """The schema, the bench users, the open post ``bench`` (channel ``post_bench``), then ``extra``."""
    store = Store(database_url)
    await store.connect()
    try:
        await store.create_schema()
        async with store.db.transaction():
            for user in users:
                await demo.insert_user(store.db, user)
            await demo.insert_post(store.db, "bench", users[0])
            if extra is not None:
                await extra(store.db)
    finally:
        await store.disconnect()


async def fresh_postgres(url: str) -> None:
    """Drop and create the database ``url`` names (a benchmark's own, e.g. ``fonana_bench``)."""
    import asyncpg

    base, _, name = url.split("://", 1)[1].rpartition("/")
    if not name.startswith("fonana_bench"):
        raise SystemExit(f"refusing to recreate database {name!r}: a benchmark's must be named fonana_bench*")
    admin = await asyncpg.connect(f"postgresql://{base}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


class Ours:
    """fonana-ws under test: one process, or several sharing a broker (``procs``).

    With several, the benchmark publishes on the first and its subscribers connect to the last, so every
    event crosses the broker; the CPU reported is that of all of them.
    """

    def __init__(
        self,
        port: int,
        secret: str,
        api_key: str,
        cpus: str,
        users: list[str],
        broker: str = "memory://",
        procs: int = 1,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        seed_extra: SeedExtra | None = None,
    ) -> None:
        if procs > 1 and broker.startswith("memory"):
            raise ValueError("several processes need a shared broker: --ours-broker redis://...")
        self.port = port
        self.secret = secret
        self.api_key = api_key
        self.cpus = cpus
        self.users = users
        self.broker = broker
        self.count = procs
        #: The interpreter whose fonana_ws is measured: another checkout's venv compares two versions.
        self.python = python
        #: Merged over the server's environment last: a variant of one checkout (e.g. history off).
        self.env = dict(env or {})
        self.seed_extra = seed_extra
        self.dir = Path(tempfile.mkdtemp(prefix="fonana-ws-bench-"))
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []

    @property
    def database_url(self) -> str:
        """The servers' SQLite file (a benchmark may change rows in it while they run), or the PostgreSQL
        database a variant names (``pg:DATABASE_URL=postgresql://.../fonana_bench``: made afresh here)."""
        given = self.env.get("DATABASE_URL", "")
        if given.startswith("postgres"):
            return "postgresql+asyncpg://" + given.split("://", 1)[1]
        return f"sqlite+aiosqlite:///{self.dir / 'bench.db'}"

    def start(self) -> tuple[str, str, list[int]]:
        """Start them; returns (ws url of the last, http url of the first, pids)."""
        if self.database_url.startswith("postgresql"):
            asyncio.run(fresh_postgres(self.database_url))
        asyncio.run(seed(self.database_url, self.users, self.seed_extra))
        for i in range(self.count):
            self._start_one(self.port + i, self.database_url)
        last = self.port + self.count - 1
        return f"ws://127.0.0.1:{last}/ws", f"http://127.0.0.1:{self.port}", [p.pid for p in self.procs]

    def _start_one(self, port: int, database_url: str) -> None:
        env = dict(
            os.environ,
            JWT_SECRET=self.secret,
            WS_API_KEY=self.api_key,
            WS_PORT=str(port),
            DATABASE_URL=database_url,
            BROADCAST_URL=self.broker,
            FONANA_WS_DATA_DIR=str(self.dir),
            LOG_LEVEL="warning",
        )
        env.update(self.env)
        cmd = [self.python, "-m", "fonana_ws", "serve"]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", self.cpus, *cmd]
        logf = open(self.dir / f"server-{port}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.logs.append(logf)
        proc = subprocess.Popen(cmd, env=env, cwd=self.dir, stdout=logf, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"fonana-ws exited with {proc.returncode}; see {logf.name}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("fonana-ws did not start listening in 30 s")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for logf in self.logs:
            logf.close()
        shutil.rmtree(self.dir, ignore_errors=True)
