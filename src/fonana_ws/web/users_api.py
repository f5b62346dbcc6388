"""``POST /api/users/{id}/disconnect``: close every connection of a user, on every process (§7.7).

The web app calls it when a user must lose the socket now (a ban, a password change, an account
deleted); the work is ``fonana.disconnect``'s, through the broker. 202 means every process was asked:
the connections close (4003) as each process receives the message, a few milliseconds later.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fonana_ws.fonana import disconnect
from fonana_ws.fonana.errors import REFUSED
from fonana_ws.fonana.publisher import MAX_USER_ID, PublishError
from fonana_ws.web.api import check_api_key, problem, read_body, refused, services

PATH = "/api/users/{id}/disconnect"


def reason_of(body: bytes) -> str | None:
    """The optional body ``{"reason": "..."}`` -> the reason, or ``PublishError`` naming what is wrong.

    No body (or ``{}``) is no reason; a reason given is a string of at most ``MAX_REASON`` characters
    (null is refused, not taken as absent, as on every route).
    """
    if not body.strip():
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise PublishError("body is not valid JSON") from None
    if not isinstance(value, dict):
        raise PublishError("body must be a JSON object")
    if "reason" not in value:
        return None
    reason = value["reason"]
    if not isinstance(reason, str):
        raise PublishError("reason must be a string")
    if len(reason) > disconnect.MAX_REASON:
        raise PublishError(f"reason must be at most {disconnect.MAX_REASON} characters")
    return reason or None


async def disconnect_user(request: Request) -> Response:
    """``POST /api/users/{id}/disconnect``, optional body ``{"reason": "..."}``: 202 ``{"ok", "userId"}``."""
    if (denied := check_api_key(request)) is not None:
        return denied
    user_id: str = request.path_params["id"]
    if not 1 <= len(user_id) <= MAX_USER_ID:
        return problem(400, f"the user id must be 1 to {MAX_USER_ID} characters")
    try:
        reason = reason_of(await read_body(request))
        await disconnect.disconnect_everywhere(services(request).broker, user_id, reason)
    except REFUSED as exc:
        return refused(exc, request.url.path)
    return JSONResponse({"ok": True, "userId": user_id}, status_code=202)


def openapi_path(answers: dict[str, Any]) -> dict[str, Any]:
    """The path entry; ``answers`` are the error responses every API route shares."""
    return {"post": {**_OPERATION, "responses": {**answers, "202": _ACCEPTED}}}


_ACCEPTED = {
    "description": "every process was asked to close the user's connections",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["ok", "userId"],
                "properties": {"ok": {"const": True}, "userId": {"type": "string"}},
            }
        }
    },
}

_OPERATION: dict[str, Any] = {
    "operationId": "disconnect_user",
    "summary": "Close every connection of a user, on every server process",
    "description": "Each connection closes with code 4003 `Disconnected by the server`. The user may "
    "connect again with a token that is still valid: refuse them a new one first (a ban).",
    "security": [{"apiKey": []}],
    "parameters": [
        {
            "name": "id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID},
            "description": "the user id (the token's userId)",
        }
    ],
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "reason": {
                            "type": "string",
                            "maxLength": disconnect.MAX_REASON,
                            "description": "written to the server log, never sent to the client",
                        }
                    },
                },
                "example": {"reason": "banned"},
            }
        },
    },
}
