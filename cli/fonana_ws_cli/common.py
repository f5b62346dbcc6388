"""What the operator commands share: settings, a bounded database connection, the few lookups."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from fonana_ws.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:  # the database layer costs ~140 ms to import; `fonana-ws token` does not need it
    from fonana_ws.db import Store

T = TypeVar("T")

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


async def guarded(work: Awaitable[T], wait: float = 5.0) -> T:
    """``work`` (a read of ``fonana_ws.db.lookups``) within ``wait`` seconds; a failure or a slow answer is
    a ``DatabaseProblem`` in an operator's words."""
    try:
        return await asyncio.wait_for(work, wait)
    except TimeoutError:
        raise DatabaseProblem(f"no answer within {wait:g} s") from None
    except Exception as exc:
        raise DatabaseProblem(describe_error(exc)) from None


async def find_user(
    store: Store, *, creator: bool = False, nickname: str | None = None
) -> dict[str, Any] | None:
    from fonana_ws.db import lookups

    return await guarded(lookups.find_user(store, creator=creator, nickname=nickname))


async def find_open_post(store: Store, creator: str | None = None) -> dict[str, Any] | None:
    from fonana_ws.db import lookups

    return await guarded(lookups.find_open_post(store, creator))


async def user_row(store: Store, user_id: str) -> dict[str, Any] | None:
    from fonana_ws.db import lookups

    return await guarded(lookups.user_row(store, user_id))
