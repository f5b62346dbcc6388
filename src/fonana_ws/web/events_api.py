"""Typed HTTP endpoints, one per Fonana event: ``POST /api/events/<name>``, and their OpenAPI description.

Each endpoint is described once, in :data:`ENDPOINTS` (its body fields, an example, the function that
prepares the event); the request validation, the OpenAPI document at ``GET /api/openapi.json`` and the
``fonana-ws send --broker`` command all read that table, so they cannot drift apart.

Answers: 202 ``{"ok", "id", "channels", "users", "event"}``; 400 with ``error`` naming the field; 401/403
for the API key (as ``/api/publish``); 404 when a referenced user, post or notification does not exist;
409 for a notification id of another user; 413 for a body over ``WS_MAX_EVENT_SIZE`` (refused unread)
or an event the broker cannot carry; 408 for a body not in within ``WS_BODY_TIMEOUT``; 503 from the
broker, and when the database fails.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from fonana_ws.db import Store
from fonana_ws.db.schema import NOTIFICATION_TYPES
from fonana_ws.fonana import events as ev
from fonana_ws.fonana.publisher import MAX_EVENT_ID, MAX_USER_ID, PublishError
from fonana_ws.protocol.channels import ID_FIELDS, MAX_ID_LENGTH
from fonana_ws.web.api import BodyRefused, check_api_key, problem, publish_and_answer, read_json, services

log = logging.getLogger("fonana_ws.events_api")

PREFIX = "/api/events/"
OPENAPI_PATH = "/api/openapi.json"

#: Errors of the database driver: the event could not be prepared now (503), the request is fine.
DATABASE_ERRORS = (OSError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError)

_ID = {"type": "string", "minLength": 1, "maxLength": 200}
_TIMESTAMP = {"type": "string", "format": "date-time", "example": "2024-01-02T03:04:05.678Z"}

#: Field kind -> (OpenAPI schema, the JSON check, what the 400 says it must be).
KINDS: dict[str, tuple[dict[str, Any], Callable[[Any], bool], str]] = {
    "id": (_ID, lambda v: isinstance(v, str) and v != "", "an id string"),
    "string": ({"type": "string"}, lambda v: isinstance(v, str), "a string"),
    "boolean": ({"type": "boolean"}, lambda v: isinstance(v, bool), "true or false"),
    "json": ({"description": "any JSON value"}, lambda v: True, "JSON"),
    "timestamp": (_TIMESTAMP, lambda v: isinstance(v, str), "an ISO 8601 timestamp string"),
    "notification_type": (
        {"type": "string", "enum": list(NOTIFICATION_TYPES)},
        lambda v: v in NOTIFICATION_TYPES,
        "one of " + ", ".join(NOTIFICATION_TYPES),
    ),
    "ids": (
        {"type": "array", "items": _ID},
        lambda v: isinstance(v, list) and all(isinstance(i, str) and i for i in v),
        "a list of id strings",
    ),
    "object": ({"type": "object"}, lambda v: isinstance(v, dict), "an object"),
    "changes": (
        {"type": "object", "minProperties": 1, "additionalProperties": True},
        lambda v: isinstance(v, dict) and bool(v),
        "an object with at least one changed field",
    ),
    "array": ({"type": "array", "items": {}}, lambda v: isinstance(v, list), "a list"),
    "post": (
        {
            "oneOf": [
                {**_ID, "description": "the post id"},
                {
                    "type": "object",
                    "description": "the post (a whole post object is fine); fields not given come from "
                    "the posts row",
                    "required": ["id"],
                    "properties": {
                        "id": _ID,
                        "creatorId": {**_ID, "description": "checked against the post's creator"},
                        "title": {"type": "string"},
                        "type": {"type": "string"},
                        "thumbnail": {"type": ["string", "null"]},
                        "createdAt": _TIMESTAMP,
                    },
                    "additionalProperties": True,
                },
            ]
        },
        lambda v: (isinstance(v, str) and v != "") or isinstance(v, dict),
        "a post id or a post object with id",
    ),
    "comment": (
        {
            "type": "object",
            "required": ["id", "userId", "content"],
            "properties": {
                "id": _ID,
                "userId": _ID,
                "content": {"type": "string"},
                "createdAt": {**_TIMESTAMP, "description": "default: now"},
            },
        },
        lambda v: isinstance(v, dict),
        "an object with id, userId, content and createdAt",
    ),
}


@dataclass(frozen=True)
class Field:
    name: str  # the JSON field
    kind: str  # a key of KINDS
    doc: str
    required: bool = True
    arg: str = ""  # the keyword of the prepare function; default: the JSON name

    @property
    def keyword(self) -> str:
        return self.arg or self.name


Prepare = Callable[[Store, dict[str, Any]], Awaitable[ev.Emission]]


@dataclass(frozen=True)
class Endpoint:
    name: str  # the path segment and the `fonana-ws send` subcommand
    event: str
    summary: str
    delivered_to: str
    fields: tuple[Field, ...]
    prepare: Prepare
    example: dict[str, Any]
    #: More of the body's schema: rules between fields, which the prepare function enforces (400).
    rules: tuple[tuple[str, Any], ...] = ()

    @property
    def path(self) -> str:
        return PREFIX + self.name

    def validate(self, body: Any) -> dict[str, Any]:
        """The prepare function's keyword arguments, or ``PublishError`` naming the field."""
        if not isinstance(body, dict):
            raise PublishError("body must be a JSON object")
        known = {f.name: f for f in self.fields}
        for name in body:
            if name not in known:
                raise PublishError(f"{name}: unknown field (expected {', '.join(known)})")
        args: dict[str, Any] = {}
        for f in self.fields:
            value = body.get(f.name)
            if value is None:
                if f.required:
                    raise PublishError(f"{f.name} is required")
                continue
            _schema, check, must = KINDS[f.kind]
            if not check(value):
                raise PublishError(f"{f.name} must be {must}")
            args[f.keyword] = value
        return args

    def schema(self) -> dict[str, Any]:
        properties = {}
        for f in self.fields:
            properties[f.name] = {**KINDS[f.kind][0], "description": f.doc}
        return {
            "type": "object",
            "required": [f.name for f in self.fields if f.required],
            "properties": properties,
            "additionalProperties": False,
            **dict(self.rules),
        }


