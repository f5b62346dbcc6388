"""``fonana-ws send``: the CLI as a subprocess against a running server, over HTTP and over the broker."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from fonana_ws.db import demo
from fonana_ws.db import notifications as sql
from fonana_ws.fonana.events import BY_NAME
from fonana_ws_cli import send as send_cli

from .conftest import (
    API_KEY,
    REDIS_URL,
    SECRET,
    Server,
    free_port,
    make_settings,
    need_service,
    redis_reachable,
    running,
)
from .test_events import silent, subscribe_notifications, watcher


def cli_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WS_", "JWT_", "NEXTAUTH_", "DATABASE_", "BROADCAST_", "REDIS_", "FONANA_WS_"))
    }
    return {**env, "WS_API_KEY": API_KEY, **extra}


async def fonana_send(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m fonana_ws send ARGS`` without blocking the loop the test server runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fonana_ws",
        "send",
        *args,
        cwd=cwd,
        env=env if env is not None else cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def sent(*args: str, cwd: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON answer of a successful ``send``."""
    code, out, err = await fonana_send(*args, cwd=cwd, env=env)
    assert code == 0, (args, out, err)
    assert "sent" in err
    return orjson.loads(out)


def url(server: Server) -> list[str]:
    return ["--url", f"http://127.0.0.1:{server.port}"]


@pytest.mark.unit
def test_one_subcommand_per_event_plus_raw() -> None:
    names = {c.name for c in send_cli.app.registered_commands}
    assert names == set(BY_NAME) | {"raw"}


async def test_notification_with_persist(server: Server, tmp_path: Path) -> None:
    user, other = await server.user(), await server.user()
    tab, other_tab = await server.connect(user), await server.connect(other)
    answer = await sent(
        "notification",
        "--user",
        user,
        "--title",
        "Hello",
        "--message",
        "From the CLI",
        "--type",
        "LIKE_POST",
        "--metadata",
        '{"postId": "p1"}',
        "--persist",
        *url(server),
        cwd=tmp_path,
    )
    event = answer["event"]
    notification = event["notification"]
    assert event == {"type": "notification", "userId": user, "notification": notification}
    assert notification["type"] == "LIKE_POST" and notification["title"] == "Hello"
    assert notification["message"] == "From the CLI" and notification["metadata"] == {"postId": "p1"}
    assert answer["users"] == [user]
    assert await tab.recv() == event
    await silent(tab, other_tab)
    assert await sql.get_notification(server.db, notification["id"]) == notification
    _later, unread = await subscribe_notifications(server, user)
    assert unread == {"notifications": [notification], "count": 1}


async def test_post_liked_and_new_subscription(server: Server, tmp_path: Path) -> None:
    creator, liker = await server.user("c", creator=True), await server.user()
    post_id = await server.post(creator)
    await server.db.execute('UPDATE posts SET "likesCount" = 12 WHERE id = :id', {"id": post_id})
    post_tab = await watcher(server, await server.user(), {"type": "post", "postId": post_id})
    creator_tab = await server.connect(creator)
    snooper = await watcher(server, await server.user(), {"type": "creator", "id": creator})

    liked = await sent("post-liked", "--post", post_id, "--user", liker, *url(server), cwd=tmp_path)
    expected = {"type": "post_liked", "postId": post_id, "userId": liker, "likesCount": 12}
    assert liked["event"] == expected and liked["channels"] == [f"post_{post_id}"]
    assert await post_tab.recv() == expected

    subscribed = await sent(
        "new-subscription", "--creator", creator, "--user", liker, *url(server), cwd=tmp_path
    )
    expected = {"type": "new_subscription", "creatorId": creator, "userId": liker}
    assert subscribed["event"] == expected and subscribed["users"] == [creator]
    assert await creator_tab.recv() == expected
    await silent(post_tab, creator_tab, snooper)


async def test_raw_to_a_channel_and_to_a_user(server: Server, tmp_path: Path) -> None:
    creator, user = await server.user("c", creator=True), await server.user()
    post_id = await server.post(creator)
    post_tab = await watcher(server, user, {"type": "post", "postId": post_id})
    user_tab = await server.connect(user)

    by_channel = await sent(
        "raw", "--channel", f"post_{post_id}", "--event", '{"type":"x"}', *url(server), cwd=tmp_path
    )
    assert by_channel["channels"] == [f"post_{post_id}"]
    assert await post_tab.recv() == {"type": "x"}
    event = {"type": "earnings_updated", "amount": 3}
    by_user = await sent(
        "raw", "--user", user, "--event", orjson.dumps(event).decode(), *url(server), cwd=tmp_path
    )
    assert by_user["users"] == [user]
    assert await post_tab.recv() == event
    assert await user_tab.recv() == event
    await silent(post_tab, user_tab)


