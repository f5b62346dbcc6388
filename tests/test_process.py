"""The server as a process: the embedded default from nothing, the CLI, config errors, memory under a
slow consumer, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import websockets

from fonana_ws.auth import create_token

from .conftest import ServerProcess, clean_env, free_port, without_history

CLI = [sys.executable, "-m", "fonana_ws"]


async def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
                )
            try:
                if (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("server did not become healthy")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_embedded_default_from_nothing_then_sigterm(tmp_path: Path) -> None:
    """No configuration at all: serve, mint a token with the CLI, connect, receive, SIGTERM."""
    port = free_port()
    env = clean_env(WS_PORT=str(port))
    proc = subprocess.Popen(
        [*CLI, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        await wait_healthy(port, proc)
        data = tmp_path / ".fonana-ws"
        assert stat.S_IMODE((data / "dev-secret").stat().st_mode) == 0o600
        assert (data / "fonana.db").exists()
        token = subprocess.run(
            [*CLI, "token", "--user", "demo-subscriber"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert token.count(".") == 2 and token.strip() == token.strip().split()[0]
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?token={token.strip()}")
        assert orjson.loads(await ws.recv())["type"] == "connected"
        await ws.send(
            orjson.dumps({"type": "subscribe", "channel": {"type": "post", "postId": "demo-post-locked"}})
        )
        assert orjson.loads(await ws.recv())["type"] == "subscribed"
        key = (data / "dev-api-key").read_text().strip()
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"http://127.0.0.1:{port}/api/publish",
                headers={"Authorization": f"Bearer {key}"},
                json={"channel": "post_demo-post-locked", "event": {"type": "post_liked", "likesCount": 3}},
            )
            assert r.status_code == 202
        assert without_history(orjson.loads(await ws.recv())) == {"type": "post_liked", "likesCount": 3}
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            await ws.recv()
            raise AssertionError("socket stayed open")
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code in (1001, 1012)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert time.monotonic() - started < 10
        _, err = proc.communicate()
        assert "DEVELOPMENT SECRET" in err
        assert token.strip() not in err and key not in err
        assert "demo-subscriber" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_setting_stops_the_start_naming_it(tmp_path: Path) -> None:
    for name, value in [
        ("WS_PORT", "abc"),
        ("BROADCAST_URL", "kafka://x"),
        ("WS_PING_INTERVAL", "soon"),
        ("DATABASE_URL", "mysql://x"),
    ]:
        result = subprocess.run(
            [*CLI, "serve"],
            cwd=tmp_path,
            env=clean_env(**{name: value}),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, (name, result.stderr)
        assert name in result.stderr, result.stderr


def test_postgres_without_secret_refuses_to_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "serve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(DATABASE_URL="postgresql://postgres@127.0.0.1:5432/test"),
    )
    assert result.returncode == 2 and "JWT_SECRET" in result.stderr


async def test_slow_consumer_does_not_grow_server_memory(tmp_path: Path) -> None:
    env = {"WS_SEND_BUFFER": "262144", "JWT_SECRET": "s" * 32, "WS_API_KEY": "k" * 32}
    async with ServerProcess(clean_env(**env), tmp_path) as proc:
        token = create_token("s" * 32, "demo-outsider", 600)
        ws = await websockets.connect(f"{proc.ws_url}?token={token}", max_queue=2, close_timeout=1)
        await ws.recv()
        await ws.send(orjson.dumps({"type": "subscribe", "channel": {"type": "creator", "id": "big"}}))
        await ws.recv()
        ws.transport.pause_reading()  # a client that stopped reading
        before = rss_kb(proc.proc.pid)
        pad = os.urandom(30_000).hex()  # 60 KB an event, 300 events: 18 MB offered to one stalled reader
        headers = {"Authorization": "Bearer " + "k" * 32}
        async with httpx.AsyncClient(base_url=proc.http_url, headers=headers) as http:
            for i in range(300):
                body = {"channel": "creator_big", "event": {"type": "x", "i": i, "pad": pad}}
                assert (await http.post("/api/publish", json=body)).status_code == 202
        await asyncio.sleep(0.5)
        grown_mb = (rss_kb(proc.proc.pid) - before) / 1024
        assert grown_mb < 12, f"server RSS grew {grown_mb:.1f} MB for one stalled reader"
        assert "slow consumer cut" in proc.log()
        ws.transport.resume_reading()
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed as exc:
            # The close frame (1013) is written behind the backlog; the transport is aborted 1 s later,
            # so a client that still was not reading may see an abrupt end instead.
            assert exc.rcvd is None or exc.rcvd.code == 1013


@pytest.mark.unit
def test_numbers_must_be_finite_and_in_range() -> None:
    from fonana_ws.config import ConfigError, load_settings

    base = {"JWT_SECRET": "s" * 32}
    for name, value in [
        ("JWT_LEEWAY", "nan"),
        ("JWT_LEEWAY", "inf"),
        ("JWT_LEEWAY", "100000"),
        ("WS_PING_INTERVAL", "nan"),
        ("WS_SHUTDOWN_TIMEOUT", "inf"),
        ("WS_USER_CACHE_TTL", "-1"),
        ("WS_SEND_BUFFER", "12"),
        ("METRICS_PORT", "3002"),
    ]:
        try:
            load_settings({**base, name: value}, env_file=None)
        except ConfigError as exc:
            assert name in str(exc), exc
        else:
            raise AssertionError(f"{name}={value} was accepted")
