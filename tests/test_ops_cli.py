"""The operator commands as an operator runs them: a real ``fonana-ws`` process against a real server and
database (SQLite and PostgreSQL), including the failures scripts rely on (exit 1 / exit 2)."""

from __future__ import annotations

import asyncio
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from fonana_ws.auth import create_token, verify_token
from fonana_ws.config import SETTINGS, normalize_database_url
from fonana_ws.db import Store

from . import conftest
from .conftest import (
    API_KEY,
    SECRET,
    Server,
    free_port,
    fresh_pg_database,
    make_settings,
    need_service,
    redis_reachable,
    running,
)

CLI = [sys.executable, "-m", "fonana_ws"]
COMMANDS = ("serve", "token", "check-token", "find-user", "test-client", "doctor", "config")


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def clean_env(**extra: str) -> dict[str, str]:
    """No fonana-ws setting from the test process, and wide rich tables (one row per line)."""
    return conftest.clean_env(**{"COLUMNS": "240", **extra})


def server_env(srv: Server, **extra: str) -> dict[str, str]:
    """The settings of ``srv``, as an operator on that machine would have them."""
    return clean_env(
        JWT_SECRET=SECRET,
        WS_API_KEY=API_KEY,
        DATABASE_URL=srv.settings.database_url,
        WS_PORT=str(srv.port),
        FONANA_WS_DATA_DIR=str(srv.settings.data_dir),
        **extra,
    )


async def cli(
    *args: str, env: dict[str, str], cwd: Path, stdin: str | None = None, timeout: float = 60
) -> Result:
    """Run ``fonana-ws ARGS`` without blocking the event loop (the server under test runs in it)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else b""), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"fonana-ws {' '.join(args)} did not finish in {timeout} s") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def table_rows(text: str) -> dict[str, tuple[str, str]]:
    """A rich table's body rows: first cell -> (second cell, third cell)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) >= 2 and cells[0]:
            rows[cells[0]] = (cells[1], cells[2] if len(cells) > 2 else "")
    return rows


def doctor_lines(text: str) -> dict[str, tuple[str, str]]:
    """``fonana-ws doctor`` output: check name -> (ok | warn | FAIL, detail)."""
    lines = {}
    for line in text.splitlines():
        status = line[2:6].strip()
        if status in ("ok", "warn", "FAIL"):
            lines[line[7:17].strip()] = (status, line[18:])
    return lines


# -- help -------------------------------------------------------------------------------------------------


def test_help_on_everything() -> None:
    from fonana_ws_cli.main import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0
    for command in COMMANDS:
        assert command in top.output, command
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.output and "--help" in result.output
        if command == "test-client":  # nothing eaten as rich markup
            assert "ws://WS_HOST:WS_PORT/ws" in result.output


# -- check-token ------------------------------------------------------------------------------------------


async def test_check_token_accepts_and_explains_refusals(server: Server, tmp_path: Path) -> None:
    user = await server.user()
    env = server_env(server)
    forged = create_token("another-secret-" + "q" * 30, user)
    runs = await asyncio.gather(
        cli("check-token", server.token(user), env=env, cwd=tmp_path),
        cli("check-token", "-", env=env, cwd=tmp_path, stdin=server.token(user, wallet="W1") + "\n"),
        cli("check-token", server.token(user, expires=-3600), env=env, cwd=tmp_path),
        cli("check-token", forged, env=env, cwd=tmp_path),
        cli("check-token", server.token("nobody-" + user), env=env, cwd=tmp_path),
        cli("check-token", "not-a-token", env=env, cwd=tmp_path),
        cli("check-token", server.token(user), env={**env, "DATABASE_URL": dead_pg_url()}, cwd=tmp_path),
        # The web app signs with NEXTAUTH_SECRET while the server verifies with JWT_SECRET.
        cli(
            "check-token",
            server.token(user),
            env={**env, "JWT_SECRET": "z" * 40, "NEXTAUTH_SECRET": SECRET},
            cwd=tmp_path,
        ),
    )
    ok, stdin, expired, bad, unknown, garbage, db_down, mixed = runs
    assert ok.code == 0, ok.text
    assert "ACCEPTED" in ok.out and user in ok.out
    assert f"user {user}: found" in ok.out
    assert "userId" in ok.out and "exp" in ok.out
    assert stdin.code == 0 and "W1" in stdin.out  # the extra claim is shown
    assert expired.code == 1 and "REFUSED: Unauthorized: token expired" in expired.out
    assert "ago" in expired.out  # exp is shown as a time in the past
    assert bad.code == 1 and "invalid token signature" in bad.out
    assert unknown.code == 1 and "Unauthorized: unknown user" in unknown.out
    assert garbage.code == 1 and "malformed" in garbage.out
    assert db_down.code == 1 and "database unavailable" in db_down.out, db_down.text
    assert mixed.code == 1 and "verifies with NEXTAUTH_SECRET" in mixed.out, mixed.text
    for run in runs:
        assert SECRET not in run.text and API_KEY not in run.text


