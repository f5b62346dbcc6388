"""HTTP routes: publishing for the web app, and health for operators and load balancers."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .broker import BrokerUnavailable, PayloadTooLarge
from .publisher import PublishError
from .services import Services

log = logging.getLogger("fonana_ws.api")

#: The largest publish body accepted; the PostgreSQL broker carries anything up to this.
MAX_BODY = 1 << 20


def services(request: Request) -> Services:
    return request.app.state.services


def problem(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def check_api_key(request: Request) -> JSONResponse | None:
    """None when the request carries the server API key as a Bearer token, else the error response."""
    key = services(request).settings.api_key
    if not key:
        return problem(403, "publishing over HTTP is disabled: WS_API_KEY is not set")
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        return problem(401, "missing or wrong API key (Authorization: Bearer <WS_API_KEY>)")
    return None


async def read_json(request: Request) -> Any:
    """The JSON body, or raise ``PublishError`` naming what is wrong with it."""
    body = await request.body()
    if len(body) > MAX_BODY:
        raise PublishError(f"body is larger than {MAX_BODY} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise PublishError("body is not valid JSON") from None


async def publish_and_answer(
    request: Request, event: Any, channels: list[str], users: list[str], event_id: str | None = None
) -> Response:
    """Publish through the process's publisher and map each failure to its HTTP answer."""
    svc = services(request)
    try:
        event_id = await svc.publisher.publish(event, channels=channels, users=users, event_id=event_id)
    except PublishError as exc:
        return problem(400, str(exc))
    except PayloadTooLarge as exc:
        return problem(413, str(exc))
    except BrokerUnavailable as exc:
        log.error("publish failed, broker unavailable: %s", exc)
        return problem(503, f"broker unavailable: {exc}")
    return JSONResponse({"ok": True, "id": event_id, "channels": channels, "users": users}, status_code=202)


async def publish(request: Request) -> Response:
    """``POST /api/publish``: ``{"channel": KEY | "user": ID, "event": {...}[, "id": EVENT_ID]}``."""
    if (denied := check_api_key(request)) is not None:
        return denied
    try:
        body = await read_json(request)
    except PublishError as exc:
        return problem(400, str(exc))
    if not isinstance(body, dict):
        return problem(400, "body must be a JSON object")
    if "event" not in body:
        return problem(400, "event is required")
    channels, users = [], []
    channel, user = body.get("channel"), body.get("user")
    if channel is not None:
        if not isinstance(channel, str):
            return problem(400, "channel must be a channel key string such as post_P")
        channels.append(channel)
    if user is not None:
        if not isinstance(user, str):
            return problem(400, "user must be a user id string")
        users.append(user)
    if not channels and not users:
        return problem(400, "channel or user is required")
    # An id chosen by the caller makes a retry after a timeout or a 503 safe (delivered once).
    return await publish_and_answer(request, body["event"], channels, users, body.get("id"))


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
