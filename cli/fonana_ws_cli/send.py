"""``fonana-ws send <event>``: emit any Fonana event through the HTTP API or the broker.

One subcommand per event of protocol §3 (the event name with ``-`` for ``_``), plus ``raw`` for any
other event type. By default it POSTs to a running server's ``/api/events/<event>`` (``--url``, default
``http://127.0.0.1:$WS_PORT``; the key from ``--api-key`` / ``WS_API_KEY``, else the embedded default's
dev key). With ``--broker`` it prepares the event itself (opening the database when the event needs it)
and publishes the broker envelope on ``BROADCAST_URL``/``REDIS_URL``: the same validation and the same
event as the HTTP API, since both use ``fonana_ws.web.events_api.ENDPOINTS``.

On success the answer (``ok``, ``id``, ``channels``, ``users``, ``event``) is printed as JSON on stdout;
any failure prints the reason on stderr and exits 1 (2 for a bad option or configuration).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, NoReturn

import httpx
import orjson
import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    help="Send a Fonana event to connected clients (through the server's HTTP API, or --broker).",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

Url = Annotated[
    str | None,
    typer.Option(
        "--url", help="The server's HTTP address (default http://127.0.0.1:$WS_PORT).", show_default=False
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="WS_API_KEY",
        help="The server API key (env WS_API_KEY; default: the embedded default's dev key).",
        show_default=False,
        show_envvar=False,
    ),
]
ViaBroker = Annotated[
    bool,
    typer.Option(
        "--broker",
        help="Publish on the broker directly (BROADCAST_URL / REDIS_URL, DATABASE_URL) instead of HTTP.",
    ),
]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def parse_json(option: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None


# -- the two ways out ------------------------------------------------------------------------------------


_REFUSALS = {
    400: "the server refused the request",
    401: "the server refused the API key",
    403: "the server does not accept HTTP publishing",
    404: "not found",
    409: "conflict",
    413: "the event is too large",
    503: "the server cannot publish now",
}


def via_http(path: str, body: dict[str, Any], url: str | None, api_key: str | None) -> dict[str, Any]:
    if url is None or api_key is None:
        from .common import settings_or_exit

        settings = settings_or_exit()
        if url is None:
            host = settings.host if settings.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
            url = f"http://{host}:{settings.port}"
        api_key = api_key or settings.api_key
        if not api_key:
            fail("no API key: set WS_API_KEY (the server's key) or pass --api-key", 2)
    target = url.rstrip("/") + path
    try:
        response = httpx.post(target, json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=15)
    except httpx.HTTPError as exc:
        fail(
            f"cannot reach the server at {url}: {exc or type(exc).__name__} "
            "(is it running? see --url, or --broker)"
        )
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code == 202 and isinstance(answer, dict):
        return answer
    if not isinstance(answer, dict) or "error" not in answer:
        if response.status_code == 404:
            fail(f"the server at {url} has no {path} (is it a fonana-ws server, and a recent one?)")
        fail(f"unexpected answer {response.status_code} from {target}: {response.text[:300]}")
    what = _REFUSALS.get(response.status_code, "the server answered")
    hint = " (set WS_API_KEY, or --api-key, to the server's key)" if response.status_code == 401 else ""
    fail(f"{what} ({response.status_code}): {answer['error']}{hint}")


def via_broker(name: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """Prepare ``body`` as the endpoint ``name`` would (None: a raw publish) and publish it on the broker."""
    from fonana_ws.broker import BrokerUnavailable, PayloadTooLarge, mask_url
    from fonana_ws.fonana.events import Conflict, NotFound, connect_events
    from fonana_ws.fonana.publisher import PublishError
    from fonana_ws.web.events_api import BY_NAME, prepare

    from .common import settings_or_exit

    settings = settings_or_exit()
    if settings.broker_kind == "memory":
        fail(
            "--broker needs the broker the server uses: BROADCAST_URL (or REDIS_URL) is memory://, which "
            "reaches no other process; set it, or send over HTTP (without --broker)",
            2,
        )

    async def run() -> dict[str, Any]:
        async with connect_events(settings) as events:
            if name is None:
                emission = await events.publish_to(
                    body["event"], channel=body.get("channel"), user=body.get("user")
                )
            else:
                emission = await events.emit(await prepare(BY_NAME[name], events.store, body))
        return {
            "ok": True,
            "id": emission.id,
            "channels": emission.channels,
            "users": emission.users,
            "event": emission.event,
        }

    try:
        return asyncio.run(run())
    except PublishError as exc:
        fail(f"invalid event: {exc}")
    except NotFound as exc:
        fail(f"not found: {exc}")
    except Conflict as exc:
        fail(f"conflict: {exc}")
    except PayloadTooLarge as exc:
        fail(f"the event is too large: {exc}")
    except BrokerUnavailable as exc:
        fail(f"broker unavailable at {mask_url(settings.broadcast_url)}: {exc}")
    except Exception as exc:  # the database or the broker could not be reached at all
        fail(f"cannot publish: {type(exc).__name__}: {exc}")


def send(name: str, body: dict[str, Any], url: str | None, api_key: str | None, broker: bool) -> None:
    body = {k: v for k, v in body.items() if v is not None}
    answer = via_broker(name, body) if broker else via_http(f"/api/events/{name}", body, url, api_key)
    report(answer)


def report(answer: dict[str, Any]) -> None:
    targets = [*answer.get("channels", []), *(f"user {u}" for u in answer.get("users", []))]
    kind = (answer.get("event") or {}).get("type", "event")
    err.print(
        f"[green]sent[/green] {escape(str(kind))} to {escape(', '.join(targets) or 'nobody')} "
        f"(event id {answer.get('id')})",
        highlight=False,
        soft_wrap=True,
    )
    out.print_json(data=answer)


# -- one command per event ---------------------------------------------------------------------------------

User = Annotated[str, typer.Option("--user", "-u", help="The user id.")]
Post = Annotated[str, typer.Option("--post", "-p", help="The post id.")]
Creator = Annotated[str, typer.Option("--creator", "-c", help="The creator's user id.")]


@app.command("notification")
def notification(
    user: Annotated[str, typer.Option("--user", "-u", help="The recipient.")],
    title: Annotated[str, typer.Option("--title", help="The title.")],
    message: Annotated[str, typer.Option("--message", "-m", help="The text.")],
    type: Annotated[str, typer.Option("--type", help="LIKE_POST, NEW_MESSAGE, ...")] = "SYSTEM_ANNOUNCEMENT",
    metadata: Annotated[
        str | None, typer.Option("--metadata", help='JSON, e.g. \'{"postId":"p1"}\'.')
    ] = None,
    persist: Annotated[
        bool, typer.Option("--persist", help="The server writes the notifications row (else: not kept).")
    ] = False,
    id: Annotated[
        str | None, typer.Option("--id", help="The notification id (a row the web app wrote, or to write).")
    ] = None,
    created_at: Annotated[
        str | None, typer.Option("--created-at", help="ISO 8601 (without --persist).")
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """notification: to every connection of the user."""
    body = {
        "userId": user,
        "type": type,
        "title": title,
        "message": message,
        "metadata": parse_json("--metadata", metadata),
        "persist": persist or None,
        "id": id,
        "createdAt": created_at,
    }
    send("notification", body, url, api_key, broker)


@app.command("notification-read")
def notification_read(
    user: User,
    notification: Annotated[str, typer.Option("--notification", "-n", help="The notification id.")],
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """notification_read: mark one of the user's notifications read, and tell their connections."""
    send("notification-read", {"userId": user, "notificationId": notification}, url, api_key, broker)


