"""What the hub needs of a pub/sub backend beyond broadcaster's ``BroadcastBackend``.

broadcaster's interface has no notion of health: a backend there either works or its listener dies.
Ours report whether the broker is reachable, so that ``/ready`` and the publish API can say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from broadcaster import BroadcastBackend

logger = logging.getLogger("fonana_ws.broker")

#: First retry delay after the broker went away; it doubles up to the backend's ``max_backoff``.
MIN_BACKOFF = 0.1


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


class Supervised:
    """The reconnect loop and the up/down bookkeeping that both of our backends share.

    A subclass sets ``safe_url``, ``_max_backoff``, ``_up`` (an ``asyncio.Event``), ``_down_since`` (None)
    and ``_session_was_up``, and implements ``_session()``: one connection's life, returning or raising
    when the connection is lost.
    """

    safe_url: str
    _max_backoff: float
    _up: asyncio.Event
    _down_since: float | None
    _session_was_up: bool

    _op_timeout: float
    _supervisor: asyncio.Task[None] | None

    async def _session(self) -> None:
        raise NotImplementedError

    async def _start(self, name: str) -> None:
        """Start the reconnect loop; wait up to the op timeout for a first connection (none is no error)."""
        self._supervisor = asyncio.create_task(self._run(), name=name)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._op_timeout):
                await self._up.wait()

    async def _stop(self) -> None:
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._up.clear()
        self._down_since = None

    def _mark_down(self, reason: BaseException | str) -> None:
        self._up.clear()
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning("broker down: %s (%s)", describe(reason), self.safe_url)

    def _mark_up(self) -> None:
        if self._down_since is not None:
            elapsed = time.monotonic() - self._down_since
            logger.info("broker up again after %.1f s (%s)", elapsed, self.safe_url)
        else:
            logger.info("broker connected (%s)", self.safe_url)
        self._down_since = None
        self._up.set()

    async def _run(self) -> None:
        """Keep a session going forever, with capped exponential backoff between attempts."""
        delay = MIN_BACKOFF
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._mark_down(exc)
            if self._session_was_up:
                delay = MIN_BACKOFF  # a fresh outage: retry soon
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)
