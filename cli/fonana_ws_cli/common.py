"""What the operator commands share: settings, a bounded database connection, the few lookups."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape

from fonana_ws.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:  # the database layer costs ~140 ms to import; `fonana-ws token` does not need it
    from fonana_ws.db import Store

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def settings_or_exit(**overrides: str | None) -> Settings:
    """Settings from the environment with CLI options on top; a bad value exits 2 naming the setting."""
    environ = dict(os.environ)
    environ.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return load_settings(environ)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as exc:  # the data directory (FONANA_WS_DATA_DIR) cannot be created or read
        err.print(f"[red]configuration error:[/red] FONANA_WS_DATA_DIR: {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``7d`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration like 30m, 2h or 7d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


class DatabaseProblem(Exception):
    """The database cannot be used; the message says why in an operator's words."""


def sqlite_file(settings: Settings) -> Path | None:
    """The SQLite file of the embedded default, or None for PostgreSQL."""
    if not settings.embedded:
        return None
    return Path(settings.database_url.split(":///", 1)[1])


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class open_store:
    """``async with open_store(settings, timeout) as store``: connected within ``timeout`` or
    ``DatabaseProblem``. An embedded SQLite file that does not exist yet is not created."""

    def __init__(self, settings: Settings, timeout: float = 5.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self.store: Store | None = None

    async def __aenter__(self) -> Store:
        path = sqlite_file(self.settings)
        from fonana_ws.broker import mask_url
        from fonana_ws.db import Store

        where = mask_url(self.settings.database_url)
        if path is not None and not path.exists():
            raise DatabaseProblem(f"no database yet at {path} (`fonana-ws serve` creates it)")
        store = Store(self.settings.database_url)
        try:
            await asyncio.wait_for(store.connect(), self.timeout)
            await asyncio.wait_for(store.ping(), self.timeout)
        except TimeoutError:
            await self._quiet_disconnect(store)
            raise DatabaseProblem(f"{where}: no answer within {self.timeout:g} s") from None
        except Exception as exc:
            await self._quiet_disconnect(store)
            raise DatabaseProblem(f"{where}: {describe_error(exc)}") from None
        self.store = store
        return store

    async def __aexit__(self, *exc: object) -> None:
        if self.store is not None:
            await self._quiet_disconnect(self.store)

    @staticmethod
    async def _quiet_disconnect(store: Store) -> None:
        try:
            await asyncio.wait_for(store.disconnect(), 5)
        except Exception:
            pass


async def query(store: Store, sql: str, values: dict[str, Any] | None = None, wait: float = 5.0) -> list[Any]:
    """Rows as dicts; a failure or a slow answer (``wait`` seconds) is a ``DatabaseProblem``."""
    try:
        rows = await asyncio.wait_for(store.db.fetch_all(sql, values or {}), wait)
    except TimeoutError:
        raise DatabaseProblem(f"no answer within {wait:g} s") from None
    except Exception as exc:
        raise DatabaseProblem(describe_error(exc)) from None
    return [dict(r._mapping) for r in rows]


async def find_user(
    store: Store, *, creator: bool = False, nickname: str | None = None
) -> dict[str, Any] | None:
    """A user to test with: by nickname, or a creator (one with posts first), or anyone (non-creators
    first). Ordered by id, so the same database gives the same answer."""
    where, values = [], {}
    if nickname is not None:
        where.append("u.nickname = :nickname")
        values["nickname"] = nickname
    if creator:
        where.append('u."isCreator" = TRUE')
    cond = " AND ".join(where) or "TRUE"
    base = f'SELECT u.id, u.nickname, u."isCreator" AS creator FROM users u WHERE {cond}'
    if creator:
        with_posts = ' AND EXISTS (SELECT 1 FROM posts p WHERE p."creatorId" = u.id)'
        rows = await query(store, base + with_posts + " ORDER BY u.id LIMIT 1", values)
        if rows:
            return rows[0]
    rows = await query(store, base + ' ORDER BY u."isCreator", u.id LIMIT 1', values)
    return rows[0] if rows else None


async def find_open_post(store: Store, creator: str | None = None) -> dict[str, Any] | None:
    """A post anyone may subscribe to (not locked, no tier), the given creator's first if any."""
    sql = (
        'SELECT id, "creatorId" AS creator FROM posts '
        'WHERE "isLocked" = FALSE AND "minSubscriptionTier" IS NULL'
    )
    if creator is not None:
        rows = await query(
            store, sql + ' AND "creatorId" = :creator ORDER BY id LIMIT 1', {"creator": creator}
        )
        if rows:
            return rows[0]
    rows = await query(store, sql + " ORDER BY id LIMIT 1")
    return rows[0] if rows else None


async def user_row(store: Store, user_id: str) -> dict[str, Any] | None:
    rows = await query(
        store,
        'SELECT id, nickname, wallet, "isCreator" AS creator FROM users WHERE id = :id',
        {"id": user_id},
    )
    return rows[0] if rows else None
