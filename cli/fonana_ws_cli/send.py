"""``fonana-ws send <event>``: emit any Fonana event through the HTTP API or the broker.

One subcommand per entry of ``fonana_ws.fonana.events.EVENTS``, generated from it (nothing here is
written per event): an option per body field, named after it (``userId`` -> ``--user``,
``createdAt`` -> ``--created-at``, ``subscriberIds`` -> ``--subscriber``, repeated), the field's doc
as its help and the entry's example body in the epilog. A member of an object field is an option of its
own (``comment.content`` -> ``--content``), the object's id takes the field's option (``--comment``).
How a field is taken follows its JSON Schema: a string is a value, a boolean a flag, a list of strings a
repeated option, an open object ``--set FIELD=VALUE`` (repeat) or the object as JSON, anything else
JSON. Plus ``raw`` for any other event type.

By default it POSTs to a running server's ``/api/events/<event>`` (``--url``, default
``http://127.0.0.1:$WS_PORT``; the key from ``--api-key`` / ``WS_API_KEY``, else the embedded default's
dev key). With ``--broker`` it prepares the event itself (opening the database when the event needs it)
and publishes the broker envelope on ``BROADCAST_URL``/``REDIS_URL``: the same table, the same checks,
the same event as the HTTP API.

On success the answer (``ok``, ``id``, ``channels``, ``users``, ``event``) is printed as JSON on stdout;
a refusal prints ``<what> (<status>): <reason>`` on stderr (the words of ``fonana_ws.fonana.errors``)
and exits 1; a bad option or configuration exits 2.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import httpx
import orjson
import typer
from rich.console import Console
from rich.markup import escape

from fonana_ws.fonana.errors import REFUSED, by_status, refusal_of
from fonana_ws.fonana.events import EVENTS, Event
from fonana_ws.fonana.fields import Field

from .common import describe_error, settings_or_exit

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


def via_http(path: str, body: dict[str, Any], url: str | None, api_key: str | None) -> dict[str, Any]:
    if url is None or api_key is None:
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
    refusal = by_status(response.status_code)
    what = refusal.cli if refusal else "the server answered"
    hint = " (set WS_API_KEY, or --api-key, to the server's key)" if response.status_code == 401 else ""
    fail(f"{what} ({response.status_code}): {answer['error']}{hint}", refusal.exit_code if refusal else 1)


def via_broker(name: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """Prepare ``body`` as the route ``name`` would (None: a raw publish) and publish it on the broker."""
    from fonana_ws.broker import mask_url
    from fonana_ws.fonana.events import connect_events

    settings = settings_or_exit()
    if settings.broker_kind == "memory":
        fail(
            "--broker needs the broker the server uses: BROADCAST_URL (or REDIS_URL) is memory://, which "
            "reaches no other process; set it, or send over HTTP (without --broker)",
            2,
        )
    connected = False

    async def run() -> dict[str, Any]:
        nonlocal connected
        async with connect_events(settings) as events:
            connected = True
            if name is None:
                emission = await events.publish_to(
                    body["event"], channel=body.get("channel"), user=body.get("user")
                )
            else:
                emission = await events.emit(name, **body)
        return {
            "ok": True,
            "id": emission.id,
            "channels": emission.channels,
            "users": emission.users,
            "event": emission.event,
        }

    where = (
        f"BROADCAST_URL {mask_url(settings.broadcast_url)}, DATABASE_URL {mask_url(settings.database_url)}"
    )
    try:
        return asyncio.run(run())
    except Exception as exc:
        if not connected:  # the database or the broker could not be reached at all
            fail(f"cannot connect: {describe_error(exc)} ({where})")
        fail_refused(exc, where)


def on_shared_broker(work: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``work(broker)`` on the broker the servers share (``--broker`` of disconnect and revoke):
    exit 2 on the memory broker, which reaches no other process, and 1 when it cannot be done."""
    from fonana_ws.broker import Broker, mask_url

    settings = settings_or_exit()
    if settings.broker_kind == "memory":
        fail(
            "--broker needs the broker the server uses: BROADCAST_URL (or REDIS_URL) is memory://, which "
            "reaches no other process; set it, or go over HTTP (without --broker)",
            2,
        )

    async def run() -> None:
        shared = Broker(settings.broadcast_url)
        await shared.connect()
        try:
            await work(shared)
        finally:
            await shared.disconnect()

    try:
        asyncio.run(run())
    except Exception as exc:
        fail(f"cannot publish: {describe_error(exc)} (BROADCAST_URL {mask_url(settings.broadcast_url)})")


