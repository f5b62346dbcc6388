"""``GET /api/presence/users?ids=U1,U2``: online status for the web app (protocol §7.3).

The same answer a watcher of each ``status_U`` channel would have now: online through the grace after a
last close, hidden users offline with lastSeen null. One backend round trip and one (cached) database
query for up to MAX_IDS users.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fonana_ws.fonana.errors import by_status
from fonana_ws.protocol.channels import MAX_ID_LENGTH
from fonana_ws.web.api import check_api_key, problem, services

log = logging.getLogger("fonana_ws.api")

PATH = "/api/presence/users"
#: Ids one request may ask about: a page of avatars, not the whole user table.
MAX_IDS = 500


def parse_ids(raw: str | None) -> list[str]:
    """The comma-separated ``ids`` parameter, in order, without repeats; ValueError naming it otherwise.

    Ids are taken as written (no trimming), so that the OpenAPI pattern says exactly what passes.
    """
    if not raw:
        raise ValueError("ids is required: a comma-separated list of user ids")
    ids = list(dict.fromkeys(raw.split(",")))
    if any(not i or len(i) > MAX_ID_LENGTH for i in ids):
        raise ValueError(f"ids: each user id must be 1 to {MAX_ID_LENGTH} characters")
    if len(ids) > MAX_IDS:
        raise ValueError(f"ids: at most {MAX_IDS} user ids, got {len(ids)}")
    return ids


async def users(request: Request) -> Response:
    """``{"users": {"U1": {"online": true, "lastSeen": null}}}``; 400 naming ``ids``, 503 when the
    presence backend or the database cannot answer."""
    if (denied := check_api_key(request)) is not None:
        return denied
    try:
        ids = parse_ids(request.query_params.get("ids"))
    except ValueError as exc:
        return problem(400, str(exc))
    status = services(request).status
    try:
        frames = await status.snapshot(ids)
    except Exception as exc:
        log.error("%s: presence lookup failed: %s", PATH, exc)
        return problem(503, "presence unavailable (broker backend or database down)")
    return JSONResponse(
        {"users": {u: {"online": f["online"], "lastSeen": f["lastSeen"]} for u, f in frames.items()}}
    )


#: The route's entry in the OpenAPI document (``web.events_api``).
OPENAPI_PATH = {
    "get": {
        "operationId": "presence_users",
        "summary": "Online status of up to 500 users (protocol §7.3)",
        "description": "As a watcher of each `status_U` channel sees it: online through WS_OFFLINE_GRACE "
        "after the last connection closed; a user with `showOnlineStatus` false is offline, lastSeen null.",
        "security": [{"apiKey": []}],
        "parameters": [
            {
                "name": "ids",
                "in": "query",
                "required": True,
                "description": f"comma-separated user ids, 1 to {MAX_IDS}",
                "schema": {
                    "type": "string",
                    "pattern": f"^[^,]{{1,{MAX_ID_LENGTH}}}(,[^,]{{1,{MAX_ID_LENGTH}}}){{0,{MAX_IDS - 1}}}$",
                },
            }
        ],
        "responses": {
            "200": {
                "description": "each id asked for",
                "content": {
                    "application/json": {
                        "example": {"users": {"U1": {"online": True, "lastSeen": None}}},
                        "schema": {
                            "type": "object",
                            "required": ["users"],
                            "properties": {
                                "users": {
                                    "type": "object",
                                    "additionalProperties": {
                                        "type": "object",
                                        "required": ["online", "lastSeen"],
                                        "properties": {
                                            "online": {"type": "boolean"},
                                            "lastSeen": {"type": ["string", "null"], "format": "date-time"},
                                        },
                                    },
                                }
                            },
                        },
                    }
                },
            },
            "400": {"description": "ids is missing, has more than 500 ids or an empty or too long one"},
            # The error table's words, as every other path says them.
            **{str(code): {"description": by_status(code).doc} for code in (401, 403, 503)},
        },
    }
}
