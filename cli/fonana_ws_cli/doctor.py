"""``fonana-ws doctor``: is this environment ready to run the server? One line per check."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from fonana_ws.config import (
    BY_NAME,
    DEV_API_KEY_FILE,
    DEV_SECRET_FILE,
    SETTINGS,
    ConfigError,
    Settings,
    load_settings,
    lookup,
    read_env_file,
)
from fonana_ws.net import is_loopback

if TYPE_CHECKING:  # broker, database and HTTP client load when a check runs, not with every command
    from fonana_ws.db import Store

from .common import DatabaseProblem, describe_error, guarded, open_store, out, sqlite_file

#: What the server reads of the web app's tables (``db/store.py``): each must be there and readable.

OK, WARN, FAIL = "ok", "warn", "FAIL"
STYLE = {OK: "green", WARN: "yellow", FAIL: "red"}
#: A stand-in secret that lets the other checks run when the real one is missing or too short.
PLACEHOLDER = "doctor-placeholder-secret-0123456789"


@dataclass
class Check:
    name: str
    status: str
    detail: str


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def add(self, name: str, status: str, detail: str) -> None:
        check = Check(name, status, detail)
        self.checks.append(check)
        mark = {OK: "✓", WARN: "!", FAIL: "✗"}[status]
        style = STYLE[status]
        out.print(f"[{style}]{mark} {status:<4}[/{style}] {name:<10} {detail}")

    def failed(self, strict: bool) -> bool:
        bad = (FAIL, WARN) if strict else (FAIL,)
        return any(c.status in bad for c in self.checks)


def layered_env() -> tuple[dict[str, str], dict[str, str]]:
    """The process environment and the .env file, as the settings loader reads them."""
    return dict(os.environ), read_env_file(".env")


def refusal(variable: str, raw: str) -> str | None:
    """The loader's own message when ``raw`` would stop the start (the table's kind of the setting)."""
    try:
        BY_NAME[variable].kind(variable, raw)
    except ConfigError as exc:
        return str(exc)
    return None


def check_secret(report: Report, environ: dict[str, str], dotenv: dict[str, str], postgres: bool) -> bool:
    """JWT_SECRET wins over NEXTAUTH_SECRET, as in the web app. False: the server would not start."""

    def get(name: str) -> tuple[str | None, str]:
        found = lookup((name,), environ, dotenv)
        return (found[0], found[2]) if found else (None, "")

    jwt_secret, jwt_from = get("JWT_SECRET")
    nextauth, nextauth_from = get("NEXTAUTH_SECRET")
    name, value, where = (
        ("JWT_SECRET", jwt_secret, jwt_from) if jwt_secret else ("NEXTAUTH_SECRET", nextauth, nextauth_from)
    )
    if not value:
        if postgres:
            report.add(
                "secret",
                FAIL,
                "neither JWT_SECRET nor NEXTAUTH_SECRET is set: the server will not start against "
                "PostgreSQL; set it to the web app's secret",
            )
            return False
        report.add(
            "secret",
            WARN,
            "neither JWT_SECRET nor NEXTAUTH_SECRET is set: the development secret is used, so the web app's "
            "tokens will be refused",
        )
        return True
    if problem := refusal(name, value):
        report.add("secret", FAIL, f"{problem} (set in {where})")
        return False
    report.add("secret", OK, f"from {name} ({where}), {len(value)} characters")
    if jwt_secret and nextauth and jwt_secret != nextauth:
        report.add(
            "secrets",
            WARN,
            f"JWT_SECRET ({jwt_from}) and NEXTAUTH_SECRET ({nextauth_from}) differ: the server verifies with "
            "JWT_SECRET, so the web app must sign its tokens with JWT_SECRET too",
        )
    return True


def check_api_key(report: Report, settings: Settings, raw: str | None) -> None:
    if raw is not None and (problem := refusal("WS_API_KEY", raw)):
        report.add("api key", FAIL, problem)
    elif settings.api_key:
        where = settings.sources.get("WS_API_KEY", "")
        report.add("api key", OK, f"set ({where}), {len(settings.api_key)} characters")
    else:
        report.add("api key", FAIL, "WS_API_KEY is not set: the web app cannot publish events over HTTP")


def check_dev_files(report: Report, settings: Settings) -> None:
    problems, seen = [], []
    for name in (DEV_SECRET_FILE, DEV_API_KEY_FILE):
        path = settings.data_dir / name
        if not path.exists():
            continue
        seen.append(str(path))
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            problems.append(f"{path} has mode {mode:o} (run: chmod 600 {path})")
    if problems:
        report.add("dev files", FAIL, "; ".join(problems))
    elif seen:
        report.add("dev files", OK, "mode 600: " + ", ".join(seen))
    else:
        report.add("dev files", OK, "no development secret files in use")


async def check_database(report: Report, settings: Settings, wait: float) -> None:
    from fonana_ws.broker import mask_url
    from fonana_ws.db import lookups
    from fonana_ws.db.store import SERVER_READS

    where = mask_url(settings.database_url)
    path = sqlite_file(settings)
    if path is not None and not path.exists():
        report.add("database", OK, f"embedded SQLite {path} does not exist yet: `serve` creates it")
        return
    try:
        async with open_store(settings, wait) as store:
            report.add("database", OK, f"{where} answers")
            missing: list[str] = []
            for table, columns in SERVER_READS.items():
                try:
                    await guarded(lookups.probe(store, table, columns), wait)
                except DatabaseProblem as exc:
                    missing.extend(await _missing(store, table, columns, wait, exc))
    except DatabaseProblem as exc:
        report.add("database", FAIL, str(exc))
        return
    if missing:
        report.add("schema", FAIL, "the server cannot read " + "; ".join(missing))
    else:
        report.add(
            "schema",
            OK,
            f"{len(SERVER_READS)} tables, {sum(map(len, SERVER_READS.values()))} columns the server reads",
        )


async def _missing(
    store: Store, table: str, columns: tuple[str, ...], wait: float, first: Exception
) -> list[str]:
    """Which of ``table``'s columns the server cannot read (the whole table when even one query fails)."""
    from fonana_ws.db import lookups

    try:
        await guarded(lookups.probe(store, table), wait)
    except DatabaseProblem as exc:
        return [f"table {table} ({exc})"]
    gone = []
    for column in columns:
        try:
            await guarded(lookups.probe(store, table, (column,)), wait)
        except DatabaseProblem:
            gone.append(f'{table}."{column}"')
    return gone or [f"table {table} ({first})"]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def captured(name: str) -> Iterator[_Capture]:
    """Keep a logger's lines (the broker's reconnect warnings) for the report instead of the terminal."""
    logger = logging.getLogger(name)
    handler, old = _Capture(), (logger.propagate, logger.level)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate, _ = old
        logger.setLevel(old[1])


