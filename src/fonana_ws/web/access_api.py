"""``POST /api/access/revoke``: check a post's access rule again now, on every process concerned (§7.7).

The web app calls it when access may have shrunk: a subscription cancelled, expired early or refunded
(``{"userId": U, "creatorId": C}``), a post locked, re-tiered or deleted (``{"postId": P}``), a purchase
refunded (``{"userId": U, "postId": P}``). The work is ``fonana.revocation``'s, through the broker; 202
means every process concerned was asked. Subscribers who lost access get ``unsubscribed`` with
``"reason": "access revoked"`` a few milliseconds later; those still allowed are untouched.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fonana_ws.fonana import revocation
from fonana_ws.fonana.errors import REFUSED
from fonana_ws.fonana.publisher import MAX_USER_ID, PublishError
from fonana_ws.web.api import check_api_key, read_json, refused, services

PATH = "/api/access/revoke"
#: The body's forms: the fields each has, exactly.
FORMS = (frozenset({"userId", "creatorId"}), frozenset({"postId"}), frozenset({"userId", "postId"}))


def revoke_body(body: Any) -> tuple[str | None, str | None, str | None]:
    """The body -> (userId, creatorId, postId), or ``PublishError`` naming what is wrong."""
    if not isinstance(body, dict):
        raise PublishError("body must be a JSON object")
    fields = frozenset(body)
    if fields not in FORMS:
        raise PublishError(
            'body must be {"userId", "creatorId"} (a subscription ended), {"postId"} (a post locked or '
            'deleted) or {"userId", "postId"} (a purchase refunded), with no other field'
        )
    for name in fields:
        value = body[name]
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_USER_ID:
            raise PublishError(f"{name} must be a string of 1 to {MAX_USER_ID} characters")
    return body.get("userId"), body.get("creatorId"), body.get("postId")


async def revoke(request: Request) -> Response:
    """``POST /api/access/revoke``: 202 ``{"ok": true, ...the body}``."""
    if (denied := check_api_key(request)) is not None:
        return denied
    try:
        user_id, creator_id, post_id = revoke_body(await read_json(request))
        await revocation.revoke(services(request).broker, user_id, creator_id, post_id)
    except REFUSED as exc:
        return refused(exc, request.url.path)
    given = {"userId": user_id, "creatorId": creator_id, "postId": post_id}
    return JSONResponse({"ok": True, **{k: v for k, v in given.items() if v is not None}}, status_code=202)


def openapi_path(answers: dict[str, Any]) -> dict[str, Any]:
    """The path entry; ``answers`` are the error responses every API route shares."""
    ident = {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID}

    def form(*names: str, title: str) -> dict[str, Any]:
        return {
            "title": title,
            "type": "object",
            "required": list(names),
            "properties": {name: ident for name in names},
            "additionalProperties": False,
        }

    body = {
        "oneOf": [
            form("userId", "creatorId", title="a subscription ended, was cancelled or refunded"),
            form("postId", title="a post was locked, re-tiered or deleted"),
            form("userId", "postId", title="a purchase was refunded"),
        ]
    }
    accepted = {
        "description": "every process concerned was asked to check the access rule again",
        "content": {"application/json": {"schema": {"type": "object", "required": ["ok"]}}},
    }
    return {
        "post": {
            "operationId": "revoke_access",
            "summary": "Check a post's access rule again now, for the subscribers concerned, everywhere",
            "description": "Subscribers no longer allowed leave the post channel and receive "
            '`unsubscribed` with `"reason": "access revoked"` (protocol §7.7).',
            "security": [{"apiKey": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": body, "example": {"userId": "U", "creatorId": "C"}}
                },
            },
            "responses": {**answers, "202": accepted},
        }
    }
