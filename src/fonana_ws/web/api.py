"""HTTP routes: publishing for the web app, and health for operators and load balancers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from fonana_ws.auth import api_key_matches
from fonana_ws.fonana.errors import REFUSED, BodyRefused, BodyTimeout, BodyTooLarge, refusal_of
from fonana_ws.fonana.publisher import PublishError
from fonana_ws.protocol.frames import MAX_EVENT_DEPTH, nested_deeper_than
from fonana_ws.web.services import Services

log = logging.getLogger("fonana_ws.api")

#: How deep a request body may nest. Above what an event may (fields of the typed endpoints sit a level
#: or two down in their event, which then gets the precise "event is nested deeper" answer) and far
#: below the 254 levels orjson encodes, so nothing parsed can fail later when it is encoded.
MAX_BODY_DEPTH = 2 * MAX_EVENT_DEPTH


def services(request: Request) -> Services:
    return request.app.state.services


def problem(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def check_api_key(request: Request) -> JSONResponse | None:
    """None when the request carries the server API key as a Bearer token, else the error response."""
    key = services(request).settings.api_key
    if not key:
        return problem(403, "publishing over HTTP is disabled: WS_API_KEY is not set")
    if not api_key_matches(request.headers.get("authorization", ""), key):
        return problem(401, "missing or wrong API key (Authorization: Bearer <WS_API_KEY>)")
    return None


def refused(exc: BaseException, where: str) -> JSONResponse:
    """The answer to a failure, from the one table (``fonana.errors.REFUSALS``); the server's own faults
    (5xx) are logged for the operator, with the detail the answer leaves out.

    A ``BodyRefused`` is answered while the client may still be sending. The connection is not closed at
    once: closing a socket with unread bytes resets it, and the reset can destroy the answer before the
    client reads it. uvicorn discards the rest of the body unbuffered, the edge's body deadline
    (WS_BODY_TIMEOUT + 1 s from the headers, http_edge) ends a body that does not end, and a client that
    waited for ``100 Continue`` (curl above 1 MB) gets the answer and sends nothing.
    """
    refusal = refusal_of(type(exc))
    if refusal.server_fault:
        log.error("%s: %s (%s: %s)", where, refusal.cli, type(exc).__name__, exc)
    return problem(refusal.status, refusal.reason(exc))


async def read_body(request: Request) -> bytes:
    """The whole body, at most ``WS_MAX_EVENT_SIZE`` bytes within ``WS_BODY_TIMEOUT`` seconds.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is read (a client
    that waits for ``100 Continue`` never sends it); a body that turns out longer (chunked, or more than
    it declared) is refused as soon as the count passes the limit, so no more than the limit plus one
    chunk is ever held. Raises ``BodyTooLarge`` (413), ``BodyTimeout`` (408), or ``BodyRefused`` when the
    client goes away.
    """
    settings = services(request).settings
    limit = settings.max_event_size
    try:
        declared = int(request.headers.get("content-length", "0"))
    except ValueError:  # httptools refuses such a request before it gets here
        declared = 0
    if declared > limit:
        raise BodyTooLarge(f"body is larger than {limit} bytes (Content-Length {declared})")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(settings.body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"body is larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(f"body not received within {settings.body_timeout:g} seconds") from None
    except ClientDisconnect:
        raise BodyRefused("the client went away before its body was in") from None
    return b"".join(chunks)


async def read_json(request: Request) -> Any:
    """The JSON body of every route that reads one.

    Raises ``BodyRefused`` (see :func:`read_body`), or ``PublishError`` naming what is wrong with it.
    """
    body = await read_body(request)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise PublishError("body is not valid JSON") from None
    if nested_deeper_than(value, MAX_BODY_DEPTH):
        raise PublishError(f"body is nested deeper than {MAX_BODY_DEPTH} levels")
    return value


async def publish_and_answer(
    request: Request, event: Any, channels: list[str], users: list[str], event_id: str | None = None
) -> Response:
    """Publish through the process's publisher; a failure gets its answer from the table."""
    svc = services(request)
    if nested_deeper_than(event, MAX_EVENT_DEPTH):
        return problem(400, f"event is nested deeper than {MAX_EVENT_DEPTH} levels")
    try:
        event_id = await svc.publisher.publish(event, channels=channels, users=users, event_id=event_id)
    except REFUSED as exc:
        return refused(exc, request.url.path)
    return JSONResponse({"ok": True, "id": event_id, "channels": channels, "users": users}, status_code=202)


def publish_body(body: Any) -> tuple[Any, list[str], list[str], str | None]:
    """``/api/publish``'s body -> (event, channels, users, event id), or ``PublishError`` naming the field.

    A field given must have a value: null is refused, not taken as absent (the document says so).
    """
    if not isinstance(body, dict):
        raise PublishError("body must be a JSON object")
    if "event" not in body:
        raise PublishError("event is required")
    channels, users = [], []
    if "channel" in body:
        if not isinstance(body["channel"], str):
            raise PublishError("channel must be a channel key string such as post_P")
        channels.append(body["channel"])
    if "user" in body:
        if not isinstance(body["user"], str):
            raise PublishError("user must be a user id string")
        users.append(body["user"])
    if not channels and not users:
        raise PublishError("channel or user is required")
    if "id" in body and not isinstance(body["id"], str):
        raise PublishError("id must be an event id string")
    return body["event"], channels, users, body.get("id")


async def publish(request: Request) -> Response:
    """``POST /api/publish``: ``{"channel": KEY | "user": ID, "event": {...}[, "id": EVENT_ID]}``."""
    if (denied := check_api_key(request)) is not None:
        return denied
    try:
        event, channels, users, event_id = publish_body(await read_json(request))
    except REFUSED as exc:
        return refused(exc, request.url.path)
    # An id chosen by the caller makes a retry after a timeout or a 503 safe (delivered once).
    return await publish_and_answer(request, event, channels, users, event_id)


async def health(request: Request) -> Response:
    """Alive: the process answers."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """Ready: the database answers and the broker is connected."""
    svc = services(request)
    checks: dict[str, str] = {}
    try:
        await svc.store.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"down: {type(exc).__name__}"
    checks["broker"] = "ok" if svc.broker.is_up else "down"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", **checks}, status_code=200 if ok else 503
    )
