"""``POST /api/publish/batch``: up to 100 ``/api/publish`` bodies in one request (protocol §7.7).

Every item is checked first, by the rules ``/api/publish`` and the publisher apply, and one bad item
refuses the whole batch before anything is published (the error starts ``items[i]: ``). The items are then
published in order, each through the process's publisher as ``/api/publish`` would, so each is delivered
at most once per connection and after the one before it.

A failure part way (the broker goes down at item k) stops there: items before k were delivered, k and
later ones were not (a publish is all or none), and the answer says so item by item with the failure's own
status (503 for the broker): the caller resends exactly the items marked ``"ok": false``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fonana_ws.broker import PayloadTooLarge
from fonana_ws.fonana.errors import REFUSED, refusal_of
from fonana_ws.fonana.publisher import (
    MAX_EVENT_ID,
    MAX_USER_ID,
    PublishError,
    paid_message_concealed,
    validate_event,
)
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol.channels import ChannelError, parse_key
from fonana_ws.web.api import check_api_key, publish_body, read_json, refused, services

log = logging.getLogger("fonana_ws.api")

PATH = "/api/publish/batch"
MAX_ITEMS = 100


@dataclass(frozen=True, slots=True)
class Item:
    """One checked item, as the publisher takes it."""

    event: dict[str, Any]
    channels: list[str]
    users: list[str]
    event_id: str | None


def batch_items(body: Any, max_event_size: int) -> list[Item]:
    """The batch body -> its checked items, or ``PublishError`` (``PayloadTooLarge`` for an item too large
    to carry) whose message names the item: ``items[57]: event.type must be a non-empty string``."""
    if not isinstance(body, dict):
        raise PublishError("body must be a JSON object")
    if "items" not in body:
        raise PublishError("items is required")
    items = body["items"]
    if not isinstance(items, list):
        raise PublishError("items must be a list of publish bodies")
    if not 1 <= len(items) <= MAX_ITEMS:
        raise PublishError(f"items must hold 1 to {MAX_ITEMS} bodies (it holds {len(items)})")
    checked = []
    for index, raw in enumerate(items):
        try:
            checked.append(check_item(raw, max_event_size))
        except (PublishError, PayloadTooLarge) as exc:
            raise type(exc)(f"items[{index}]: {exc}") from None
    return checked


def check_item(raw: Any, max_event_size: int) -> Item:
    """One item checked as ``/api/publish`` and ``Publisher.publish`` check theirs, publishing nothing.

    The same checks in the same order, with the same words (``tests/unit/test_batch.py`` holds them to the
    publisher's): a rule added there must be added here.
    """
    event, channels, users, event_id = publish_body(raw)
    validate_event(event)
    event = paid_message_concealed(event)
    if event_id is not None and not 1 <= len(event_id) <= MAX_EVENT_ID:
        raise PublishError(f"id must be a string of 1 to {MAX_EVENT_ID} characters")
    where: list[dict[str, str]] = []
    for key in channels:
        try:
            parse_key(key)
        except ChannelError as exc:
            raise PublishError(f"channel: {exc}") from None
        where.append({"channel": key})
    for user in users:
        if not user or len(user) > MAX_USER_ID:
            raise PublishError(f"user must be a user id of 1 to {MAX_USER_ID} characters")
        where.append({"user": user})
    # The envelope as the publisher will encode it; a made-up id is as long as the one it will make.
    multi = len(where) > 1 or event_id is not None
    for target in where:
        size = len(env.encode(event, event_id or env.new_event_id(), multi=multi, **target).encode())
        if size > max_event_size:
            raise PayloadTooLarge(f"the event is {size} bytes encoded, over the {max_event_size} byte limit")
    return Item(event, channels, users, event_id)


async def publish_batch(request: Request) -> Response:
    """``POST /api/publish/batch``: ``{"items": [<an /api/publish body>, ...]}``, 1 to 100 items."""
    if (denied := check_api_key(request)) is not None:
        return denied
    svc = services(request)
    try:
        items = batch_items(await read_json(request), svc.publisher.max_event_size)
    except REFUSED as exc:
        return refused(exc, request.url.path)
    results: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            event_id = await svc.publisher.publish(
                item.event, channels=item.channels, users=item.users, event_id=item.event_id
            )
        except Exception as exc:
            return _stopped(request, items, results, index, exc)
        results.append({"index": index, "ok": True, "id": event_id})
    return JSONResponse({"ok": True, "results": results}, status_code=202)


def _stopped(
    request: Request, items: list[Item], results: list[dict[str, Any]], index: int, exc: Exception
) -> Response:
    """The answer to a failure at item ``index``: what was delivered, what was not, and why."""
    try:
        refusal = refusal_of(type(exc))
    except KeyError:  # not one of the table's failures (a bug, or a backend's odd refusal): still say
        status, error = 500, f"items[{index}]: internal error ({type(exc).__name__})"
        log.exception("%s: publishing stopped at items[%d] of %d", request.url.path, index, len(items))
    else:
        status, error = refusal.status, f"items[{index}]: {refusal.reason(exc)}"
        if refusal.server_fault:
            log.error(
                "%s: publishing stopped at items[%d] of %d: %s", request.url.path, index, len(items), exc
            )
    results.append({"index": index, "ok": False, "error": error})
    results.extend({"index": later, "ok": False} for later in range(index + 1, len(items)))
    return JSONResponse(
        {"ok": False, "error": error, "published": index, "results": results}, status_code=status
    )


# -- OpenAPI (``events_api.openapi_document`` adds it) ---------------------------------------------------


def openapi_path(item_schema: dict[str, Any], answers: dict[str, Any]) -> dict[str, Any]:
    """The path entry: ``item_schema`` is ``/api/publish``'s body, ``answers`` its error responses."""
    result = {
        "type": "object",
        "required": ["index", "ok"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            "ok": {"type": "boolean", "description": "delivered to the broker"},
            "id": {"type": "string", "description": "the event id (delivered items)"},
            "error": {"type": "string", "description": "why publishing stopped at this item"},
        },
    }
    results = {"type": "array", "items": result}
    accepted = {
        "type": "object",
        "required": ["ok", "results"],
        "properties": {"ok": {"const": True}, "results": results},
    }
    stopped = {
        "type": "object",
        "description": "publishing stopped part way: the items before `published` were delivered, the "
        "others were not",
        "required": ["ok", "error", "published", "results"],
        "properties": {
            "ok": {"const": False},
            "error": {"type": "string"},
            "published": {"type": "integer", "description": "how many items, from the first, were delivered"},
            "results": results,
        },
    }
    responses = {
        **answers,
        "202": {"description": "every item published, in order", "content": _json(accepted)},
    }
    for code in ("413", "503"):  # a failure part way also says item by item what was delivered
        problem = responses[code]["content"]["application/json"]["schema"]
        responses[code] = {**responses[code], "content": _json({"anyOf": [problem, stopped]})}
    return {
        "post": {
            "operationId": "publish_batch",
            "summary": f"Publish 1 to {MAX_ITEMS} events in order, each as /api/publish would",
            "description": "Every item is checked first: one invalid item refuses the batch (the error "
            "starts `items[i]: `) and nothing is published. Then the items are published in order.",
            "security": [{"apiKey": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["items"],
                            "properties": {
                                "items": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": MAX_ITEMS,
                                    "items": item_schema,
                                }
                            },
                        },
                        "example": {
                            "items": [
                                {"user": "U", "event": {"type": "earnings_updated", "amount": 5}},
                                {"channel": "post_P", "event": {"type": "post_liked", "postId": "P"}},
                            ]
                        },
                    }
                },
            },
            "responses": dict(sorted(responses.items())),
        }
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}
