"""Shared fixtures: a real uvicorn server on a free port, real WebSocket clients, real databases.

The ``server`` fixture runs once on the embedded SQLite database and once on a fresh PostgreSQL
database made for this run, so every test that uses it exercises both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import databases
import httpx
import orjson
import pytest
import uvicorn
import websockets

from fonana_ws.auth import create_token
from fonana_ws.config import Settings, load_settings
from fonana_ws.db import create_schema, demo
from fonana_ws.server import uvicorn_config
from fonana_ws.web.services import Services

PG_URL = os.environ.get("FONANA_WS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("FONANA_WS_TEST_REDIS", "redis://127.0.0.1:6379/0")
SECRET = "test-secret-" + "x" * 32
API_KEY = "test-api-key-" + "y" * 32


def services_required() -> bool:
    return os.environ.get("FONANA_WS_REQUIRE_SERVICES") == "1"


def need_service(name: str, reason: str) -> None:
    """Skip (or, under FONANA_WS_REQUIRE_SERVICES=1, fail) a test whose service is not reachable."""
    message = f"{name} not available: {reason}"
    if services_required():
        pytest.fail(message + " (FONANA_WS_REQUIRE_SERVICES=1)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def postgres_reachable() -> str | None:
    """None when the test PostgreSQL answers, else why not."""
    import asyncpg

    try:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        await conn.close()
        return None
    except Exception as exc:
        return f"{PG_URL}: {exc}"


async def redis_reachable() -> str | None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
        return None
    except Exception as exc:
        return f"{REDIS_URL}: {exc}"
    finally:
        await client.aclose()


class fresh_pg_database:
    """``async with fresh_pg_database() as url``: a PostgreSQL database made for this run, then dropped."""

    async def __aenter__(self) -> str:
        import asyncpg

        if (why := await postgres_reachable()) is not None:
            need_service("PostgreSQL", why)
        self.name = f"fonana_ws_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        admin = await asyncpg.connect(PG_URL)
        await admin.execute(f'CREATE DATABASE "{self.name}"')
        await admin.close()
        return f"{PG_URL.rsplit('/', 1)[0]}/{self.name}"

    async def __aexit__(self, *exc: object) -> None:
        import asyncpg

        admin = await asyncpg.connect(PG_URL)
        await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        await admin.close()


class AnyIso:
    """Equal to any ISO 8601 UTC timestamp string (``connected.data.expiresAt``, protocol §7.6)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.endswith("Z") and "T" in other

    def __repr__(self) -> str:
        return "<any ISO 8601 time>"


ANY_ISO = AnyIso()


def without_history(frame: Any) -> Any:
    """``frame`` without what history adds to it (protocol §7.8), once checked to be well formed: an
    event's ``channelKey`` and ``offset``, ``subscribed``'s ``offset`` and ``epoch``.

    Tests of other features compare frames whole; the history fields would make every such comparison
    depend on how many events the channel had before. ``tests/test_recovery.py`` reads them (``raw``).
    """
    if not isinstance(frame, dict):
        return frame
    if "offset" in frame and "channelKey" in frame:
        offset, key = frame["offset"], frame["channelKey"]
        assert isinstance(offset, int) and offset >= 1 and isinstance(key, str) and "_" in key, frame
        return {k: v for k, v in frame.items() if k not in ("offset", "channelKey")}
    data = frame.get("data")
    if frame.get("type") == "subscribed" and isinstance(data, dict) and "epoch" in data:
        offset, epoch = data["offset"], data["epoch"]
        assert isinstance(offset, int) and offset >= 0 and isinstance(epoch, str), frame
        return {**frame, "data": {k: v for k, v in data.items() if k not in ("offset", "epoch")}}
    return frame