def _fields(*specs: tuple[str, str, str] | Field) -> tuple[Field, ...]:
    return tuple(s if isinstance(s, Field) else Field(*s) for s in specs)


USER = ("userId", "id", "the user (every connection of this user receives the event)")
POST = ("postId", "id", "the post")

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "notification",
        "notification",
        "Send a notification (optionally persisting the notifications row)",
        "every connection of the user (which covers notifications_U)",
        _fields(
            Field("userId", "id", "the recipient", arg="user_id"),
            ("type", "notification_type", "the notification type"),
            ("title", "string", "the title"),
            ("message", "string", "the text"),
            Field("metadata", "json", "any JSON the web app attaches (e.g. postId)", required=False),
            Field(
                "persist",
                "boolean",
                "true: the server writes the notifications row (the event carries the stored row); "
                "false (default): the caller wrote it already or it is not kept",
                required=False,
            ),
            Field(
                "id",
                "id",
                "the notification id: the row the web app wrote (persist false), or the id to write "
                "(persist true; sending again reuses the row). Default: a new cuid-like id",
                required=False,
                arg="notification_id",
            ),
            Field(
                "createdAt",
                "timestamp",
                "the row's createdAt (persist false only: refused with persist true); default: now",
                required=False,
                arg="created_at",
            ),
        ),
        lambda store, a: ev.prepare_notification(store, **a),
        {"userId": "U", "type": "LIKE_POST", "title": "New like", "message": "Bob liked your post"},
        # createdAt with persist true is refused: the row the server writes gets the time it is written.
        rules=(("not", {"required": ["persist", "createdAt"], "properties": {"persist": {"const": True}}}),),
    ),
    Endpoint(
        "notification-read",
        "notification_read",
        "Mark one of the user's notifications read",
        "every connection of the user",
        _fields(
            Field(*USER, arg="user_id"),
            Field("notificationId", "id", "a notification of that user", arg="notification_id"),
        ),
        lambda store, a: ev.prepare_notification_read(store, **a),
        {"userId": "U", "notificationId": "N"},
    ),
    Endpoint(
        "notifications-cleared",
        "notifications_cleared",
        "Mark all of the user's unread notifications read",
        "every connection of the user",
        _fields(Field(*USER, arg="user_id")),
        lambda store, a: ev.prepare_notifications_cleared(store, **a),
        {"userId": "U"},
    ),
    Endpoint(
        "post-liked",
        "post_liked",
        "A user liked a post (likesCount is read from posts)",
        "post_P",
        _fields(Field(*POST, arg="post_id"), Field("userId", "id", "who liked it", arg="user_id")),
        lambda store, a: ev.prepare_post_likes(store, is_liked=True, **a),
        {"postId": "P", "userId": "U"},
    ),
    Endpoint(
        "post-unliked",
        "post_unliked",
        "A user took back a like (likesCount is read from posts)",
        "post_P",
        _fields(Field(*POST, arg="post_id"), Field("userId", "id", "who unliked it", arg="user_id")),
        lambda store, a: ev.prepare_post_likes(store, is_liked=False, **a),
        {"postId": "P", "userId": "U"},
    ),
    Endpoint(
        "post-created",
        "post_created",
        "A creator published a post",
        "creator_C and the feed_S of each active paid subscriber S",
        _fields(
            ("post", "post", "the post id, or the post object"),
            Field(
                "subscriberIds",
                "ids",
                "whose feeds receive it; default: the creator's active paid subscribers",
                required=False,
                arg="subscriber_ids",
            ),
        ),
        lambda store, a: ev.prepare_post_created(store, **a),
        {"post": {"id": "P", "thumbnail": "https://cdn.example/p.jpg"}},
    ),
    Endpoint(
        "post-deleted",
        "post_deleted",
        "A post was deleted",
        "post_P",
        _fields(Field(*POST, arg="post_id")),
        lambda store, a: ev.prepare_post_deleted(store, **a),
        {"postId": "P"},
    ),
    Endpoint(
        "comment-added",
        "comment_added",
        "A comment was added to a post",
        "post_P",
        _fields(Field(*POST, arg="post_id"), ("comment", "comment", "the comment")),
        lambda store, a: ev.prepare_comment_added(store, **a),
        {"postId": "P", "comment": {"id": "K", "userId": "U", "content": "Nice!"}},
    ),
    Endpoint(
        "comment-deleted",
        "comment_deleted",
        "A comment was deleted",
        "post_P",
        _fields(Field(*POST, arg="post_id"), Field("commentId", "id", "the comment", arg="comment_id")),
        lambda store, a: ev.prepare_comment_deleted(store, **a),
        {"postId": "P", "commentId": "K"},
    ),
    Endpoint(
        "creator-updated",
        "creator_updated",
        "A creator's public profile changed",
        "creator_C",
        _fields(
            Field("creatorId", "id", "the creator", arg="creator_id"),
            ("changes", "changes", "the changed fields; the event carries them as data"),
        ),
        lambda store, a: ev.prepare_creator_updated(store, **a),
        {"creatorId": "C", "changes": {"nickname": "new-name"}},
    ),
    Endpoint(
        "new-subscription",
        "new_subscription",
        "A user subscribed to a creator",
        "the creator only (every connection of the creator; never the public creator_C)",
        _fields(
            Field("creatorId", "id", "the creator", arg="creator_id"),
            Field("userId", "id", "the new subscriber", arg="user_id"),
        ),
        lambda store, a: ev.prepare_new_subscription(store, **a),
        {"creatorId": "C", "userId": "U"},
    ),
    Endpoint(
        "feed-update",
        "feed_update",
        "New content for a user's feed",
        "every connection of the user (which covers feed_U)",
        _fields(Field(*USER, arg="user_id"), ("posts", "array", "the posts, as the feed shows them")),
        lambda store, a: ev.prepare_feed_update(store, **a),
        {"userId": "U", "posts": [{"id": "P", "title": "Hello"}]},
    ),
)