async def test_every_other_subcommand_delivers(server: Server, tmp_path: Path) -> None:
    creator, user, fan = await server.user("c", creator=True), await server.user(), await server.user()
    post_id = await server.post(creator)
    await demo.insert_subscription(server.db, uuid.uuid4().hex, fan, creator)
    stored = await sql.insert_notification(server.db, user, "LIKE_POST", "t", "m")
    conversation = await server.conversation(fan, user)
    user_tab = await server.connect(user)
    creator_tab = await server.connect(creator)
    post_tab = await watcher(server, await server.user(), {"type": "post", "postId": post_id})
    following = await watcher(server, await server.user(), {"type": "creator", "id": creator})
    fan_feed = await watcher(server, fan, {"type": "feed", "userId": fan})
    runs = [
        (["notification-read", "--user", user, "--notification", stored["id"]], [user_tab]),
        (["notifications-cleared", "--user", user], [user_tab]),
        (["post-unliked", "--post", post_id, "--user", user], [post_tab]),
        (["post-created", "--post", post_id, "--thumbnail", "/t.jpg"], [following, fan_feed]),
        (
            ["comment-added", "--post", post_id, "--comment", "k", "--user", user, "--content", "hi"],
            [post_tab],
        ),
        (["comment-deleted", "--post", post_id, "--comment", "k"], [post_tab]),
        (
            ["creator-updated", "--creator", creator, "--set", "nickname=neo", "--set", "isVerified=true"],
            [following],
        ),
        (["feed-update", "--user", user, "--posts", f'[{{"id": "{post_id}"}}]'], [user_tab]),
        (["post-deleted", "--post", post_id], [post_tab]),
        (
            [
                "new-message",
                *("--conversation", conversation, "--message", "m1", "--sender", fan),
                *("--content", "secret", "--media-url", "/m.jpg", "--is-paid", "--price", "2.5"),
            ],
            [user_tab],
        ),
        (
            [
                "message-read",
                "--conversation",
                conversation,
                "--user",
                user,
                "--message",
                "m1",
                "--message",
                "m2",
            ],
            [fan_feed],
        ),
        (
            ["tip-received", "--creator", creator, "--tip", "t1", "--from-user", fan, "--amount", "5"],
            [creator_tab],
        ),
    ]
    covered = {args[0] for args, _ in runs} | {"notification", "post-liked", "new-subscription"}
    assert covered == set(BY_NAME)
    answers = await asyncio.gather(*(sent(*args, *url(server), cwd=tmp_path) for args, _ in runs))
    received: dict[int, list[dict[str, Any]]] = {}
    for (args, receivers), answer in zip(runs, answers, strict=True):
        assert answer["event"]["type"] == BY_NAME[args[0]].event
        for client in receivers:
            received.setdefault(id(client), []).append(answer["event"])
    for client in (user_tab, creator_tab, post_tab, following, fan_feed):
        expected = received[id(client)]
        frames = [await client.recv() for _ in expected]
        assert sorted(map(orjson.dumps, frames)) == sorted(map(orjson.dumps, expected))
    await silent(user_tab, creator_tab, post_tab, following, fan_feed)
    by_type = {a["event"]["type"]: a["event"] for a in answers}
    paid = by_type["new_message"]["message"]
    assert paid["isPaid"] is True and paid["price"] == 2.5 and paid["content"] is paid["mediaUrl"] is None
    assert by_type["message_read"]["messageIds"] == ["m1", "m2"]
    assert by_type["tip_received"]["tip"]["amount"] == 5
    assert by_type["creator_updated"]["data"] == {"nickname": "neo", "isVerified": True}
    assert by_type["post_created"]["post"]["thumbnail"] == "/t.jpg"
    assert by_type["comment_added"]["comment"]["content"] == "hi"
    assert (await sql.get_notification(server.db, stored["id"]))["isRead"] is True


