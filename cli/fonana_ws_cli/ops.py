"""Operator commands: check-token, find-user, config (doctor and test-client live in their own modules).

Exit codes, for every command here: 0 all good, 1 the check failed (token refused, no such user,
database down, a failed check), 2 a setting has a value the server cannot run with.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import orjson
import typer
from dotenv import dotenv_values
from rich.table import Table

from fonana_ws.auth import AuthError, create_token, verify_with
from fonana_ws.broker import mask_url
from fonana_ws.config import SETTINGS, Settings

from .common import (
    DatabaseProblem,
    err,
    find_user,
    open_store,
    out,
    parse_duration,
    settings_or_exit,
    user_row,
)


def register(app: typer.Typer) -> None:
    """Add the operator commands to the main ``fonana-ws`` app."""
    from . import doctor, testclient

    app.command("check-token")(check_token)
    app.command("find-user")(find_user_command)
    app.command("test-client")(testclient.test_client)
    app.command("doctor")(doctor.doctor)
    app.command("config")(config)


# -- check-token --------------------------------------------------------------------------------------


def raw_setting(name: str) -> str | None:
    """A variable as the settings loader sees it: the environment, then ``.env``."""
    if os.environ.get(name):
        return os.environ[name]
    if Path(".env").is_file():
        return dotenv_values(".env").get(name) or None
    return None


def when(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return repr(ts)
    at = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = ts - time.time()
    return f"{at} ({'in ' + span(delta) if delta >= 0 else span(-delta) + ' ago'})"


def span(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def hint(cause: str, settings: Settings, token: str) -> str | None:
    """What an operator can do about a refusal."""
    if cause == "bad_signature":
        used = settings.jwt_secret_source
        other = "NEXTAUTH_SECRET" if used == "JWT_SECRET" else "JWT_SECRET"
        other_value = raw_setting(other)
        if other_value and other_value != settings.jwt_secret:
            try:
                jwt.decode(
                    token,
                    other_value,
                    algorithms=["HS256"],
                    options={"verify_exp": False, "verify_aud": False},
                )
                return (
                    f"it verifies with {other}, not with {used} that the server uses: "
                    "give both programs the same secret"
                )
            except jwt.InvalidTokenError:
                pass
        return (
            f"signed with another secret than the server's (from {used}); the web app signs with JWT_SECRET "
            "when set, else NEXTAUTH_SECRET: both must hold the same value"
        )
    if cause == "expired":
        return f"ask the web app for a fresh token (leeway {settings.jwt_leeway:g} s)"
    if cause == "unknown_user":
        return "the token is fine but no row in users has this id: is DATABASE_URL the web app's database?"
    if cause == "database":
        return "the database did not answer: see `fonana-ws doctor`"
    if cause == "no_token":
        return "pass the token as the argument, or - to read it from standard input"
    return None


def check_token(
    token: str = typer.Argument(..., help="The JWT to check, or - to read it from standard input."),
    timeout: float = typer.Option(5.0, help="Seconds to wait for the database."),
) -> None:
    """Verify a token as the server would: show its claims, the user it resolves to, and why it would
    be refused. Exit 0 when the server would accept it, 1 when it would refuse it."""
    settings = settings_or_exit()
    if token == "-":
        token = sys.stdin.read().strip()
    claims: dict[str, Any] = {}
    header: dict[str, Any] = {}
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        pass

    table = Table(title="token", show_header=True, header_style="bold")
    table.add_column("claim")
    table.add_column("value", overflow="fold")
    if header:
        table.add_row("(header) alg", str(header.get("alg")))
    for name, value in claims.items():
        shown = when(value) if name in ("exp", "iat", "nbf") else str(value)
        table.add_row(name, shown)
    if claims or header:
        out.print(table)
    else:
        out.print("not a JWT: three base64url parts separated by dots expected")
    out.print(f"secret: from {settings.jwt_secret_source}")

    async def resolve() -> tuple[str | None, AuthError | None]:
        user_id: str | None = None
        try:
            user_id, _ = verify_with(settings, token)
        except AuthError as exc:
            return None, exc
        try:
            async with open_store(settings, timeout) as store:
                row = await user_row(store, user_id)
        except DatabaseProblem as exc:
            out.print(f"user {user_id}: database unavailable ({exc})")
            return user_id, AuthError("database", "user lookup failed (database unavailable)")
        if row is None:
            out.print(f"user {user_id}: [red]not in the users table[/red]")
            return user_id, AuthError("unknown_user", "unknown user")
        kind = "creator" if row["creator"] else "user"
        out.print(f"user {user_id}: found ({kind}, nickname {row['nickname']}, wallet {row['wallet']})")
        return user_id, None

    user_id, problem = asyncio.run(resolve())
    if problem is not None:
        out.print(f"[red bold]REFUSED[/red bold]: {problem.reason} (close 1008)")
        if (advice := hint(problem.cause, settings, token)) is not None:
            out.print(f"  hint: {advice}")
        raise typer.Exit(1)
    out.print(f"[green bold]ACCEPTED[/green bold]: the server would connect this token as user {user_id}")


# -- find-user ------------------------------------------------------------------------------------------


def find_user_command(
    creator: bool = typer.Option(False, "--creator", help="A creator (one with posts first)."),
    nickname: str = typer.Option(None, "--nickname", "-n", help="The user with this nickname."),
    token: bool = typer.Option(False, "--token", help="Also print a token for the user (second line)."),
    expires: str = typer.Option("30m", help="Lifetime of the token, e.g. 90s, 30m, 2h, 7d."),
    timeout: float = typer.Option(5.0, help="Seconds to wait for the database."),
) -> None:
    """Find a user to test with in the configured database and print its id (and, with --token, a
    ready token on the next line). Details go to standard error. Exit 1 when none is found."""
    settings = settings_or_exit()
    lifetime = parse_duration(expires)

    async def lookup() -> dict[str, Any] | None:
        async with open_store(settings, timeout) as store:
            return await find_user(store, creator=creator, nickname=nickname)

    try:
        row = asyncio.run(lookup())
    except DatabaseProblem as exc:
        err.print(f"[red]database unavailable:[/red] {exc}")
        raise typer.Exit(1) from None
    if row is None:
        wanted = " ".join(
            p
            for p in ("creator" if creator else "user", f"with nickname {nickname!r}" if nickname else "")
            if p
        )
        err.print(f"[red]no {wanted} in {mask_url(settings.database_url)}[/red]")
        raise typer.Exit(1)
    err.print(f"{row['id']}: nickname {row['nickname']}, {'creator' if row['creator'] else 'not a creator'}")
    sys.stdout.write(str(row["id"]) + "\n")
    if token:
        sys.stdout.write(create_token(settings.jwt_secret, str(row["id"]), lifetime) + "\n")


# -- config ---------------------------------------------------------------------------------------------


def masked(secret: str | None) -> str:
    return f"set ({len(secret)} characters, not shown)" if secret else "not set"


def effective(settings: Settings) -> list[tuple[str, str, str]]:
    """``(variable, value, where it came from)`` for every row of the settings table: secrets masked, and
    passwords in URLs (``DATABASE_URL``, ``BROADCAST_URL``) replaced by ``***``."""
    rows = []
    for row in SETTINGS:
        value = getattr(settings, row.attr)
        shown = masked(value) if row.secret else mask_url(row.show(value))
        rows.append((row.env, shown, settings.sources.get(row.env, "default")))
    return rows


def config(
    as_json: bool = typer.Option(False, "--json", help="One JSON object: {variable: {value, source}}."),
) -> None:
    """Print the effective settings (secrets masked) and where each one came from: the environment,
    the .env file, a generated development file, or the default."""
    settings = settings_or_exit()
    rows = effective(settings)
    if as_json:
        body = {name: {"value": value, "source": where} for name, value, where in rows}
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title="fonana-ws settings", header_style="bold")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    table.add_column("from")
    for name, value, where in rows:
        table.add_row(name, value, where)
    out.print(table)
    if settings.embedded:
        out.print("embedded mode: SQLite and development secrets in " + str(settings.data_dir))
