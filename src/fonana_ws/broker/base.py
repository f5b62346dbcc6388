"""What the hub needs of a pub/sub backend beyond broadcaster's ``BroadcastBackend``.

broadcaster's interface has no notion of health: a backend there either works or its listener dies.
Ours report whether the broker is reachable, so that ``/ready`` and the publish API can say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from broadcaster._backends.base import BroadcastBackend


class BrokerUnavailable(Exception):
    """The broker cannot take a publish or a subscription right now (it is down or reconnecting)."""


class PayloadTooLarge(ValueError):
    """The backend cannot carry a message this large."""


def backend_is_up(backend: BroadcastBackend) -> bool:
    """True when the backend can publish and deliver now; backends without health are always up."""
    return bool(getattr(backend, "is_up", True))


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe to log."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    tail = re.sub(r"(?i)(password=)[^&]*", r"\1***", tail)
    return f"{scheme}{sep}{netloc}{slash}{tail}"


def describe(exc: BaseException | str) -> str:
    """A one-line reason for logs: exception type and message."""
    if isinstance(exc, str):
        return exc
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.asynccontextmanager
async def within(seconds: float, what: str) -> AsyncIterator[None]:
    """asyncio.timeout whose error says what timed out, for the "broker down" log line."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise TimeoutError(f"{what}: no answer within {seconds:g} s") from exc


@dataclass
class _KeyedEntry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class KeyedLocks:
    """One lock per key, dropped once nobody holds or waits for it, since channels come and go."""

    def __init__(self) -> None:
        self._entries: dict[str, _KeyedEntry] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._entries.setdefault(key, _KeyedEntry())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key]