async def test_failures_exit_non_zero_with_the_reason(server: Server, tmp_path: Path) -> None:
    user = await server.user()
    base = ["--title", "t", "--message", "m", *url(server)]
    down = ["--url", f"http://127.0.0.1:{free_port()}"]
    cases = [
        (
            ["notification", "--user", user, "--title", "t", "--message", "m", *down],
            cli_env(),
            1,
            "cannot reach the server",
        ),
        (["notification", "--user", user, *base], cli_env(WS_API_KEY="wrong-" + API_KEY), 1, "API key (401)"),
        (
            ["notification", "--user", user, "--type", "BOGUS", *base],
            cli_env(),
            1,
            "(400): type must be one of",
        ),
        (
            ["post-liked", "--post", "ghost", "--user", user, *url(server)],
            cli_env(),
            1,
            "(404): postId: no post ghost",
        ),
        (
            ["raw", "--channel", "bogus", "--event", '{"type":"x"}', *url(server)],
            cli_env(),
            1,
            "(400): channel",
        ),
        (["raw", "--user", user, "--event", "{", *url(server)], cli_env(), 2, "not valid JSON"),
        (["raw", "--event", '{"type":"x"}', *url(server)], cli_env(), 2, "--channel"),
        (["notification", "--user", user, "--title", "t"], cli_env(), 2, "--message"),
    ]
    results = await asyncio.gather(
        *(fonana_send(*args, cwd=tmp_path, env=env) for args, env, _c, _r in cases)
    )
    for (args, _env, code, reason), (got, out, err) in zip(cases, results, strict=True):
        assert got == code, (args, out, err)
        assert reason in err, (args, err)
        assert out == ""


async def test_the_embedded_dev_key_is_used_by_default(tmp_path: Path) -> None:
    """No WS_API_KEY anywhere: server and CLI share the generated key in the data directory."""
    settings = make_settings(tmp_path, None, WS_API_KEY="")
    assert settings.api_key and (tmp_path / "dev-api-key").read_text().strip() == settings.api_key
    async with running(settings) as srv:
        user = await srv.user()
        tab = await srv.connect(user)
        env = cli_env(FONANA_WS_DATA_DIR=str(tmp_path), WS_PORT=str(srv.port), JWT_SECRET=SECRET)
        del env["WS_API_KEY"]
        answer = await sent("raw", "--user", user, "--event", '{"type":"hello"}', cwd=tmp_path, env=env)
        assert answer["users"] == [user]
        assert await tab.recv() == {"type": "hello"}


async def test_broker_mode_publishes_the_envelope_itself(tmp_path: Path) -> None:
    if (why := await redis_reachable()) is not None:
        need_service("Redis", why)
    settings = make_settings(tmp_path, None, BROADCAST_URL=REDIS_URL)
    async with running(settings) as srv:
        creator, fan = await srv.user("c", creator=True), await srv.user()
        post_id = await srv.post(creator)
        await srv.db.execute('UPDATE posts SET "likesCount" = 5 WHERE id = :id', {"id": post_id})
        await demo.insert_subscription(srv.db, uuid.uuid4().hex, fan, creator)
        post_tab = await watcher(srv, fan, {"type": "post", "postId": post_id})
        fan_feed = await watcher(srv, fan, {"type": "feed", "userId": fan})
        creator_tab = await srv.connect(creator)
        # no server URL and no API key: the CLI opens the broker and the database itself
        env = cli_env(FONANA_WS_DATA_DIR=str(tmp_path), JWT_SECRET=SECRET, BROADCAST_URL=REDIS_URL)
        del env["WS_API_KEY"]

        liked = await sent("post-liked", "--post", post_id, "--user", fan, "--broker", cwd=tmp_path, env=env)
        assert liked["event"] == {"type": "post_liked", "postId": post_id, "userId": fan, "likesCount": 5}
        assert await post_tab.recv() == liked["event"]

        created = await sent("post-created", "--post", post_id, "--broker", cwd=tmp_path, env=env)
        assert created["channels"] == [f"creator_{creator}", f"feed_{fan}"]
        assert await fan_feed.recv() == created["event"]

        note = await sent(
            "notification",
            "--user",
            creator,
            "--title",
            "t",
            "--message",
            "m",
            "--persist",
            "--broker",
            cwd=tmp_path,
            env=env,
        )
        assert await creator_tab.recv() == note["event"]
        assert (
            await sql.get_notification(srv.db, note["event"]["notification"]["id"])
            == note["event"]["notification"]
        )

        raw = await sent(
            "raw",
            "--user",
            creator,
            "--event",
            '{"type":"post_purchased"}',
            "--broker",
            cwd=tmp_path,
            env=env,
        )
        assert raw["users"] == [creator]
        assert await creator_tab.recv() == {"type": "post_purchased"}

        code, _out, err = await fonana_send(
            "post-liked", "--post", "ghost", "--user", fan, "--broker", cwd=tmp_path, env=env
        )
        assert code == 1 and "postId: no post ghost" in err
        await silent(post_tab, fan_feed, creator_tab)

    memory_env = cli_env(FONANA_WS_DATA_DIR=str(tmp_path), JWT_SECRET=SECRET)
    code, _out, err = await fonana_send(
        "post-deleted", "--post", "p", "--broker", cwd=tmp_path, env=memory_env
    )
    assert code == 2 and "memory://" in err


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_each_subcommand_has_help(name: str) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(send_cli.app, [name, "--help"])
    assert result.exit_code == 0 and "--broker" in result.output and "--url" in result.output