@app.command("notifications-cleared")
def notifications_cleared(
    user: User, url: Url = None, api_key: ApiKey = None, broker: ViaBroker = False
) -> None:
    """notifications_cleared: mark all of the user's notifications read, and tell their connections."""
    send("notifications-cleared", {"userId": user}, url, api_key, broker)


@app.command("post-liked")
def post_liked(
    post: Post, user: User, url: Url = None, api_key: ApiKey = None, broker: ViaBroker = False
) -> None:
    """post_liked: to post_P, with likesCount as the posts row has it."""
    send("post-liked", {"postId": post, "userId": user}, url, api_key, broker)


@app.command("post-unliked")
def post_unliked(
    post: Post, user: User, url: Url = None, api_key: ApiKey = None, broker: ViaBroker = False
) -> None:
    """post_unliked: to post_P, with likesCount as the posts row has it."""
    send("post-unliked", {"postId": post, "userId": user}, url, api_key, broker)


@app.command("post-created")
def post_created(
    post: Post,
    title: Annotated[str | None, typer.Option("--title", help="Instead of the posts row's title.")] = None,
    type: Annotated[str | None, typer.Option("--type", help="Instead of the posts row's type.")] = None,
    thumbnail: Annotated[
        str | None, typer.Option("--thumbnail", help="Instead of the row's thumbnail.")
    ] = None,
    subscriber: Annotated[
        list[str] | None,
        typer.Option(
            "--subscriber", "-s", help="A feed to reach (repeat); default: the active paid subscribers."
        ),
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """post_created: to creator_C and the feed_S of each active paid subscriber."""
    fields = {"title": title, "type": type, "thumbnail": thumbnail}
    shown = {"id": post, **{k: v for k, v in fields.items() if v is not None}}
    send("post-created", {"post": shown, "subscriberIds": subscriber or None}, url, api_key, broker)


@app.command("post-deleted")
def post_deleted(post: Post, url: Url = None, api_key: ApiKey = None, broker: ViaBroker = False) -> None:
    """post_deleted: to post_P."""
    send("post-deleted", {"postId": post}, url, api_key, broker)


@app.command("comment-added")
def comment_added(
    post: Post,
    comment: Annotated[str, typer.Option("--comment", help="The comment id.")],
    user: Annotated[str, typer.Option("--user", "-u", help="The comment's author.")],
    content: Annotated[str, typer.Option("--content", help="The comment's text.")],
    created_at: Annotated[str | None, typer.Option("--created-at", help="ISO 8601; default: now.")] = None,
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """comment_added: to post_P."""
    shaped = {"id": comment, "userId": user, "content": content}
    if created_at is not None:
        shaped["createdAt"] = created_at
    send("comment-added", {"postId": post, "comment": shaped}, url, api_key, broker)


@app.command("comment-deleted")
def comment_deleted(
    post: Post,
    comment: Annotated[str, typer.Option("--comment", help="The comment id.")],
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """comment_deleted: to post_P."""
    send("comment-deleted", {"postId": post, "commentId": comment}, url, api_key, broker)


@app.command("creator-updated")
def creator_updated(
    creator: Creator,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="A changed field, FIELD=VALUE (repeat); VALUE is JSON, else a string."),
    ] = None,
    changes: Annotated[
        str | None, typer.Option("--changes", help="The changed fields as a JSON object.")
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """creator_updated: the changed fields, to creator_C."""
    data = parse_json("--changes", changes) if changes is not None else {}
    if not isinstance(data, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--changes")
    for item in set_ or []:
        field, sep, raw = item.partition("=")
        if not sep or not field:
            raise typer.BadParameter(f"{item!r} is not FIELD=VALUE", param_hint="--set")
        try:
            data[field] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data[field] = raw
    if not data:
        raise typer.BadParameter("give --set FIELD=VALUE or --changes JSON", param_hint="--set")
    send("creator-updated", {"creatorId": creator, "changes": data}, url, api_key, broker)


@app.command("new-subscription")
def new_subscription(
    creator: Creator,
    user: Annotated[str, typer.Option("--user", "-u", help="The new subscriber.")],
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """new_subscription: to the creator's connections only."""
    send("new-subscription", {"creatorId": creator, "userId": user}, url, api_key, broker)


@app.command("feed-update")
def feed_update(
    user: User,
    posts: Annotated[str, typer.Option("--posts", help="The posts as a JSON list.")],
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """feed_update: the posts, to every connection of the user."""
    send("feed-update", {"userId": user, "posts": parse_json("--posts", posts)}, url, api_key, broker)


@app.command("raw")
def raw(
    event: Annotated[str, typer.Option("--event", "-e", help='The event as JSON, e.g. \'{"type":"x"}\'.')],
    channel: Annotated[
        str | None, typer.Option("--channel", help="A channel key: post_P, creator_C, ...")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Every connection of this user.")] = None,
    url: Url = None,
    api_key: ApiKey = None,
    broker: ViaBroker = False,
) -> None:
    """Any event, sent as it is, to a channel key and/or a user (POST /api/publish)."""
    if channel is None and user is None:
        raise typer.BadParameter("give --channel KEY or --user ID (or both)", param_hint="--channel")
    body = {"channel": channel, "user": user, "event": parse_json("--event", event)}
    body = {k: v for k, v in body.items() if v is not None}
    answer = via_broker(None, body) if broker else via_http("/api/publish", body, url, api_key)
    report({**answer, "event": answer.get("event", body["event"])})