def dead_pg_url() -> str:
    """A PostgreSQL URL whose port nobody listens on."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"


# -- find-user --------------------------------------------------------------------------------------------


async def test_find_user(server: Server, tmp_path: Path) -> None:
    creator = await server.user("c", creator=True)
    await server.post(creator)
    plain = await server.user()
    env = server_env(server)
    runs = await asyncio.gather(
        cli("find-user", "--nickname", plain, env=env, cwd=tmp_path),
        cli(
            "find-user",
            "--creator",
            "--nickname",
            creator,
            "--token",
            "--expires",
            "2h",
            env=env,
            cwd=tmp_path,
        ),
        cli("find-user", "--creator", "--nickname", plain, env=env, cwd=tmp_path),
        cli("find-user", env=env, cwd=tmp_path),
        cli("find-user", "--creator", env=env, cwd=tmp_path),
        cli("find-user", env={**env, "DATABASE_URL": dead_pg_url()}, cwd=tmp_path),
    )
    by_nick, with_token, not_creator, anyone, a_creator, db_down = runs
    assert by_nick.code == 0 and by_nick.out == plain + "\n"
    assert with_token.code == 0, with_token.text
    user_id, token = with_token.out.split()
    assert user_id == creator
    assert verify_token(token, SECRET)[0] == creator
    assert 7000 < verify_token(token, SECRET)[1]["exp"] - verify_token(token, SECRET)[1]["iat"] <= 7200
    assert not_creator.code == 1 and not_creator.out == "" and "no creator" in not_creator.err
    assert anyone.code == 0
    assert await server.db.fetch_val("SELECT 1 FROM users WHERE id = :id", {"id": anyone.out.strip()}) == 1
    assert a_creator.code == 0
    found = a_creator.out.strip()
    assert await server.db.fetch_val('SELECT "isCreator" FROM users WHERE id = :id', {"id": found})
    posts = 'SELECT COUNT(*) FROM posts WHERE "creatorId" = :id'
    assert await server.db.fetch_val(posts, {"id": found}) > 0  # a creator with posts first
    assert db_down.code == 1 and "database unavailable" in db_down.err and db_down.out == ""


# -- test-client ------------------------------------------------------------------------------------------

TEST_CLIENT_CHECKS = (
    "health",
    "test user",
    "connect",
    "notifications",
    "feed",
    "creator",
    "open post",
    "ping",
    "refused sub",
    "event (channel)",
    "event (user)",
    "no token",
    "bad token",
    "expired token",
)


async def test_test_client_passes_against_a_running_server(server: Server, tmp_path: Path) -> None:
    creator = await server.user("c", creator=True)
    await server.post(creator)
    user = await server.user()
    failures_before = dict(server.services.stats.auth_failures)
    published_before = server.services.stats.events_published
    result = await cli("test-client", "--user", user, env=server_env(server), cwd=tmp_path)
    assert result.code == 0, result.text
    rows = table_rows(result.out)
    for check in TEST_CLIENT_CHECKS:
        assert rows[check][0] == "PASS", (check, rows.get(check))
    assert f"connected as {user}" in rows["connect"][1]
    assert "1008" in rows["expired token"][1] and "expired" in rows["expired token"][1]
    # The server really saw what the table says.
    failures = server.services.stats.auth_failures
    for cause in ("no_token", "bad_signature", "expired"):
        assert failures[cause] == failures_before.get(cause, 0) + 1, cause
    assert server.services.stats.events_published == published_before + 2

    # Without --user it picks one from the database.
    picked = await cli("test-client", env=server_env(server), cwd=tmp_path)
    assert picked.code == 0, picked.text
    assert table_rows(picked.out)["test user"][0] == "PASS"


async def test_test_client_fails_loudly(server: Server, tmp_path: Path) -> None:
    user = await server.user()
    env = server_env(server)
    stopped, wrong_key, wrong_secret = await asyncio.gather(
        cli("test-client", "--user", user, env={**env, "WS_PORT": str(free_port())}, cwd=tmp_path),
        cli("test-client", "--user", user, env={**env, "WS_API_KEY": "w" * 40}, cwd=tmp_path),
        cli("test-client", "--user", user, env={**env, "JWT_SECRET": "s" * 40}, cwd=tmp_path),
    )
    assert stopped.code == 1, stopped.text
    rows = table_rows(stopped.out)
    assert rows["health"][0] == "FAIL" and rows["connect"][0] == "FAIL"
    assert "cannot connect" in rows["connect"][1]
    assert rows["ping"][0] == "FAIL" and rows["no token"][0] == "FAIL"

    assert wrong_key.code == 1, wrong_key.text
    rows = table_rows(wrong_key.out)
    assert rows["connect"][0] == "PASS" and rows["ping"][0] == "PASS"
    assert rows["event (channel)"][0] == "FAIL" and "401" in rows["event (channel)"][1]
    assert rows["event (user)"][0] == "FAIL"

    assert wrong_secret.code == 1, wrong_secret.text
    rows = table_rows(wrong_secret.out)
    assert rows["connect"][0] == "FAIL" and "signature" in rows["connect"][1]


# -- doctor -----------------------------------------------------------------------------------------------

DOCTOR_CHECKS = ("secret", "api key", "dev files", "database", "schema", "broker", "port")


async def test_doctor_passes_beside_a_running_server(server: Server, tmp_path: Path) -> None:
    """The port is in use, by our own server: that passes (it answers /health)."""
    result = await cli("doctor", env=server_env(server), cwd=tmp_path)
    assert result.code == 0, result.text
    lines = doctor_lines(result.out)
    for check in DOCTOR_CHECKS:
        assert lines[check][0] == "ok", (check, lines.get(check))
    assert "JWT_SECRET (env)" in lines["secret"][1]
    assert "answers /health" in lines["port"][1]
    assert "7 tables" in lines["schema"][1]
    assert SECRET not in result.text and API_KEY not in result.text


async def test_doctor_with_redis_and_a_free_port(tmp_path: Path) -> None:
    if (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    from .conftest import REDIS_URL

    env = clean_env(
        JWT_SECRET=SECRET,
        WS_API_KEY=API_KEY,
        BROADCAST_URL=REDIS_URL,
        WS_PORT=str(free_port()),
        FONANA_WS_DATA_DIR=str(tmp_path / "data"),
    )
    result = await cli("doctor", env=env, cwd=tmp_path)
    assert result.code == 0, result.text
    lines = doctor_lines(result.out)
    assert lines["broker"] == ("ok", f"{REDIS_URL} reachable")
    assert lines["port"][0] == "ok" and "is free" in lines["port"][1]
    assert lines["database"][0] == "ok" and "does not exist yet" in lines["database"][1]
    assert not (tmp_path / "data" / "fonana.db").exists()  # doctor creates no database


async def test_doctor_warns_of_a_console_open_beyond_loopback(tmp_path: Path) -> None:
    base = clean_env(
        JWT_SECRET=SECRET,
        WS_API_KEY=API_KEY,
        WS_PORT=str(free_port()),
        FONANA_WS_DATA_DIR=str(tmp_path / "data"),
        WS_CONSOLE="1",
    )
    public = doctor_lines((await cli("doctor", env={**base, "WS_HOST": "0.0.0.0"}, cwd=tmp_path)).out)
    assert public["console"][0] == "warn", public
    assert "0.0.0.0" in public["console"][1] and "/console" in public["console"][1]
    local = doctor_lines((await cli("doctor", env=base, cwd=tmp_path)).out)
    assert "console" not in local, local  # on 127.0.0.1 the console is the developer's


async def test_doctor_missing_secret_and_broken_schema(tmp_path: Path) -> None:
    async with fresh_pg_database() as url:
        store = Store(normalize_database_url(url))
        await store.connect()
        try:
            await store.create_schema()
            missing = await cli(
                "doctor", env=clean_env(DATABASE_URL=url, WS_PORT=str(free_port())), cwd=tmp_path
            )
            await store.db.execute('ALTER TABLE posts DROP COLUMN "minSubscriptionTier"')
            await store.db.execute("DROP TABLE post_purchases")
            broken = await cli(
                "doctor",
                env=clean_env(
                    DATABASE_URL=url, JWT_SECRET=SECRET, WS_API_KEY=API_KEY, WS_PORT=str(free_port())
                ),
                cwd=tmp_path,
            )
        finally:
            await store.disconnect()
    # No secret against PostgreSQL: the server would not start. Doctor says so and checks the rest anyway.
    assert missing.code == 1, missing.text
    lines = doctor_lines(missing.out)
    assert lines["secret"][0] == "FAIL" and "JWT_SECRET" in lines["secret"][1]
    assert lines["api key"][0] == "FAIL" and "WS_API_KEY" in lines["api key"][1]
    assert lines["database"][0] == "ok" and lines["schema"][0] == "ok"
    assert "doctor-placeholder" not in missing.text

    assert broken.code == 1, broken.text
    lines = doctor_lines(broken.out)
    assert lines["secret"][0] == "ok" and lines["database"][0] == "ok"
    assert lines["schema"][0] == "FAIL"
    assert 'posts."minSubscriptionTier"' in lines["schema"][1]
    assert "table post_purchases" in lines["schema"][1]
    assert "notifications" not in lines["schema"][1]


async def test_doctor_database_down(tmp_path: Path) -> None:
    env = clean_env(
        DATABASE_URL=dead_pg_url(), JWT_SECRET=SECRET, WS_API_KEY=API_KEY, WS_PORT=str(free_port())
    )
    result = await cli("doctor", "--timeout", "3", env=env, cwd=tmp_path)
    assert result.code == 1, result.text
    lines = doctor_lines(result.out)
    assert lines["database"][0] == "FAIL", lines
    assert "127.0.0.1" in lines["database"][1]
    assert "schema" not in lines
    assert lines["secret"][0] == lines["broker"][0] == lines["port"][0] == "ok"


async def test_doctor_broker_down_and_port_taken(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = clean_env(
            JWT_SECRET=SECRET,
            WS_API_KEY=API_KEY,
            BROADCAST_URL=f"redis://127.0.0.1:{free_port()}/0",
            WS_PORT=str(port),
            FONANA_WS_DATA_DIR=str(tmp_path / "data"),
            METRICS_PORT="9090",
        )
        result = await cli("doctor", "--timeout", "3", env=env, cwd=tmp_path)
    assert result.code == 1, result.text
    lines = doctor_lines(result.out)
    assert lines["broker"][0] == "FAIL" and "unreachable" in lines["broker"][1]
    assert lines["port"][0] == "FAIL" and "another program" in lines["port"][1]
    assert lines["metrics"][0] == "ok" and ":9090" in lines["metrics"][1]
    assert lines["secret"][0] == "ok"


async def test_doctor_embedded_dev_secret_permissions_and_secret_disagreement(tmp_path: Path) -> None:
    data = tmp_path / ".fonana-ws"
    env = clean_env(WS_PORT=str(free_port()))
    first = await cli("doctor", env=env, cwd=tmp_path)
    # The embedded default works with its development secret: a warning, not a failure...
    assert first.code == 0, first.text
    lines = doctor_lines(first.out)
    assert lines["secret"][0] == "warn" and "development secret" in lines["secret"][1]
    assert lines["dev files"][0] == "ok"
    # ... unless warnings count.
    assert (await cli("doctor", "--strict", env=env, cwd=tmp_path)).code == 1

    (data / "dev-secret").chmod(0o644)
    loose = await cli("doctor", env=env, cwd=tmp_path)
    assert loose.code == 1
    status, detail = doctor_lines(loose.out)["dev files"]
    assert status == "FAIL" and "mode 644" in detail and "chmod 600" in detail
    (data / "dev-secret").chmod(0o600)
    assert stat.S_IMODE((data / "dev-api-key").stat().st_mode) == 0o600

    # The secret from .env; NEXTAUTH_SECRET in the environment disagrees with it.
    (tmp_path / ".env").write_text(f"JWT_SECRET={SECRET}\n")
    both = await cli("doctor", env={**env, "NEXTAUTH_SECRET": "n" * 40}, cwd=tmp_path)
    assert both.code == 0, both.text
    lines = doctor_lines(both.out)
    assert lines["secret"] == ("ok", f"from JWT_SECRET (.env), {len(SECRET)} characters")
    assert lines["secrets"][0] == "warn" and "differ" in lines["secrets"][1]
    assert (await cli("doctor", "--strict", env={**env, "NEXTAUTH_SECRET": "n" * 40}, cwd=tmp_path)).code == 1

    short = await cli("doctor", env={**env, "JWT_SECRET": "short"}, cwd=tmp_path)
    assert short.code == 1 and "at least 16" in doctor_lines(short.out)["secret"][1]
    bad_port = await cli("doctor", env={**env, "WS_PORT": "abc"}, cwd=tmp_path)
    assert bad_port.code == 1
    assert doctor_lines(bad_port.out)["settings"][0] == "FAIL" and "WS_PORT" in bad_port.out


# -- config -----------------------------------------------------------------------------------------------


async def test_config_shows_effective_settings_and_sources(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LOG_LEVEL=debug\nWS_PORT=4000\n")
    env = clean_env(
        WS_PORT="4100",
        NEXTAUTH_SECRET=SECRET,
        WS_API_KEY=API_KEY,
        DATABASE_URL="postgresql://fonana:hunter2-password@db.internal:5432/fonana?schema=public",
        REDIS_URL="redis://:redis-password@127.0.0.1:6379/0",
    )
    table, as_json = await asyncio.gather(
        cli("config", env=env, cwd=tmp_path), cli("config", "--json", env=env, cwd=tmp_path)
    )
    assert table.code == 0 and as_json.code == 0, table.text + as_json.text
    for run in (table, as_json):
        assert SECRET not in run.text and API_KEY not in run.text
        assert "hunter2-password" not in run.text and "redis-password" not in run.text
    rows = table_rows(table.out)
    assert rows["WS_PORT"] == ("4100", "env WS_PORT")  # the environment wins over .env
    assert rows["LOG_LEVEL"] == ("debug", ".env LOG_LEVEL")
    assert rows["WS_HOST"] == ("127.0.0.1", "default")
    body = orjson.loads(as_json.out)
    # One entry per row of the settings table, named by its variable; an old name shows as the source.
    assert list(body) == [row.env for row in SETTINGS] and set(rows) - {"setting"} == set(body)
    assert body["JWT_SECRET"] == {
        "value": f"set ({len(SECRET)} characters, not shown)",
        "source": "env NEXTAUTH_SECRET",
    }
    assert body["WS_SEND_BUFFER"] == {"value": "1048576", "source": "default"}
    assert body["WS_ALLOWED_ORIGINS"] == {"value": "off", "source": "default"}
    assert body["WS_API_KEY"] == {
        "value": f"set ({len(API_KEY)} characters, not shown)",
        "source": "env WS_API_KEY",
    }
    assert body["DATABASE_URL"]["value"] == "postgresql+asyncpg://fonana:***@db.internal:5432/fonana"
    assert body["BROADCAST_URL"] == {"value": "redis://:***@127.0.0.1:6379/0", "source": "env REDIS_URL"}

    bad = await cli("config", env={**env, "WS_PORT": "nope"}, cwd=tmp_path)
    assert bad.code == 2 and "WS_PORT must be a whole number, got 'nope'" in bad.err


@pytest.mark.parametrize("command", ["token", "find-user", "doctor"])
async def test_commands_run_from_a_fresh_directory(tmp_path: Path, command: str) -> None:
    """Nothing configured and no database yet: find-user says so (exit 1) without creating one."""
    args = {"token": ["--user", "demo-creator"], "find-user": [], "doctor": []}[command]
    result = await cli(command, *args, env=clean_env(WS_PORT=str(free_port())), cwd=tmp_path)
    expected = {"token": 0, "find-user": 1, "doctor": 0}[command]
    assert result.code == expected, result.text
    assert not (tmp_path / ".fonana-ws" / "fonana.db").exists()


async def test_test_client_through_a_custom_server(tmp_path: Path) -> None:
    """--url and --http-url point anywhere; here at a second server with its own settings."""
    settings = make_settings(tmp_path, None, WS_API_KEY="other-key-" + "k" * 30)
    async with running(settings) as srv:
        env = clean_env(
            JWT_SECRET=SECRET,
            WS_API_KEY="other-key-" + "k" * 30,
            FONANA_WS_DATA_DIR=str(tmp_path),
            WS_PORT=str(free_port()),  # not the server's: --url says where
        )
        result = await cli(
            "test-client",
            "--url",
            f"ws://localhost:{srv.port}/",
            "--http-url",
            f"http://127.0.0.1:{srv.port}",
            env=env,
            cwd=tmp_path,
        )
        assert result.code == 0, result.text
        rows = table_rows(result.out)
        assert rows["open post"][0] == "PASS" and "demo-post-open" in rows["open post"][1]