class Client:
    """A real WebSocket client with the few helpers the tests need.

    Frames come without their history fields (``without_history``) unless ``raw``.
    """

    def __init__(self, ws: Any, *, raw: bool = False) -> None:
        self.ws = ws
        self.raw = raw

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        frame = orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        return frame if self.raw else without_history(frame)

    async def recv_type(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame, which must be of type ``kind``."""
        frame = await self.recv(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def nothing(self, within: float = 0.3) -> None:
        """Assert that no frame arrives within ``within`` seconds."""
        try:
            frame = await asyncio.wait_for(self.ws.recv(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {frame}")

    async def subscribe(self, channel: dict[str, Any]) -> dict[str, Any]:
        await self.send({"type": "subscribe", "channel": channel})
        return await self.recv()

    async def close(self) -> None:
        await self.ws.close()


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """``-m unit`` opens only the modules that can hold a unit test (those that say ``mark.unit``): the
    others would be imported and collected only to be deselected, and schemathesis alone builds a test
    per OpenAPI operation while collecting (~5 s of a ~10 s unit run)."""
    if config.getoption("markexpr", "") != "unit":
        return None
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        if "mark.unit" not in collection_path.read_text(encoding="utf-8"):
            return True
    return None


@dataclass
class Server:
    """A running server and helpers to act on it as the web app and the browser would."""

    settings: Settings
    services: Services
    port: int
    http: httpx.AsyncClient
    clients: list[Client] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def db(self) -> Any:
        return self.services.store.db

    def token(self, user_id: str, expires: float = 600, **extra: Any) -> str:
        return create_token(self.settings.jwt_secret, user_id, expires, extra=extra)

    async def connect(
        self,
        user_id: str | None = None,
        *,
        token: str | None = None,
        path: str = "/ws",
        expect_connected: bool = True,
        **kwargs: Any,
    ) -> Client:
        token = token if token is not None else self.token(user_id or "")
        kwargs.setdefault("close_timeout", 1)
        ws = await websockets.connect(f"ws://127.0.0.1:{self.port}{path}?token={token}", **kwargs)
        client = Client(ws)
        self.clients.append(client)
        if expect_connected:
            frame = await client.recv()
            assert frame == {
                "type": "connected",
                "data": {
                    "userId": user_id,
                    "message": "Successfully connected to WebSocket server",
                    "expiresAt": ANY_ISO,
                },
            }, frame
        return client

    async def publish(self, body: dict[str, Any], key: str | None = API_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return await self.http.post("/api/publish", json=body, headers=headers)

    async def user(self, prefix: str = "u", *, creator: bool = False) -> str:
        user_id = f"{prefix}-{uuid.uuid4().hex[:10]}"
        await demo.insert_user(self.db, user_id, is_creator=creator)
        return user_id

    async def post(self, creator_id: str, *, locked: bool = False, tier: str | None = None) -> str:
        post_id = f"p-{uuid.uuid4().hex[:10]}"
        await demo.insert_post(self.db, post_id, creator_id, locked=locked, tier=tier)
        return post_id

    async def conversation(self, from_user: str, to_user: str) -> str:
        """A ``"Conversation"`` row between two users (protocol §7.1); its id."""
        conversation_id = f"cv-{uuid.uuid4().hex[:10]}"
        await demo.insert_conversation(self.db, conversation_id, from_user, to_user)
        return conversation_id


async def start_server(settings: Settings) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    config = uvicorn_config(settings)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    assert server.started, "server did not start"
    return server, task


def make_settings(tmp: Path, database_url: str | None, **env: str) -> Settings:
    environ = {
        "JWT_SECRET": SECRET,
        "WS_API_KEY": API_KEY,
        "FONANA_WS_DATA_DIR": str(tmp),
        "WS_PORT": str(free_port()),
        "WS_PING_INTERVAL": "5",
        **env,
    }
    if database_url:
        environ["DATABASE_URL"] = database_url
    return load_settings(environ, env_file=None)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    """One in-process server per database kind, shared by the tests of that kind."""
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    if request.param == "sqlite":
        async with running(make_settings(tmp, None)) as srv:
            yield srv
        return
    async with fresh_pg_database() as url, running(make_settings(tmp, url)) as srv:
        yield srv


class running:
    """``async with running(settings) as server``: a real uvicorn server for the block's duration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __aenter__(self) -> Server:
        self.uv, self.task = await start_server(self.settings)
        app = self.uv.config.loaded_app
        while hasattr(app, "app"):  # uvicorn wraps the app in its middlewares
            app = app.app
        services = app.state.services
        if not self.settings.embedded:
            await services.store.create_schema()
        self.srv = Server(
            settings=self.settings,
            services=services,
            port=self.settings.port,
            http=httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.settings.port}", timeout=10),
        )
        return self.srv

    async def __aexit__(self, *exc: object) -> None:
        for client in self.srv.clients:
            await client.ws.close()
        await self.srv.http.aclose()
        self.uv.should_exit = True
        await asyncio.wait_for(self.task, 15)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any of the server's settings, so that only ``extra`` configures it."""
    prefixes = (
        "WS_",
        "JWT_",
        "NEXTAUTH_",
        "DATABASE_",
        "BROADCAST_",
        "REDIS_",
        "LOG_",
        "FONANA_WS_",
        "METRICS_",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k != "TRUSTED_PROXIES"}
    env.update(extra)
    return env


class ServerProcess:
    """``async with ServerProcess(env, cwd) as proc``: ``fonana-ws serve`` as a real process.

    Its log goes to a file (``proc.log_path``) so that tests can read it after the fact. ``inherit=False``
    starts it from a clean environment (``clean_env``): only ``env`` configures it.
    """

    def __init__(
        self, env: dict[str, str], cwd: Path, port: int | None = None, *, inherit: bool = True
    ) -> None:
        self.port = port or free_port()
        base = os.environ if inherit else clean_env()
        self.env = {**base, **env, "WS_PORT": str(self.port)}
        self.cwd = cwd
        self.log_path = cwd / f"server-{self.port}.log"
        self.proc: Any = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def __aenter__(self) -> ServerProcess:
        import subprocess
        import sys

        self.cwd.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in __aexit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fonana_ws", "serve"],
            cwd=self.cwd,
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        async with httpx.AsyncClient() as http:
            for _ in range(300):
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if (await http.get(self.http_url + "/health")).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"server did not become healthy:\n{self.log()}")

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 15)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


@contextlib.asynccontextmanager
async def process_pair(
    tmp: Path, broker: str = "redis", **env: str
) -> AsyncIterator[tuple[list[ServerProcess], databases.Database]]:
    """Two ``fonana-ws serve`` processes on one fresh PostgreSQL database, sharing ``broker`` (``redis``:
    the shared Redis; ``postgres``: that database's LISTEN/NOTIFY), with ``env`` on top; and the
    database, to seed it."""
    if broker == "redis" and (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    async with fresh_pg_database() as db_url:
        db = databases.Database(db_url)
        await db.connect()
        try:
            await create_schema(db)
            base = {
                "JWT_SECRET": SECRET,
                "WS_API_KEY": API_KEY,
                "DATABASE_URL": db_url,
                "BROADCAST_URL": REDIS_URL if broker == "redis" else db_url,
            }
            async with contextlib.AsyncExitStack() as stack:
                procs = [
                    await stack.enter_async_context(ServerProcess({**base, **env}, tmp / f"n{i}"))
                    for i in range(2)
                ]
                yield procs, db
        finally:
            await db.disconnect()
