"""``fonana-ws revoke``: check a post's access rule again now, for the subscribers concerned, everywhere.

Three forms, as ``POST /api/access/revoke``: ``--user U --creator C`` (a subscription ended or was
refunded), ``--post P`` (a post locked, re-tiered or deleted), ``--user U --post P`` (a purchase
refunded). By default a POST to a running server with the API key; with ``--broker`` the control message
itself, on ``BROADCAST_URL``/``REDIS_URL``. Prints the server's answer; a refusal exits 1 (2 for a bad
option or setting).
"""

from __future__ import annotations

from typing import Any

import typer

from .common import out
from .send import ApiKey, Url, ViaBroker, err, on_shared_broker, via_http


def revoke(
    user: str = typer.Option(None, "--user", "-u", help="The user whose access shrank."),
    creator: str = typer.Option(None, "--creator", help="With --user: their subscription to this creator."),
    post: str = typer.Option(None, "--post", help="The post whose access shrank (alone, or with --user)."),
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """Unsubscribe, on every process, the post subscribers who are no longer allowed (access revoked)."""
    body = {k: v for k, v in (("userId", user), ("creatorId", creator), ("postId", post)) if v is not None}
    forms = ({"userId", "creatorId"}, {"postId"}, {"userId", "postId"})
    if set(body) not in forms:
        raise typer.BadParameter(
            "give --user and --creator (a subscription ended), --post (a post locked or deleted), or --user "
            "and --post (a purchase refunded)",
            param_hint="--user/--creator/--post",
        )
    answer = via_broker(user, creator, post) if broker else via_http("/api/access/revoke", body, url, api_key)
    err.print("[green]revoke asked[/green]: the subscribers concerned are checked again", highlight=False)
    out.print_json(data=answer)


def via_broker(user: str | None, creator: str | None, post: str | None) -> dict[str, Any]:
    """Publish the revoke control message on the broker the servers share."""
    from fonana_ws.fonana import revocation

    on_shared_broker(lambda broker: revocation.revoke(broker, user, creator, post))
    given = {"userId": user, "creatorId": creator, "postId": post}
    return {"ok": True, **{k: v for k, v in given.items() if v is not None}}
