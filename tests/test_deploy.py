"""Deployment for real: the repository's ecosystem.config.js under a real PM2, and the repository's
nginx config in front of a real server, with TLS, on loopback ports of our own.

PM2 comes from npm (cached in ~/.cache/fonana-ws-tests, PM2_HOME in a temp dir); nginx is Debian's
package, installed by ``./dev setup`` (CI runs it). Without Node.js or nginx these tests skip
with the reason, or fail under FONANA_WS_REQUIRE_SERVICES=1. Nothing touches the system's PM2, nginx
configuration or port 80.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets

from fonana_ws.auth import create_token

from .conftest import (
    ANY_ISO,
    API_KEY,
    SECRET,
    ServerProcess,
    clean_env,
    free_port,
    need_service,
    without_history,
)

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FONANA_WS_TEST_CACHE", Path.home() / ".cache" / "fonana-ws-tests"))
PM2_VERSION = "7"


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def wait_healthy(url: str, timeout: float = 20, alive: Any = None) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            if alive is not None:
                alive()
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout} s"
            await asyncio.sleep(0.1)


async def wait_for(pattern: str, path: Path, timeout: float = 5) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while not (match := re.search(pattern, read(path))):
        assert time.monotonic() < deadline, f"no {pattern!r} in {path}:\n{read(path)}"
        await asyncio.sleep(0.05)
    return match


async def run(
    *cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> str:
    """Run a command to completion without blocking the loop; its output, or AssertionError."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{' '.join(cmd)} took more than {timeout} s") from None
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{text}"
    return text


def fonana_ws_bin() -> Path:
    """The repository's .venv/bin/fonana-ws (what ecosystem.config.js runs), else this interpreter's."""
    default = ROOT / ".venv" / "bin" / "fonana-ws"
    return default if default.exists() else Path(sys.executable).parent / "fonana-ws"


# -- PM2 --------------------------------------------------------------------------------------------------


async def pm2_binary() -> Path:
    """PM2 from npm in the test cache (installed on first use)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        need_service("Node.js", "node and npm are not on PATH (apt-get install nodejs npm)")
    prefix = CACHE / f"pm2-{PM2_VERSION}"
    pm2 = prefix / "node_modules" / ".bin" / "pm2"
    if not pm2.exists():
        prefix.mkdir(parents=True, exist_ok=True)
        try:
            await run(
                "npm",
                "install",
                "--prefix",
                str(prefix),
                "--no-audit",
                "--no-fund",
                f"pm2@{PM2_VERSION}",
                timeout=300,
            )
        except AssertionError as exc:
            need_service("PM2", f"npm install pm2 failed: {exc}")
    return pm2


def test_ecosystem_file_describes_one_process_per_port() -> None:
    """What PM2 reads, as Node evaluates it: names, fork mode, graceful stop, logs, no secrets."""
    if shutil.which("node") is None:
        need_service("Node.js", "node is not on PATH")
    script = "console.log(JSON.stringify(require(process.argv[1])))"
    env = clean_env(WS_PORTS="3002,3003", FONANA_WS_LOG_DIR="/var/log/fonana-ws", JWT_SECRET=SECRET)
    apps = orjson.loads(
        subprocess.run(
            ["node", "-e", script, str(ROOT / "ecosystem.config.js")],
            env=env,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
    )["apps"]
    assert [a["name"] for a in apps] == ["fonana-ws", "fonana-ws-3003"]
    for app, port in zip(apps, ("3002", "3003"), strict=True):
        assert app["exec_mode"] == "fork" and app["instances"] == 1
        assert app["interpreter"] == "none" and app["args"] == "serve"
        assert app["script"] == str(ROOT / ".venv" / "bin" / "fonana-ws")
        assert app["env"] == {"WS_PORT": port}  # everything else comes from the environment
        assert app["kill_timeout"] > 8000  # longer than the server's own WS_SHUTDOWN_TIMEOUT
        assert app["out_file"].startswith("/var/log/fonana-ws/")
    assert SECRET not in orjson.dumps(apps).decode()
    text = (ROOT / "ecosystem.config.js").read_text()
    assert not re.search(r"(SECRET|API_KEY|DATABASE_URL|REDIS_URL)\s*[:=]\s*['\"]", text)


async def test_pm2_starts_and_stops_the_server_cleanly(tmp_path: Path) -> None:
    pm2 = await pm2_binary()
    port = free_port()
    home = tmp_path / "pm2"
    logs = tmp_path / "logs"
    env = clean_env(
        PM2_HOME=str(home),
        JWT_SECRET=SECRET,
        WS_API_KEY=API_KEY,
        WS_PORT=str(port),
        FONANA_WS_DATA_DIR=str(tmp_path / "data"),
        FONANA_WS_LOG_DIR=str(logs),
        FONANA_WS_BIN=str(fonana_ws_bin()),
        WS_SHUTDOWN_TIMEOUT="5",
    )
    try:
        await run(str(pm2), "start", str(ROOT / "ecosystem.config.js"), env=env, cwd=ROOT)
        await wait_healthy(f"http://127.0.0.1:{port}/health")
        listing = orjson.loads(await run(str(pm2), "jlist", env=env))
        (app,) = [p for p in listing if p["name"] == "fonana-ws"]
        assert app["pm2_env"]["status"] == "online"
        assert app["pm2_env"]["exec_mode"] == "fork_mode"

        # The secret from the environment reached the server: it accepts a token signed with it.
        token = create_token(SECRET, "demo-subscriber", 600)
        clients = [await websockets.connect(f"ws://127.0.0.1:{port}/ws?token={token}") for _ in range(3)]
        for ws in clients:
            assert orjson.loads(await ws.recv())["type"] == "connected"

        started = time.monotonic()
        stop = asyncio.create_task(run(str(pm2), "stop", "fonana-ws", env=env))
        for ws in clients:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code in (1001, 1012), closed.value
        await stop
        assert time.monotonic() - started < 8, "stop took until PM2's kill_timeout"

        listing = orjson.loads(await run(str(pm2), "jlist", env=env))
        (app,) = [p for p in listing if p["name"] == "fonana-ws"]
        assert app["pm2_env"]["status"] == "stopped"
        assert app["pm2_env"]["restart_time"] == 0
        err_log = logs / "fonana-ws.err.log"
        await wait_for(r"stopped by signal (2|15)\b", err_log)
        text = read(err_log)
        assert len(re.findall(r" connected conn=\S+ user=demo-subscriber client=127\.0\.0\.1", text)) == 3
        assert token not in text and SECRET not in text and API_KEY not in text
        # PM2 saw a clean exit, not a kill.
        await wait_for(r"fonana-ws:0\] exited with code \[0\]", home / "pm2.log")
        assert "SIGKILL" not in read(home / "pm2.log")
    finally:
        if (home / "pm2.pid").exists() or (home / "rpc.sock").exists():
            await run(str(pm2), "kill", env=env, timeout=30)


# -- nginx ------------------------------------------------------------------------------------------------


def nginx_binary() -> str:
    """Debian's nginx (nginx), installed by ``./dev setup`` (which CI runs), never by a test."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        need_service("nginx", "not installed: run ./dev setup (apt-get install nginx) as root")
    return found  # type: ignore[return-value]


