"""Fixtures for broker tests: the shared Redis/PostgreSQL, and private instances to kill and restart.

Fault tests never touch the shared services: they start their own broker on a free port with its
own temporary data directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("FONANA_WS_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("FONANA_WS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
# Private instances get a password in their URL so that tests can check logs never show it.
PRIVATE_PASSWORD = "s3cret-not-for-logs"


def service_missing(reason: str) -> NoReturn:
    """Skip the test, or fail it when FONANA_WS_REQUIRE_SERVICES=1 (CI must not skip silently)."""
    if os.environ.get("FONANA_WS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (FONANA_WS_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or fail, see service_missing) unless something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        service_missing(f"{name} is unreachable at {host}:{port}: {exc}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_service("Redis", *_host_port(REDIS_URL, 6379))
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_url() -> str:
    require_service("PostgreSQL", *_host_port(POSTGRES_URL, 5432))
    return POSTGRES_URL


class PrivateRedis:
    """A throwaway redis-server without persistence, restartable on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://:{PRIVATE_PASSWORD}@127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        # fmt: off
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
            "--requirepass", PRIVATE_PASSWORD,
        ]
        # fmt: on
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def private_redis() -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("redis-server is not installed; needed for the Redis fault test")
    workdir = Path(tempfile.mkdtemp(prefix="fonana-ws-redis-"))
    server = PrivateRedis(binary, workdir)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _postgres_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    return Path(dirs[-1]) if dirs else None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (trust auth), run as user postgres since initdb refuses root."""

    def __init__(self, bindir: Path, workdir: Path) -> None:
        self.bindir = bindir
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres:{PRIVATE_PASSWORD}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, check: bool = True) -> int:
        cmd = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )
        return done.returncode

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.datadir), "status", check=False) == 0

    def init(self) -> None:
        self._run("initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        if self.running():
            return
        opts = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.workdir / "log"), "-o", opts, "-w", "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    bindir = _postgres_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        service_missing("PostgreSQL server binaries (initdb, pg_ctl) not found; needed for the fault test")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            service_missing("running as root without a 'postgres' user to run initdb as")
    workdir = Path(tempfile.mkdtemp(prefix="fonana-ws-pg-"))
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    server = PrivatePostgres(bindir, workdir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):  # already stopped, or never started
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
