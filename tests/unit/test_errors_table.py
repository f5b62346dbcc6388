"""The one error -> answer table (``fonana.errors.REFUSALS``): each failure's HTTP status and body, the
OpenAPI responses and what ``fonana-ws send`` prints and exits with, over HTTP and over the broker."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import typer

from fonana_ws.broker import BrokerUnavailable, PayloadTooLarge
from fonana_ws.fonana import errors
from fonana_ws.fonana.errors import BodyRefused, BodyTimeout, BodyTooLarge, Conflict, NotFound
from fonana_ws.fonana.events import EVENTS
from fonana_ws.fonana.publisher import PublishError
from fonana_ws.web import api
from fonana_ws.web.events_api import openapi_document
from fonana_ws_cli import send as send_cli

pytestmark = pytest.mark.unit

#: exception -> (status, the body's error text)
CASES: list[tuple[BaseException, int, str]] = [
    (PublishError("userId is required"), 400, "userId is required"),
    (
        BodyRefused("the client went away before its body was in"),
        400,
        "the client went away before its body was in",
    ),
    (NotFound("postId: no post p"), 404, "postId: no post p"),
    (BodyTimeout("body not received within 0.5 seconds"), 408, "body not received within 0.5 seconds"),
    (
        Conflict("id: notification n belongs to another user"),
        409,
        "id: notification n belongs to another user",
    ),
    (BodyTooLarge("body is larger than 2048 bytes"), 413, "body is larger than 2048 bytes"),
    # a ValueError, yet 413: the most specific class of the table wins
    (PayloadTooLarge("the event is 9 bytes encoded"), 413, "the event is 9 bytes encoded"),
    (BrokerUnavailable("broker is down"), 503, "broker unavailable: broker is down"),
    # the driver's text stays in the log: it can carry a path or a DSN
    (sqlite3.OperationalError("unable to open /secret/db"), 503, "database unavailable: OperationalError"),
    (ConnectionRefusedError(111, "refused"), 503, "database unavailable: ConnectionRefusedError"),
    (asyncpg.PostgresError("password authentication failed"), 503, "database unavailable: PostgresError"),
    (asyncpg.InterfaceError("pool is closed"), 503, "database unavailable: InterfaceError"),
]


@pytest.mark.parametrize(("exc", "status", "reason"), CASES, ids=lambda v: type(v).__name__)
def test_each_failure_has_one_answer(exc: BaseException, status: int, reason: str) -> None:
    refusal = errors.refusal_of(type(exc))
    assert (refusal.status, refusal.reason(exc)) == (status, reason)
    assert isinstance(exc, errors.REFUSED)


def test_every_class_of_the_table_is_exercised() -> None:
    classes = {cls for r in errors.REFUSALS for cls in r.raised_by}
    missing = [cls for cls in classes if not any(isinstance(exc, cls) for exc, _s, _r in CASES)]
    assert not missing, missing


def test_an_error_outside_the_table_is_not_answered_as_the_callers_fault() -> None:
    """A bare ValueError or KeyError is a bug of ours: no 400 that hides it (it stays a 500, logged)."""
    for exc in (ValueError("x"), KeyError("x"), RuntimeError("x")):
        assert not isinstance(exc, errors.REFUSED)
        with pytest.raises(KeyError):
            errors.refusal_of(type(exc))


def test_each_status_has_one_set_of_words() -> None:
    statuses = [r.status for r in errors.REFUSALS]
    assert sorted(set(statuses)) == [400, 401, 403, 404, 408, 409, 413, 503]
    for status in set(statuses):
        rows = [r for r in errors.REFUSALS if r.status == status]
        assert len({(r.cli, r.doc, r.exit_code) for r in rows}) == 1, status
        assert errors.by_status(status) is rows[0]
    assert errors.by_status(500) is None
    assert [r.status for r in errors.REFUSALS if r.server_fault] == [503, 503]


@pytest.mark.parametrize(("exc", "status", "reason"), CASES, ids=lambda v: type(v).__name__)
def test_the_http_routes_answer_from_the_table(
    exc: BaseException, status: int, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="fonana_ws.api"):
        response = api.refused(exc, "/api/events/x")
    assert response.status_code == status
    assert orjson.loads(response.body) == {"error": reason}
    logged = [r.getMessage() for r in caplog.records]
    if status >= 500:  # the operator hears of it, with what the answer leaves out
        assert logged == [f"/api/events/x: cannot publish now ({type(exc).__name__}: {exc})"]
    else:
        assert logged == []


def test_the_openapi_responses_are_the_tables_words() -> None:
    for path, operations in openapi_document()["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if code.startswith("2") or (method == "get" and code == "400"):
                    continue  # a read's 400 is about its query, not a body
                assert response["description"] == errors.by_status(int(code)).doc, (path, code)
    paths = openapi_document()["paths"]
    conflicts = {"/api/events/notification", "/api/events/new-message", "/api/events/message-read"}
    assert {p for p in paths if "409" in next(iter(paths[p].values()))["responses"]} == conflicts


@pytest.mark.parametrize("status", sorted({r.status for r in errors.REFUSALS}))
def test_the_cli_over_http_says_what_the_table_says(
    status: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def answer(url: str, **_kw: Any) -> httpx.Response:
        return httpx.Response(status, json={"error": "the reason"}, request=httpx.Request("POST", url))

    monkeypatch.setattr(send_cli.httpx, "post", answer)
    with pytest.raises(typer.Exit) as info:
        send_cli.via_http("/api/events/post-liked", {}, "http://127.0.0.1:1", "key")
    refusal = errors.by_status(status)
    assert info.value.exit_code == refusal.exit_code == 1
    words = " ".join(capsys.readouterr().err.split())
    assert f"error: {refusal.cli} ({status}): the reason" in words


@pytest.mark.parametrize(("exc", "status", "reason"), CASES, ids=lambda v: type(v).__name__)
def test_the_cli_over_the_broker_says_what_the_table_says(
    exc: BaseException, status: int, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(typer.Exit) as info:
        send_cli.fail_refused(exc, "BROADCAST_URL redis://h:6379/0")
    refusal = errors.by_status(status)
    assert info.value.exit_code == refusal.exit_code
    words = " ".join(capsys.readouterr().err.split())
    assert f"error: {refusal.cli}: {reason}" in words
    # the operator at the terminal gets the detail the HTTP answer leaves out, and where it went
    assert ("redis://h:6379/0" in words) == (status >= 500)
    assert str(exc) in words


def test_the_cli_over_the_broker_names_an_unexpected_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as info:
        send_cli.fail_refused(RuntimeError("boom"), "BROADCAST_URL redis://h")
    assert info.value.exit_code == 1
    assert "cannot publish: RuntimeError: boom" in capsys.readouterr().err


def test_every_refusal_a_rule_raises_is_in_the_table() -> None:
    for event in EVENTS:
        for cls in event.raises:
            assert errors.refusal_of(cls).status in (404, 409), (event.name, cls)