def fail_refused(exc: BaseException, where: str) -> NoReturn:
    """Exit with a failure of the event in the table's words; the server's own faults name ``where``."""
    if not isinstance(exc, REFUSED):
        fail(f"cannot publish: {describe_error(exc)}")
    refusal = refusal_of(type(exc))
    reason = refusal.reason(exc)
    if refusal.server_fault:  # the operator at this terminal may see what the HTTP answer leaves out
        reason += f" ({where})" if str(exc) in reason else f" ({describe_error(exc)}; {where})"
    fail(f"{refusal.cli}: {reason}", refusal.exit_code)


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


# -- the subcommands, from the table ---------------------------------------------------------------------

#: Short forms of the options most typed by hand.
SHORT = {
    "--user": "-u",
    "--post": "-p",
    "--creator": "-c",
    "--message": "-m",
    "--notification": "-n",
    "--subscriber": "-s",
}
#: The options every subcommand has besides its fields.
COMMON = ("url", "api_key", "broker")


@dataclass(frozen=True)
class Option:
    """One option of a subcommand: the body field (and member) it fills, and how it takes the value."""

    flag: str  # --created-at
    field: Field
    member: Field | None  # the member of an object field, else None
    #: text (a value), flag, json (a JSON value), repeat (a list of strings), pairs (--set FIELD=VALUE,
    #: into an open object), object (the open object as JSON)
    form: str
    required: bool

    @property
    def param(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def target(self) -> Field:
        return self.member or self.field

    @property
    def json_name(self) -> str:
        return f"{self.field.name}.{self.member.name}" if self.member else self.field.name


def option_name(json_name: str) -> str:
    """``userId`` -> ``--user``, ``subscriberIds`` -> ``--subscriber``, ``createdAt`` -> ``--created-at``."""
    stem = re.sub(r"(?<=[a-z])Ids?$", "", json_name)
    return "--" + re.sub(r"(?<!^)(?=[A-Z])", "-", stem).lower()


def _form(f: Field) -> str:
    schema_type = f.kind.schema.get("type")
    if schema_type == "boolean":
        return "flag"
    if schema_type == "string" or schema_type == ["string", "null"]:
        return "text"
    if schema_type == "array" and f.kind.schema.get("items", {}).get("type") == "string":
        return "repeat"
    if schema_type == "object":
        return "object"
    return "json"


def options_of(event: Event) -> list[Option]:
    """The options of an event's subcommand, in the order of its fields."""
    options: list[Option] = []
    for f in event.fields:
        if f.kind.members:
            for m in f.kind.members:
                flag = option_name(f.name) if m.name == "id" else option_name(m.name)
                options.append(Option(flag, f, m, _form(m), f.required and m.required))
        elif _form(f) == "object":
            options.append(Option("--set", f, None, "pairs", False))
            options.append(Option(option_name(f.name), f, None, "object", False))
        else:
            options.append(
                Option(option_name(f.name), f, None, _form(f), f.required and f.cli_default is None)
            )
    params = [o.param for o in options]
    clash = {p for p in params if params.count(p) > 1} | (set(params) & set(COMMON))
    if clash:
        raise ValueError(f"{event.name}: two fields would be the same option ({', '.join(sorted(clash))})")
    return options


def _help(o: Option) -> str:
    doc = o.target.doc
    if o.form == "pairs":
        doc = f"a field of {o.field.name}, FIELD=VALUE (repeat); VALUE is JSON, else a string"
    elif o.form == "object":
        doc = f"{o.field.doc}, as a JSON object"
    elif o.form == "repeat":
        doc += " (repeat)"
    elif o.form == "json":
        doc += " (JSON)"
    return f"{doc[:1].upper()}{doc[1:]} [{o.json_name}]."


def _parameter(o: Option) -> inspect.Parameter:
    decls = [o.flag, *([SHORT[o.flag]] if o.flag in SHORT else [])]
    typed: Any = {"flag": bool, "repeat": list[str], "pairs": list[str]}.get(o.form, str)
    default: Any = inspect.Parameter.empty
    if o.form == "flag" and o.required:  # say which: --pinned or --no-pinned
        decls[0] = f"{o.flag}/--no-{o.flag[2:]}"
    elif o.form == "flag":  # given: true; else left to the field's default
        default = False
    elif not o.required:
        default = o.field.cli_default if o.member is None else None
        typed = typed if default is not None else typed | None
    option = typer.Option(*decls, help=escape(_help(o)), show_default=default not in (None, False))
    return inspect.Parameter(
        o.param, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[typed, option]
    )


def _pairs(items: list[str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{item!r} is not FIELD=VALUE", param_hint="--set")
        try:
            data[name] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data[name] = raw
    return data


def body_of(event: Event, options: list[Option], values: dict[str, Any]) -> dict[str, Any]:
    """The JSON body the options given make (absent options left out)."""
    body: dict[str, Any] = {}
    for o in options:
        raw = values.get(o.param)
        if o.form == "json":
            value = parse_json(o.flag, raw)
        elif o.form == "object":
            value = parse_json(o.flag, raw)
            if value is not None and not isinstance(value, dict):
                raise typer.BadParameter("must be a JSON object", param_hint=o.flag)
        elif o.form == "pairs":
            value = _pairs(raw) if raw else None
        elif o.form == "flag":
            value = raw if o.required else (True if raw else None)
        elif o.form == "repeat":
            value = raw or None
        else:
            value = raw
        if value is None:
            continue
        if o.member is not None:
            body.setdefault(o.field.name, {})[o.member.name] = value
        elif o.form in ("pairs", "object"):
            body[o.field.name] = {**value, **body.get(o.field.name, {})}
        else:
            body[o.field.name] = value
    for f in event.fields:
        if f.required and f.name not in body and _form(f) == "object":
            flags = [o.flag for o in options if o.field is f]
            raise typer.BadParameter(f"give {' or '.join(flags)}", param_hint=flags[0])
    return body


def example_args(event: Event) -> list[str]:
    """The options that send the entry's example body."""
    args: list[str] = []
    for o in options_of(event):
        given = event.example.get(o.field.name)
        if o.member is not None:
            given = {"id": given} if isinstance(given, str) else (given or {})
            given = given.get(o.member.name)
        if given is None or o.form == "object":  # an open object is shown as --set pairs
            continue
        if o.form == "flag":
            args += [o.flag] if given else ([f"--no-{o.flag[2:]}"] if o.required else [])
        elif o.form == "repeat":
            args += [a for item in given for a in (o.flag, item)]
        elif o.form == "pairs":
            for name, value in given.items():
                # A string that would read back as JSON (true, 5) is written as JSON: "true".
                plain = isinstance(value, str) and _pairs([f"{name}={value}"])[name] == value
                args += [o.flag, f"{name}={value if plain else orjson.dumps(value).decode()}"]
        elif o.form == "json":
            args += [o.flag, orjson.dumps(given).decode()]
        else:
            args += [o.flag, given]
    return args


def _command(event: Event) -> Callable[..., None]:
    options = options_of(event)

    def command(**values: Any) -> None:
        url, api_key, broker = (values.pop(name) for name in COMMON)
        send(event.name, body_of(event, options, values), url, api_key, broker)

    common = [
        inspect.Parameter("url", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Url),
        inspect.Parameter("api_key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ApiKey),
        inspect.Parameter("broker", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=ViaBroker),
    ]
    command.__signature__ = inspect.Signature([*map(_parameter, options), *common])  # type: ignore[attr-defined]
    command.__name__ = event.name.replace("-", "_")
    command.__doc__ = f"{event.event}: {event.summary}; to {event.delivered_to}."
    return command


for _event in EVENTS:
    app.command(
        _event.name,
        epilog=escape(f"Example: fonana-ws send {_event.name} {shlex.join(example_args(_event))}"),
    )(_command(_event))


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
