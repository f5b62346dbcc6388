""" "Does this user exist?" for every connect, answered for many connects at once.

A connect storm (a deploy, a reconnect wave) asks about thousands of users nobody has seen in the last
minute. One query each costs a round trip and, through ``databases``, a SQLAlchemy compile per call
(~200 µs of Python). Here the questions asked while a query is in flight wait for the next one, which
answers all of them with one ``= ANY($1)`` (a statement asyncpg prepares once per connection) or one
``IN (...)`` on SQLite. An idle server pays nothing extra: a lone question goes out on the next loop turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

#: The largest batch one query carries (SQLite's parameter limit is 999 on old builds).
MAX_BATCH = 500

Fetch = Callable[[Sequence[str]], Awaitable[set[str]]]


class UserLookup:
    """Coalesces concurrent existence checks into at most ``concurrency`` queries in flight."""

    def __init__(self, fetch: Fetch, *, concurrency: int = 2, max_batch: int = MAX_BATCH) -> None:
        self._fetch = fetch
        self._concurrency = concurrency
        self._max_batch = max_batch
        #: user id -> the future every connect asking about that user awaits.
        self._pending: dict[str, asyncio.Future[bool | BaseException]] = {}
        self._in_flight = 0
        self._scheduled = False
        #: Queries sent and users asked (for the tests and the benchmark: the batching is observable).
        self.queries = 0
        self.asked = 0

    async def exists(self, user_id: str) -> bool:
        future = self._pending.get(user_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[user_id] = future
            self._schedule()
        # Shielded: one caller giving up (its socket closed) must not cancel the answer others await.
        answer = await asyncio.shield(future)
        if isinstance(answer, BaseException):
            raise answer.with_traceback(None)  # shared by every waiter: no traceback piling up
        return answer

    def _schedule(self) -> None:
        if not self._scheduled and self._in_flight < self._concurrency:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        if not self._pending or self._in_flight >= self._concurrency:
            return
        batch: dict[str, asyncio.Future[bool | BaseException]] = {}
        for user_id in list(self._pending)[: self._max_batch]:
            batch[user_id] = self._pending.pop(user_id)
        self._in_flight += 1
        asyncio.get_running_loop().create_task(self._run(batch))
        if self._pending:
            self._schedule()

    async def _run(self, batch: dict[str, asyncio.Future[bool | BaseException]]) -> None:
        self.queries += 1
        self.asked += len(batch)
        try:
            found = await self._fetch(list(batch))
            answers: dict[str, bool | BaseException] = {u: u in found for u in batch}
        except Exception as exc:  # every waiter of this batch gets the failure, as its own query would
            answers = dict.fromkeys(batch, exc)
        finally:
            self._in_flight -= 1
        for user_id, future in batch.items():
            if not future.done():
                future.set_result(answers[user_id])
        if self._pending:
            self._schedule()


def asyncpg_dsn(url: str) -> str:
    """A ``postgresql+asyncpg://`` URL (the settings' form) as asyncpg's own DSN."""
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgres") else url


async def reset_nothing(conn: Any) -> None:
    """Skip asyncpg's reset query on release: a read-only SELECT leaves no session state behind."""


class PostgresUsers:
    """The PostgreSQL side: a pool of its own (two connections) with one prepared statement."""

    QUERY = "SELECT id FROM users WHERE id = ANY($1::text[])"
    HIDDEN = (
        'SELECT "userId" FROM user_settings WHERE "showOnlineStatus" = FALSE AND "userId" = ANY($1::text[])'
    )

    def __init__(self, url: str) -> None:
        self.dsn = asyncpg_dsn(url)
        self.pool: Any = None

    async def open(self) -> None:
        import asyncpg  # only for PostgreSQL: the embedded default never loads it

        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, reset=reset_nothing)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def fetch(self, user_ids: Sequence[str]) -> set[str]:
        """Those of ``user_ids`` that exist."""
        return await self._ids(self.QUERY, user_ids)

    async def fetch_hidden(self, user_ids: Sequence[str]) -> set[str]:
        """Those of ``user_ids`` who hide their online status (protocol §7.3); no row means shown."""
        return await self._ids(self.HIDDEN, user_ids)

    async def _ids(self, query: str, user_ids: Sequence[str]) -> set[str]:
        if self.pool is None:
            raise ConnectionError("the user lookup pool is not open")
        async with self.pool.acquire(timeout=5) as conn:
            rows = await conn.fetch(query, list(user_ids), timeout=5)
        return {str(row[0]) for row in rows}
