"""The typed HTTP routes: ``POST /api/events/<name>`` for each entry of ``fonana.events.EVENTS``, and
the OpenAPI document at ``GET /api/openapi.json``, both generated from that table.

Nothing here knows an event: a route reads its body, lets the entry check and prepare it, publishes the
emission and answers. Answers: 202 ``{"ok", "id", "channels", "users", "event"}``; 401/403 for the API
key (as ``/api/publish``); every failure as ``fonana.errors.REFUSALS`` says (400 naming the field, 404
for an unknown user, post or notification, 409, 408/413 for the body, 503 for the broker or the
database).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from fonana_ws.fonana.errors import REFUSALS, REFUSED, refusal_of
from fonana_ws.fonana.events import EVENTS, OTHER_EVENT_TYPES, Event
from fonana_ws.fonana.publisher import MAX_EVENT_ID, MAX_USER_ID
from fonana_ws.protocol.channels import ID_FIELDS, MAX_ID_LENGTH
from fonana_ws.web import access_api, batch_api, presence_api, users_api
from fonana_ws.web.api import check_api_key, publish_and_answer, read_json, refused, services

PREFIX = "/api/events/"
OPENAPI_PATH = "/api/openapi.json"


def path(event: Event) -> str:
    return PREFIX + event.name


def operation_id(event: Event) -> str:
    return "event_" + event.name.replace("-", "_")


def _handler(event: Event) -> Callable[[Request], Awaitable[Response]]:
    where = path(event)

    async def handle(request: Request) -> Response:
        if (denied := check_api_key(request)) is not None:
            return denied
        try:
            emission = await event.prepare(services(request).store, await read_json(request))
        except REFUSED as exc:
            return refused(exc, where)
        response = await publish_and_answer(request, emission.event, emission.channels, emission.users)
        if response.status_code != 202:
            return response
        return JSONResponse({**orjson.loads(response.body), "event": emission.event}, status_code=202)

    handle.__name__ = handle.__qualname__ = operation_id(event)
    handle.__doc__ = f"``POST {where}``: {event.summary}."
    return handle


# -- OpenAPI ------------------------------------------------------------------------------------------------

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
#: What every publishing route may answer, whatever its event: the key, the body, the broker.
_COMMON = (400, 401, 403, 408, 413, 503)
_DOCS = {r.status: r.doc for r in reversed(REFUSALS)}  # the first row of a status wins


def statuses(event: Event) -> list[int]:
    """The refusals a route documents: the common ones and those its delivery rule raises."""
    raised = {refusal_of(exc_type).status for exc_type in event.raises}
    return sorted({*_COMMON, *raised})


def _answers(codes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "202": {
            "description": "published",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
        }
    }
    for code in codes:
        out[str(code)] = {"description": _DOCS[code], "content": {"application/json": {"schema": _PROBLEM}}}
    return out


#: A channel key as ``parse_key`` takes it: a channel type, ``_``, then an id of 1 to MAX_ID_LENGTH
#: characters (any characters). One branch per type: its length bounds count the prefix, and no ``$``
#: (a Python ``$`` also matches before a final newline).
_CHANNEL_KEY = {
    "type": "string",
    "anyOf": [
        {"pattern": f"^{kind}_", "minLength": len(kind) + 2, "maxLength": len(kind) + 1 + MAX_ID_LENGTH}
        for kind in ID_FIELDS
    ],
}

_PUBLISH_BODY: dict[str, Any] = {
    "type": "object",
    "description": "At least one of channel and user. A field given is not null: leave it out instead.",
    "required": ["event"],
    "anyOf": [{"required": ["channel"]}, {"required": ["user"]}],
    "properties": {
        "channel": {
            **_CHANNEL_KEY,
            "description": "notifications_U, feed_U, creator_C, post_P or conversation_C "
            f"(an id of 1 to {MAX_ID_LENGTH} characters)",
        },
        "user": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_USER_ID,
            "description": "every connection of this user",
        },
        "id": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_EVENT_ID,
            "description": "the event id; a retry with the same id is delivered once",
        },
        "event": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string", "minLength": 1}},
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the publish API, built from ``EVENTS``."""
    paths: dict[str, Any] = {
        "/api/publish": {
            "post": {
                "operationId": "publish",
                "summary": "Publish any event to a channel key and/or a user",
                "description": f"For event types without a typed endpoint ({', '.join(OTHER_EVENT_TYPES)}). "
                "The event is sent to clients as it is.",
                "security": [{"apiKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _PUBLISH_BODY,
                            "example": {"user": "U", "event": {"type": "earnings_updated", "amount": 5}},
                        }
                    },
                },
                "responses": _answers(list(_COMMON)),
            }
        }
    }
    for e in EVENTS:
        paths[path(e)] = {
            "post": {
                "operationId": operation_id(e),
                "summary": e.summary,
                "description": f"Sends `{e.event}` (protocol §3) to {e.delivered_to}.",
                "security": [{"apiKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": e.schema(), "example": e.example}},
                },
                "responses": _answers(statuses(e)),
            }
        }
    paths[presence_api.PATH] = presence_api.OPENAPI_PATH  # the one read: GET, not a publish
    paths[batch_api.PATH] = batch_api.openapi_path(_PUBLISH_BODY, _answers(list(_COMMON)))
    paths[users_api.PATH] = users_api.openapi_path(_answers(list(_COMMON)))
    paths[access_api.PATH] = access_api.openapi_path(_answers(list(_COMMON)))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fonana-ws publish API",
            "version": "1",
            "description": "How the Fonana web app hands events to the real-time server. Every request "
            "carries `Authorization: Bearer <WS_API_KEY>`.",
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "WS_API_KEY"}},
            "schemas": {
                "Accepted": {
                    "type": "object",
                    "required": ["ok", "id", "channels", "users"],
                    "properties": {
                        "ok": {"const": True},
                        "id": {"type": "string", "description": "the event id"},
                        "channels": {"type": "array", "items": {"type": "string"}},
                        "users": {"type": "array", "items": {"type": "string"}},
                        "event": {"type": "object", "description": "the event as sent (typed endpoints)"},
                    },
                },
                "Problem": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
            },
        },
        "paths": paths,
    }


async def openapi(request: Request) -> Response:
    """``GET /api/openapi.json``: the description of the publish API (no key needed)."""
    return JSONResponse(openapi_document())


routes: list[BaseRoute] = [
    *(Route(path(e), _handler(e), methods=["POST"]) for e in EVENTS),
    Route(OPENAPI_PATH, openapi, methods=["GET"]),
]
