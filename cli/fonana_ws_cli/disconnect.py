"""``fonana-ws disconnect --user U [--reason R]``: close every connection of a user, on every process.

The same two ways out as ``fonana-ws send``: by default a POST to a running server's
``/api/users/{id}/disconnect`` with the API key; with ``--broker`` the control message itself, published
on ``BROADCAST_URL``/``REDIS_URL`` (what that route publishes). Prints ``{"ok": true, "userId": U}`` on
stdout; a refusal exits 1 with the server's reason (2 for a bad option or setting).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import typer

from fonana_ws.fonana.disconnect import MAX_REASON

from .common import out
from .send import ApiKey, Url, ViaBroker, err, on_shared_broker, via_http


def disconnect(
    user: str = typer.Option(..., "--user", "-u", help="The user id whose connections close (4003)."),
    reason: str = typer.Option(
        None, "--reason", help=f"Why, for the server log (at most {MAX_REASON} characters)."
    ),
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """Close every connection of a user on every server process (close 4003)."""
    if reason is not None and len(reason) > MAX_REASON:
        raise typer.BadParameter(f"at most {MAX_REASON} characters", param_hint="--reason")
    body = {"reason": reason} if reason else {}
    if broker:
        answer = via_broker(user, reason)
    else:
        # The id is one path segment: a "/" or "?" in it must not change the route.
        answer = via_http(f"/api/users/{quote(user, safe='')}/disconnect", body, url, api_key)
    err.print(f"[green]disconnect asked[/green] for every connection of user {user}", highlight=False)
    out.print_json(data=answer)


def via_broker(user: str, reason: str | None) -> dict[str, Any]:
    """Publish the disconnect control message on the broker the servers share."""
    from fonana_ws.fonana.disconnect import disconnect_everywhere

    on_shared_broker(lambda broker: disconnect_everywhere(broker, user, reason))
    return {"ok": True, "userId": user}