async def check_broker(report: Report, settings: Settings, wait: float) -> None:
    from fonana_ws.broker import Broker, mask_url

    url = mask_url(settings.broadcast_url)
    if settings.broker_kind == "memory":
        report.add("broker", OK, "memory:// (one process only; use Redis or PostgreSQL to run several)")
        return
    with captured("fonana_ws.broker") as logs:
        broker = None
        try:
            broker = Broker(settings.broadcast_url)
            await asyncio.wait_for(broker.connect(), wait)
            up = broker.is_up
        except Exception as exc:
            up, logs.messages = False, [*logs.messages, describe_error(exc)]
        finally:
            if broker is not None:
                try:
                    await asyncio.wait_for(broker.disconnect(), wait)
                except Exception:
                    pass
    if up:
        report.add("broker", OK, f"{url} reachable")
    else:
        why = next((m for m in reversed(logs.messages) if "down" in m or "Error" in m), None)
        report.add("broker", FAIL, f"{url} unreachable" + (f": {why}" if why else ""))


async def check_port(report: Report, settings: Settings, wait: float) -> None:
    import httpx

    host, port = settings.host, settings.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
            report.add("port", OK, f"{host}:{port} is free")
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                report.add("port", FAIL, f"cannot listen on {host}:{port}: {exc.strerror}")
                return
    probe = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{'[' + probe + ']' if ':' in probe else probe}:{port}/health"
    try:
        async with httpx.AsyncClient(timeout=min(wait, 2.0)) as http:  # ours answers in milliseconds
            response = await http.get(url)
        ours = response.status_code == 200 and response.json() == {"status": "ok"}
    except Exception:
        ours = False
    if ours:
        report.add("port", OK, f"{host}:{port} is in use by a running fonana-ws (it answers /health)")
    else:
        report.add("port", FAIL, f"{host}:{port} is in use by another program (no fonana-ws /health there)")


