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
from urllib.parse import urlsplit

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


def broker_port(url: str) -> int:
    """The TCP port of a broker URL (``redis://h:6380/11`` -> 6380), its scheme's default if none."""
    parsed = urlsplit(url)
    return parsed.port or {"redis": 6379, "rediss": 6379, "postgresql": 5432, "postgres": 5432}[parsed.scheme]


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                    found.append(int(entry))
    return found


def established(table: str) -> dict[str, tuple[int, int]]:
    """Socket inode -> (local port, remote port) of the established connections in a /proc/net/tcp*
    table's text."""
    found: dict[str, tuple[int, int]] = {}
    for line in table.splitlines()[1:]:
        cols = line.split()
        if len(cols) > 9 and cols[3] == "01":  # 01 = ESTABLISHED
            found[cols[9]] = (int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16))
    return found


def tcp_connections() -> dict[str, tuple[int, int]]:
    """The machine's established TCP connections (IPv4 and IPv6): inode -> (local port, remote port)."""
    found: dict[str, tuple[int, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            found.update(established(Path(table).read_text()))
    return found


def socket_inodes(pid: int) -> list[str]:
    """The inodes of the sockets ``pid`` holds open (none if it is gone)."""
    inodes = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.append(link[8:-1])
    return inodes


def holds_connection_to(pid: int, port: int) -> bool:
    """Whether ``pid`` has an established TCP connection to ``port`` (a worker that reached the broker)."""
    conns = tcp_connections()
    return any(conns.get(inode, (0, 0))[1] == port for inode in socket_inodes(pid))


def accepted_by(pids: list[int], port: int) -> dict[int, int]:
    """How many established connections to local ``port`` each of ``pids`` holds: with ``--workers``
    the kernel hands each accepted connection to one worker, and this is its spread."""
    conns = tcp_connections()
    return {pid: sum(1 for i in socket_inodes(pid) if conns.get(i, (0, 0))[0] == port) for pid in pids}


def wait_workers(master: int, workers: int, port: int, timeout: float = 30.0) -> list[int]:
    """Wait until ``workers`` children of ``master`` are connected to the broker, and return them.

    The master listens before its workers are up; connections opened meanwhile all queue for the first
    worker to start accepting, which would skew the spread the benchmark is measuring. A worker connects
    to the broker in its startup, just before it serves, so that connection says it is ready.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [pid for pid in children(master) if holds_connection_to(pid, port)]
        if len(ready) >= workers:
            return ready
        time.sleep(0.1)
    raise RuntimeError(f"fonana-ws --workers {workers}: not all workers reached the broker in {timeout:g} s")


class Ours:
    """fonana-ws under test: one process, or several sharing a broker (``procs``), or one
    ``serve --workers N`` (``workers``).

    With ``procs``, the benchmark publishes on the first and its subscribers connect to the last, so every
    event crosses the broker. With ``workers`` the processes share one port: the kernel, not the
    benchmark, picks the process of each connection and publish. The CPU reported is that of all of them.
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
        workers: int = 1,
    ) -> None:
        if (procs > 1 or workers > 1) and broker.startswith("memory"):
            raise ValueError("several processes need a shared broker: --ours-broker redis://...")
        if procs > 1 and workers > 1:
            raise ValueError("--ours-procs and --ours-workers do not combine: choose one")
        self.port = port
        self.secret = secret
        self.api_key = api_key
        self.cpus = cpus
        self.users = users
        self.broker = broker
        self.count = procs
        self.workers = workers
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
        if self.workers > 1:
            wait_workers(self.procs[0].pid, self.workers, broker_port(self.broker))
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
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
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