BY_NAME: dict[str, Endpoint] = {e.name: e for e in ENDPOINTS}


async def prepare(endpoint: Endpoint, store: Store, body: Any) -> ev.Emission:
    """Validate ``body`` and prepare the event (the HTTP handler and ``fonana-ws send --broker``)."""
    return await endpoint.prepare(store, endpoint.validate(body))


def _handler(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        if (denied := check_api_key(request)) is not None:
            return denied
        try:
            emission = await prepare(endpoint, services(request).store, await read_json(request))
        except BodyRefused as exc:
            return exc.response()
        except PublishError as exc:
            return problem(400, str(exc))
        except ev.NotFound as exc:
            return problem(404, str(exc))
        except ev.Conflict as exc:
            return problem(409, str(exc))
        except DATABASE_ERRORS as exc:
            log.error("%s: database error: %s: %s", endpoint.path, type(exc).__name__, exc)
            return problem(503, f"database unavailable: {type(exc).__name__}")
        response = await publish_and_answer(request, emission.event, emission.channels, emission.users)
        if response.status_code != 202:
            return response
        return JSONResponse({**orjson.loads(response.body), "event": emission.event}, status_code=202)

    handle.__name__ = handle.__qualname__ = "event_" + endpoint.name.replace("-", "_")
    handle.__doc__ = f"``POST {endpoint.path}``: {endpoint.summary}."
    return handle


# -- OpenAPI ------------------------------------------------------------------------------------------------

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _answers(*codes: str) -> dict[str, Any]:
    text = {
        "400": "the body is not valid; error names the field",
        "401": "missing or wrong API key",
        "403": "publishing over HTTP is disabled (WS_API_KEY is not set)",
        "404": "a referenced user, post or notification does not exist",
        "409": "the notification id belongs to another user",
        "408": "the body did not arrive within WS_BODY_TIMEOUT seconds",
        "413": "the body is larger than WS_MAX_EVENT_SIZE, or the event than the broker carries",
        "503": "the broker or the database is unavailable",
    }
    out: dict[str, Any] = {
        "202": {
            "description": "published",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
        }
    }
    for code in codes:
        out[code] = {"description": text[code], "content": {"application/json": {"schema": _PROBLEM}}}
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
            "description": f"notifications_U, feed_U, creator_C or post_P (an id of 1 to {MAX_ID_LENGTH} "
            "characters)",
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
    """The OpenAPI 3.1 description of the publish API, built from :data:`ENDPOINTS`."""
    paths: dict[str, Any] = {
        "/api/publish": {
            "post": {
                "operationId": "publish",
                "summary": "Publish any event to a channel key and/or a user",
                "description": "For event types without a typed endpoint (subscription_cancelled, "
                "earnings_updated, flash_sale_created, flash_sale_ended, post_updated, post_purchased, "
                "subscription_updated). The event is sent to clients as it is.",
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
                "responses": _answers("400", "401", "403", "408", "413", "503"),
            }
        }
    }
    for e in ENDPOINTS:
        paths[e.path] = {
            "post": {
                "operationId": "event_" + e.name.replace("-", "_"),
                "summary": e.summary,
                "description": f"Sends `{e.event}` (protocol §3) to {e.delivered_to}.",
                "security": [{"apiKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": e.schema(), "example": e.example}},
                },
                "responses": _answers("400", "401", "403", "404", "408", "409", "413", "503")
                if e.name == "notification"
                else _answers("400", "401", "403", "404", "408", "413", "503"),
            }
        }
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
    *(Route(e.path, _handler(e), methods=["POST"]) for e in ENDPOINTS),
    Route(OPENAPI_PATH, openapi, methods=["GET"]),
]