def check_values(report: Report, settings: Settings) -> None:
    """What the settings table says about values that start fine but should not stay: a row marked
    ``unsafe`` while it is on, a row marked ``production`` left unset outside the embedded default."""
    for row in SETTINGS:
        if row.unsafe and getattr(settings, row.attr):
            report.add("unsafe", WARN, f"{row.env} is on: {row.unsafe}")
    if settings.embedded:
        return
    wanted = [row for row in SETTINGS if row.production]
    missing = [f"{row.env} ({row.production})" for row in wanted if not getattr(settings, row.attr)]
    if missing:
        report.add("production", WARN, "not set on a production setup: " + "; ".join(missing))
    else:
        values = (f"{row.env}={row.show(getattr(settings, row.attr))}" for row in wanted)
        report.add("production", OK, ", ".join(values))


def check_console(report: Report, settings: Settings) -> None:
    """The console's page itself cannot ask for the API key (a browser opening a page sends no Bearer
    header), so whoever reaches the port can load it; its data routes stay closed. On loopback that is
    the developer; anywhere else it is worth a word."""
    if settings.console and not is_loopback(settings.host):
        report.add(
            "console",
            WARN,
            f"WS_CONSOLE is on and the server listens on {settings.host}: anyone who reaches port "
            f"{settings.port} can open /console (its data still needs the API key or loopback); "
            "leave it off outside development",
        )


async def run_checks(report: Report, wait: float) -> None:
    environ, dotenv = layered_env()
    raw_db = lookup(BY_NAME["DATABASE_URL"].names, environ, dotenv)
    postgres = raw_db is not None and raw_db[0].startswith("postgres")
    secret_ok = check_secret(report, environ, dotenv, postgres)
    found_key = lookup(BY_NAME["WS_API_KEY"].names, environ, dotenv)
    raw_key = found_key[0] if found_key else None
    # The secret and the API key have their own lines: let the other checks run without them.
    patched = dict(environ)
    if not secret_ok:
        patched.update(JWT_SECRET=PLACEHOLDER)
    if raw_key is not None and refusal("WS_API_KEY", raw_key):
        patched.update(WS_API_KEY=PLACEHOLDER)
    try:
        settings = load_settings(patched)
    except ConfigError as exc:
        report.add("settings", FAIL, str(exc))
        return
    except OSError as exc:  # the embedded default could not write its development secret
        report.add("settings", FAIL, f"{exc.filename or ''}: {exc.strerror or exc}")
        return
    check_api_key(report, settings, raw_key)
    check_values(report, settings)
    check_console(report, settings)
    check_dev_files(report, settings)
    await check_database(report, settings, wait)
    await check_broker(report, settings, wait)
    await check_port(report, settings, wait)
    if settings.metrics_port:
        report.add(
            "metrics",
            OK,
            f"/metrics on http://{settings.host}:{settings.port} and http://{settings.metrics_host}:"
            f"{settings.metrics_port} (METRICS_PORT)",
        )


def doctor(
    timeout: float = typer.Option(5.0, help="Seconds to wait for each service."),
    strict: bool = typer.Option(False, "--strict", help="Count warnings as failures."),
) -> None:
    """Check the environment: secret (and JWT_SECRET/NEXTAUTH_SECRET disagreeing), API key, permissions
    of the development secret files, database and the columns the server reads, broker, port. One line
    per check; exit 0 only when every check passes (warnings pass unless --strict), else 1."""
    report = Report()
    asyncio.run(run_checks(report, timeout))
    failed = report.failed(strict)
    counts = {s: sum(c.status == s for c in report.checks) for s in (OK, WARN, FAIL)}
    summary = f"doctor: {counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failing"
    out.print(f"[{'red' if failed else 'green'}]{summary}[/]")
    if failed:
        raise typer.Exit(1)
