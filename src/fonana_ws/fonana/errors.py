"""One table of refusals: each failure of an event, its HTTP answer and what ``fonana-ws send`` says.

The HTTP routes (``web/api.py``, ``web/events_api.py``), the OpenAPI document's responses and the CLI
(over HTTP it reads the status, with ``--broker`` the exception) all read :data:`REFUSALS`, so an answer
is spelled once. It lives in ``fonana/``: every class here is raised at or above this layer
(``PublishError`` by the publisher, ``NotFound``/``Conflict`` by the delivery rules, the broker's two
from below, ``BodyRefused`` by ``web/api.py``), and the CLI sits above all of them.

A class is looked up along the exception's MRO, so the most specific row wins: ``PayloadTooLarge`` is a
``ValueError`` but answers 413, and a ``BodyTooLarge`` is a ``BodyRefused`` but answers 413 too.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from fonana_ws.broker import BrokerUnavailable, PayloadTooLarge
from fonana_ws.fonana.publisher import PublishError

__all__ = [
    "BodyRefused",
    "BodyTimeout",
    "BodyTooLarge",
    "Conflict",
    "DATABASE_ERRORS",
    "NotFound",
    "PublishError",
    "REFUSALS",
    "REFUSED",
    "Refusal",
    "by_status",
    "refusal_of",
]


class NotFound(LookupError):
    """A user, post, notification or conversation the event refers to does not exist; the message names
    the field."""


class Conflict(Exception):
    """The request contradicts a stored row: a notification id that belongs to another user, or a sender
    or reader who is not one of the conversation's two participants."""


class BodyRefused(Exception):
    """The request body was not read to its end; this base class: the client went away (400)."""


class BodyTooLarge(BodyRefused):
    """The body is over ``WS_MAX_EVENT_SIZE`` bytes (declared, or counted as it arrived)."""


class BodyTimeout(BodyRefused):
    """The body did not arrive within ``WS_BODY_TIMEOUT`` seconds."""


#: Errors of the database drivers: the event could not be prepared now (503); the request is fine.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def _database(exc: BaseException) -> str:
    # The type only: a driver's message can carry the DSN or a query. The log has the whole of it.
    return f"database unavailable: {type(exc).__name__}"


@dataclass(frozen=True)
class Refusal:
    """One answer: the HTTP status, the exceptions that mean it, and its words for each reader."""

    status: int
    #: The exceptions answered with this status (none: the route answers it itself, e.g. 401).
    raised_by: tuple[type[BaseException], ...]
    #: What ``fonana-ws send`` prints before the reason: ``not found (404): postId: no post p1``.
    cli: str
    #: The OpenAPI description of the response.
    doc: str
    #: The ``error`` text of the body, from the exception.
    reason: Callable[[BaseException], str] = str
    exit_code: int = 1

    @property
    def server_fault(self) -> bool:
        """The service, not the caller, failed: the route logs it at ERROR for the operator."""
        return self.status >= 500


REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        400, (PublishError, BodyRefused), "invalid request", "the body is not valid; error names the field"
    ),
    Refusal(401, (), "the server refused the API key", "missing or wrong API key"),
    Refusal(
        403,
        (),
        "the server does not accept HTTP publishing",
        "publishing over HTTP is disabled (WS_API_KEY is not set)",
    ),
    Refusal(
        404, (NotFound,), "not found", "a referenced user, post, notification or conversation does not exist"
    ),
    Refusal(408, (BodyTimeout,), "too slow", "the body did not arrive within WS_BODY_TIMEOUT seconds"),
    Refusal(
        409,
        (Conflict,),
        "conflict",
        "the notification id belongs to another user, or the sender or reader is not a participant of "
        "the conversation",
    ),
    Refusal(
        413,
        (BodyTooLarge, PayloadTooLarge),
        "too large",
        "the body is larger than WS_MAX_EVENT_SIZE, or the event than the broker carries",
    ),
    Refusal(
        503,
        (BrokerUnavailable,),
        "cannot publish now",
        "the broker or the database is unavailable",
        reason=lambda exc: f"broker unavailable: {exc}",
    ),
    Refusal(
        503, DATABASE_ERRORS, "cannot publish now", "the broker or the database is unavailable", _database
    ),
)

_BY_CLASS: dict[type[BaseException], Refusal] = {cls: r for r in REFUSALS for cls in r.raised_by}
_BY_STATUS: dict[int, Refusal] = {}
for _r in REFUSALS:
    _BY_STATUS.setdefault(_r.status, _r)

#: Every exception class of the table, for ``except REFUSED as exc:``.
REFUSED: tuple[type[BaseException], ...] = tuple(_BY_CLASS)


def refusal_of(exc_type: type[BaseException]) -> Refusal:
    """The row of an exception class (its most specific class in the table); ``KeyError`` if none."""
    for cls in exc_type.__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    raise KeyError(exc_type.__name__)


def by_status(status: int) -> Refusal | None:
    """The row of an HTTP status (the first, where two exceptions share one), for the CLI over HTTP."""
    return _BY_STATUS.get(status)
