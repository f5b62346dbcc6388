"""The one table of events (``fonana.events.EVENTS``) drives everything else: every entry has its HTTP
route, OpenAPI path, façade method and ``fonana-ws send`` subcommand, its example is a body all of them
accept, and the API guide and docs/protocol.md list exactly the table's events and fields."""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import typer.main
from starlette.routing import Route
from typer.testing import CliRunner

from fonana_ws.fonana.events import BY_NAME, EVENTS, OTHER_EVENT_TYPES, Emission, Event, Events
from fonana_ws.web import events_api, presence_api
from fonana_ws_cli import send as send_cli

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "API_INTEGRATION_GUIDE.md").read_text()
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
NAMES = [e.name for e in EVENTS]


# -- the documents list the table ---------------------------------------------------------------------------


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n") + len(heading)
    after = re.search(rf"^#{{1,{len(level)}}} ", text[start:], re.M)
    return text[start : start + after.start()] if after else text[start:]


def first_table(text: str) -> list[list[str]]:
    """The cells of the first Markdown table in ``text``, header and rule left out."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]*)`", text)


def body_fields(cell: str) -> dict[str, bool]:
    """``"`userId`, `metadata?`, `comment: {id, ...}`"`` -> ``{"userId": True, "metadata": False, ...}``:
    each top-level field and whether it is required; what is in (), [] or {} describes a member."""
    while (stripped := re.sub(r"\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}", "", cell)) != cell:
        cell = stripped
    fields = {}
    for span in ticked(cell):
        match = re.match(r"(\w+)(\?)?", span)
        assert match, span
        fields[match.group(1)] = match.group(2) is None
    return fields


def table_fields(event: Event) -> dict[str, bool]:
    return {f.name: f.required for f in event.fields}


def test_the_guide_lists_every_event_with_its_body_and_type() -> None:
    rows = first_table(section(GUIDE, "## The events, one by one"))
    listed: list[str] = []
    for names_cell, body, receive, _to in rows:
        names = ticked(names_cell)
        listed += names
        for name in names:
            assert name in BY_NAME, f"{name}: listed, but not in the table"
            assert body_fields(body) == table_fields(BY_NAME[name]), name
        sent = re.search(r'"type":([^,]+)', receive)
        assert sent, receive
        assert set(re.findall(r'"(\w+)"', sent.group(1))) == {BY_NAME[n].event for n in names}
    assert sorted(listed) == sorted(NAMES)


def test_the_protocol_lists_every_event_type_and_route() -> None:
    types = [t for row in first_table(section(PROTOCOL, "## 3. Domain events")) for t in ticked(row[0])]
    assert sorted(types) == sorted(e.event for e in EVENTS)
    routes: list[str] = []
    for names_cell, body in first_table(section(PROTOCOL, "## 5. How events enter the server")):
        names = ticked(names_cell)
        routes += names
        for name in names:
            assert name in BY_NAME, f"{name}: listed, but not in the table"
            assert body_fields(body) == table_fields(BY_NAME[name]), name
    assert sorted(routes) == sorted(NAMES)


def test_the_other_event_types_are_the_same_everywhere() -> None:
    guide = re.search(r"Anything else the browser client listens for \(([^)]*)\)", GUIDE)
    protocol = re.search(r"The browser client also listens for (.*?);", PROTOCOL, re.S)
    assert guide and protocol
    assert ticked(guide.group(1)) == list(OTHER_EVENT_TYPES)
    assert ticked(protocol.group(1)) == list(OTHER_EVENT_TYPES)
    description = events_api.openapi_document()["paths"]["/api/publish"]["post"]["description"]
    assert all(t in description for t in OTHER_EVENT_TYPES)
    assert not set(OTHER_EVENT_TYPES) & {e.event for e in EVENTS}


def test_the_guides_helper_calls_every_route() -> None:
    helper = GUIDE[GUIDE.index("```ts\n// lib/realtime.ts") :]
    helper = helper[: helper.index("```\n")]
    called = {
        name for call in re.findall(r"\bevent\(([^,]+),", helper) for name in re.findall(r"'([^']+)'", call)
    }
    assert called == set(NAMES)


def test_the_guide_names_every_answer_a_typed_route_gives() -> None:
    bullet = re.search(r"^- Answers: (.*?)(?=^\S|^- )", GUIDE, re.M | re.S)
    assert bullet
    named = {int(code) for code in re.findall(r"`(\d{3})\b", bullet.group(1))}
    documented = {
        int(c)
        for ops in events_api.openapi_document()["paths"].values()
        if "post" in ops  # the publish API's answers (the presence read is a GET of its own)
        for c in ops["post"]["responses"]
    }
    assert named == documented


# -- every entry has a route, an OpenAPI path, a method and a subcommand ------------------------------------


def test_the_table_is_well_formed() -> None:
    assert len(set(NAMES)) == len(NAMES) == len({e.method for e in EVENTS})
    for e in EVENTS:
        assert e.name == e.event.replace("_", "-")
        names = [f.name for f in e.fields]
        assert len(set(names)) == len(names) and len({f.keyword for f in e.fields}) == len(names), e.name


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.name)
def test_the_example_is_a_body_the_table_and_the_document_accept(event: Event) -> None:
    checked = event.validate(event.example)
    assert set(checked) == {f.keyword for f in event.fields}
    operation = events_api.openapi_document()["paths"][events_api.path(event)]["post"]
    content = operation["requestBody"]["content"]["application/json"]
    assert content["example"] == event.example
    validator = jsonschema_rs.Draft202012Validator(content["schema"], validate_formats=True)
    assert validator.is_valid(event.example)
    # and the document refuses what the table refuses: a field it does not know, a required one missing
    assert not validator.is_valid({**event.example, "noSuchField": 1})
    for f in event.fields:
        if f.required:
            assert not validator.is_valid({k: v for k, v in event.example.items() if k != f.name}), f.name


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.name)
def test_the_delivery_rule_takes_exactly_the_fields(event: Event) -> None:
    parameters = inspect.signature(event.rule).parameters
    free = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty]
    assert free == ["store", *(f.keyword for f in event.fields)]


def test_every_entry_has_a_route_and_an_openapi_path() -> None:
    routes = {r.path: r for r in events_api.routes if isinstance(r, Route)}
    document = events_api.openapi_document()["paths"]
    for e in EVENTS:
        route = routes[events_api.path(e)]
        assert route.methods and "POST" in route.methods
        operation = document[events_api.path(e)]["post"]
        assert operation["operationId"] == route.endpoint.__name__ == "event_" + e.name.replace("-", "_")
        assert operation["summary"] == e.summary and e.delivered_to in operation["description"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert list(schema["properties"]) == [f.name for f in e.fields]
        assert [schema["properties"][f.name]["description"] for f in e.fields] == [f.doc for f in e.fields]
    assert set(document) == {events_api.path(e) for e in EVENTS} | {
        "/api/publish",
        presence_api.PATH,
        "/api/publish/batch",
        "/api/users/{id}/disconnect",
        "/api/access/revoke",
    }


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.name)
def test_every_entry_has_a_facade_method_with_its_fields(event: Event) -> None:
    method = getattr(Events, event.method)
    signature = inspect.signature(method)
    parameters = list(signature.parameters.values())[1:]
    assert [p.name for p in parameters] == [f.keyword for f in event.fields]
    for p, f in zip(parameters, event.fields, strict=True):
        assert (p.default is inspect.Parameter.empty) == f.required, f.name
        assert (p.kind is inspect.Parameter.KEYWORD_ONLY) == f.keyword_only, f.name
    assert method.__name__ == event.method and event.summary in (method.__doc__ or "")
    assert all(f"JSON ``{f.name}``" in (method.__doc__ or "") for f in event.fields)


class Recorder(Events):
    """Records what the generated methods hand to ``emit`` (no store, no broker)."""

    def __init__(self) -> None:
        super().__init__(publisher=None, store=None)  # type: ignore[arg-type]
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def emit(self, name: str, /, **fields: Any) -> Emission:
        self.calls.append((name, fields))
        return Emission({"type": name})


async def test_the_methods_hand_the_body_by_json_name_to_emit() -> None:
    ev = Recorder()
    await ev.send_notification("u", "LIKE_POST", "t", "m", {"a": 1}, notification_id="n", created_at="c")
    await ev.notify_new_post({"id": "p"}, subscriber_ids=["s"])
    await ev.update_post_likes("p", "u", False)
    await ev.clear_notifications(user_id="u")
    await ev.notify_message_read("c", "u", ["m"])
    await ev.notify_tip_received("cr", {"id": "t", "fromUserId": "u", "amount": 5})
    assert ev.calls == [
        (
            "notification",
            {
                "userId": "u",
                "type": "LIKE_POST",
                "title": "t",
                "message": "m",
                "metadata": {"a": 1},
                "id": "n",  # persist not given: left to the table's default
                "createdAt": "c",
            },
        ),
        ("post-created", {"post": {"id": "p"}, "subscriberIds": ["s"]}),
        ("post-unliked", {"postId": "p", "userId": "u"}),
        ("notifications-cleared", {"userId": "u"}),
        ("message-read", {"conversationId": "c", "userId": "u", "messageIds": ["m"]}),
        ("tip-received", {"creatorId": "cr", "tip": {"id": "t", "fromUserId": "u", "amount": 5}}),
    ]
    with pytest.raises(TypeError):
        await ev.send_notification("u", "LIKE_POST", "t", "m", None, False, "n")  # id is keyword-only
    with pytest.raises(TypeError):
        await ev.mark_notification_read("u")


# -- the CLI ------------------------------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """What the subcommands would send, instead of sending it."""
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(send_cli, "send", lambda name, body, url, api_key, broker: calls.append((name, body)))
    return calls


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.name)
def test_the_subcommand_has_an_option_per_field_and_sends_the_example(
    event: Event, captured: list[tuple[str, dict[str, Any]]]
) -> None:
    command = typer.main.get_command(send_cli.app).commands[event.name]  # type: ignore[attr-defined]
    options = {opt: p for p in command.params for opt in p.opts}
    for o in send_cli.options_of(event):
        assert o.flag in options, o.flag
        assert options[o.flag].required == o.required, o.flag
    covered = {o.field.name for o in send_cli.options_of(event)}
    assert covered == {f.name for f in event.fields}
    args = send_cli.example_args(event)
    assert f"fonana-ws send {event.name} {shlex.join(args)}" in " ".join((command.epilog or "").split())
    result = CliRunner().invoke(send_cli.app, [event.name, *args])
    assert result.exit_code == 0, result.output
    [(name, body)] = captured
    assert name == event.name
    assert event.validate(body) == event.validate(event.example)


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.name)
def test_a_required_option_left_out_is_a_usage_error(
    event: Event, captured: list[tuple[str, dict[str, Any]]]
) -> None:
    args = send_cli.example_args(event)
    for o in send_cli.options_of(event):
        if not o.required:
            continue
        flag = o.flag if o.flag in args else f"--no-{o.flag[2:]}"  # a required flag, given false
        at, width = args.index(flag), 1 if o.form == "flag" else 2
        result = CliRunner().invoke(send_cli.app, [event.name, *args[:at], *args[at + width :]])
        assert result.exit_code == 2 and o.flag in result.output, (o.flag, result.output)
    assert captured == []


def test_option_names_follow_the_field_names() -> None:
    names = {"userId": "--user", "subscriberIds": "--subscriber", "createdAt": "--created-at", "id": "--id"}
    assert {k: send_cli.option_name(k) for k in names} == names
    comment = {o.json_name: o.flag for o in send_cli.options_of(BY_NAME["comment-added"])}
    assert comment == {
        "postId": "--post",
        "comment.id": "--comment",
        "comment.userId": "--user",
        "comment.content": "--content",
        "comment.createdAt": "--created-at",
    }
    changes = send_cli.options_of(BY_NAME["creator-updated"])
    assert [(o.flag, o.form) for o in changes] == [
        ("--creator", "text"),
        ("--set", "pairs"),
        ("--changes", "object"),
    ]


def test_open_objects_take_pairs_and_json(captured: list[tuple[str, dict[str, Any]]]) -> None:
    runner = CliRunner()
    args = [
        "creator-updated",
        "--creator",
        "c",
        "--changes",
        '{"a": 1, "b": 2}',
        "--set",
        "b=true",
        "--set",
        "c=x",
    ]
    assert runner.invoke(send_cli.app, args).exit_code == 0
    assert captured[-1][1]["changes"] == {"a": 1, "b": True, "c": "x"}
    result = runner.invoke(send_cli.app, ["creator-updated", "--creator", "c"])
    assert result.exit_code == 2 and "--set or --changes" in result.output
    result = runner.invoke(send_cli.app, ["creator-updated", "--creator", "c", "--set", "novalue"])
    assert result.exit_code == 2 and "FIELD=VALUE" in result.output


def test_the_documented_commands_run(captured: list[tuple[str, dict[str, Any]]]) -> None:
    """Every ``fonana-ws send <event> ...`` line of the guide and the README parses, and sends a body
    the event accepts."""
    readme = (ROOT / "README.md").read_text()
    lines = re.findall(r"fonana-ws send ([a-z-]+(?: [^`\n#]*)?)", GUIDE + "\n" + " ".join(readme.split()))
    commands = [shlex.split(line) for line in lines]
    typed = [c for c in commands if c[0] in BY_NAME and "--help" not in c]
    assert {c[0] for c in typed} >= {"notification", "post-liked", "new-subscription"}
    for command in typed:
        result = CliRunner().invoke(send_cli.app, command)
        assert result.exit_code == 0, (command, result.output)
        name, body = captured[-1]
        BY_NAME[name].validate(body)