def self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        need_service("openssl", "needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def site_config(
    upstream_port: int, https_port: int, http_port: int, cert: Path, key: Path, logs: Path
) -> str:
    """config/nginx/fonana-ws.conf with only the machine-specific lines changed; `location /ws` as is."""
    text = (ROOT / "config" / "nginx" / "fonana-ws.conf").read_text()
    replacements = [
        (r"server 127\.0\.0\.1:3002;", f"server 127.0.0.1:{upstream_port};"),
        (r"listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        (r"listen 80;", f"listen 127.0.0.1:{http_port};"),
        (r"\n\s*listen \[::\]:\d+[^;]*;", ""),
        (r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};"),
        (r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};"),
        (r"/var/log/nginx/fonana-ws\.access\.log", str(logs / "fonana-ws.access.log")),
    ]
    for pattern, new in replacements:
        text, count = re.subn(pattern, new, text)
        assert count, f"config/nginx/fonana-ws.conf no longer has {pattern!r}"
    return text


@asynccontextmanager
async def server_process(tmp: Path, **env: str) -> AsyncIterator[tuple[int, Path]]:
    settings = {"JWT_SECRET": SECRET, "WS_API_KEY": API_KEY, "FONANA_WS_DATA_DIR": str(tmp / "data"), **env}
    async with ServerProcess(settings, tmp, inherit=False) as proc:
        yield proc.port, proc.log_path


@asynccontextmanager
async def nginx_process(prefix: Path, site: str) -> AsyncIterator[None]:
    nginx = nginx_binary()
    for sub in ("tmp", "logs"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "fonana-ws.conf").write_text(site)
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    temp = " ".join(
        f"{kind}_temp_path {prefix / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (prefix / "nginx.conf").write_text(
        f"""{user}
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} info;
events {{ worker_connections 64; }}
http {{
    {temp}
    access_log {prefix / "logs" / "access.log"};
    include {prefix / "fonana-ws.conf"};
}}
"""
    )
    args = [
        nginx,
        "-p",
        str(prefix),
        "-c",
        str(prefix / "nginx.conf"),
        "-e",
        str(prefix / "logs" / "error.log"),
    ]
    await run(*args, "-t", timeout=30)  # the configuration is valid, as nginx itself sees it
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
        except TimeoutError:
            proc.kill()
            proc.wait()


async def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            await asyncio.sleep(0.05)


async def test_nginx_in_front_with_tls_and_the_clients_address(tmp_path: Path) -> None:
    nginx_binary()  # skip or fail early, before anything starts
    cert, key = self_signed(tmp_path)
    https_port, http_port = free_port(), free_port()
    prefix = tmp_path / "nginx"
    async with server_process(tmp_path) as (port, server_log):
        site = site_config(port, https_port, http_port, cert, key, prefix / "logs")
        async with nginx_process(prefix, site):
            await wait_port(https_port)
            tls = ssl.create_default_context(cafile=str(cert))
            token = create_token(SECRET, "demo-subscriber", 600)
            # The browser's real address is 127.0.0.1 here, itself a trusted proxy; the address it claims
            # comes first in X-Forwarded-For, and nginx appends the one it saw.
            ws = await websockets.connect(
                f"wss://localhost:{https_port}/ws?token={token}",
                ssl=tls,
                additional_headers={"X-Forwarded-For": "203.0.113.7"},
                close_timeout=1,
            )
            assert orjson.loads(await ws.recv()) == {
                "type": "connected",
                "data": {
                    "userId": "demo-subscriber",
                    "message": "Successfully connected to WebSocket server",
                    "expiresAt": ANY_ISO,
                },
            }
            await ws.send(
                orjson.dumps({"type": "subscribe", "channel": {"type": "post", "postId": "demo-post-locked"}})
            )
            assert orjson.loads(await ws.recv())["type"] == "subscribed"
            async with httpx.AsyncClient() as http:
                published = await http.post(
                    f"http://127.0.0.1:{port}/api/publish",
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    json={
                        "channel": "post_demo-post-locked",
                        "event": {"type": "post_liked", "likesCount": 7},
                    },
                )
                assert published.status_code == 202
                assert without_history(orjson.loads(await asyncio.wait_for(ws.recv(), 5))) == {
                    "type": "post_liked",
                    "likesCount": 7,
                }
                # Only /ws goes through: metrics, stats and the publish API are not on the public side.
                async with httpx.AsyncClient(verify=tls) as public:
                    for path in ("/metrics", "/stats", "/api/publish", "/health"):
                        r = await public.get(f"https://localhost:{https_port}{path}")
                        assert r.status_code in (403, 404), (path, r.status_code)  # nginx's own page
                        assert "fonana" not in r.text and "nginx" in r.text
                    plain = await public.get(f"http://127.0.0.1:{http_port}/ws", follow_redirects=False)
                    assert plain.status_code == 301 and plain.headers["location"].startswith("https://")
            line = await wait_for(r"connected conn=(\S+) user=demo-subscriber client=(\S+)", server_log)
            assert line.group(2) == "203.0.113.7"

            # A refusal through nginx still reaches the browser as close 1008 with the reason.
            bad = await websockets.connect(f"wss://localhost:{https_port}/ws?token={token}x", ssl=tls)
            with pytest.raises(websockets.ConnectionClosed) as refused:
                await asyncio.wait_for(bad.recv(), 5)
            assert refused.value.rcvd is not None and refused.value.rcvd.code == 1008
            assert refused.value.rcvd.reason.startswith("Unauthorized")

            # The operator's check, through nginx with TLS.
            check = await asyncio.create_subprocess_exec(
                str(fonana_ws_bin()),
                "test-client",
                "--url",
                f"wss://localhost:{https_port}/ws",
                "--http-url",
                f"http://127.0.0.1:{port}",
                cwd=tmp_path,
                env=clean_env(
                    JWT_SECRET=SECRET,
                    WS_API_KEY=API_KEY,
                    FONANA_WS_DATA_DIR=str(tmp_path / "data"),
                    SSL_CERT_FILE=str(cert),
                    COLUMNS="240",
                ),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(check.communicate(), 60)
            assert check.returncode == 0, out.decode()

            await ws.close()
            await wait_for(
                r"disconnected conn=\S+ user=demo-subscriber client=203\.0\.113\.7 code=1000", server_log
            )
        access = read(prefix / "logs" / "fonana-ws.access.log")
        assert re.search(r'"GET /ws HTTP/1\.1" 101 ', access), access
        assert token not in access and "token=" not in access
