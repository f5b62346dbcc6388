"""Typing indicators (protocol §7.2) on real servers: real clients, SQLite and PostgreSQL, and two
processes on Redis. The server's own ``isTyping: false`` comes after 6 s of silence, so the tests that
wait for it run their cases side by side in one window."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets

from fonana_ws.auth import create_token
from fonana_ws.db import demo
from fonana_ws.fonana.typing import EXPIRY

from .conftest import (
    API_KEY,
    SECRET,
    Client,
    Server,
    ServerProcess,
    process_pair,
)

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
#: Past the server's own false: 6 s after the last true, and some room for a loaded machine.
WINDOW = EXPIRY + 1.5


def typing(conversation: str, is_typing: bool = True) -> dict[str, Any]:
    return {"type": "typing", "conversationId": conversation, "isTyping": is_typing}


def shown(conversation: str, user: str, is_typing: bool) -> dict[str, Any]:
    """What the other participant receives."""
    return {"type": "typing", "conversationId": conversation, "userId": user, "isTyping": is_typing}


def conversation_channel(conversation: str) -> dict[str, str]:
    return {"type": "conversation", "id": conversation}


async def joined(client: Client, conversation: str) -> Client:
    reply = await client.subscribe(conversation_channel(conversation))
    assert reply["type"] == "subscribed", reply
    return client


async def collect(client: Client, until: float) -> list[tuple[float, dict[str, Any]]]:
    """Every frame ``client`` receives until the monotonic time ``until``, with when it came."""
    frames = []
    while (left := until - time.monotonic()) > 0:
        try:
            frame = await client.recv(timeout=left)
        except TimeoutError:
            break
        frames.append((time.monotonic(), frame))
    return frames


def canon(frames: list[dict[str, Any]]) -> list[bytes]:
    """Frames as a sorted list: what arrived, whatever the order of independent events."""
    return sorted(orjson.dumps(f, option=orjson.OPT_SORT_KEYS) for f in frames)


def only(frames: list[tuple[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [f for _, f in frames]


async def new_message(http: httpx.AsyncClient, conversation: str, sender: str) -> dict[str, Any]:
    """The web app's call after it stored a message: the typed route of protocol §7.1."""
    body = {
        "conversationId": conversation,
        "message": {"id": f"m-{uuid.uuid4().hex[:8]}", "senderId": sender},
    }
    response = await http.post("/api/events/new-message", json=body, headers=HEADERS)
    assert response.status_code == 202, response.text
    return response.json()["event"]


async def stats(server: Server) -> dict[str, Any]:
    response = await server.http.get("/stats")
    assert response.status_code == 200
    return response.json()["typing"]


# -- one process, SQLite and PostgreSQL ---------------------------------------------------------------------


async def test_typing_reaches_the_other_participants_connections_never_the_senders(server: Server) -> None:
    alice, bob, carol = await server.user("alice"), await server.user("bob"), await server.user("carol")
    conversation = await server.conversation(alice, bob)
    typer = await server.connect(alice)
    alice_other_tab = await joined(await server.connect(alice), conversation)
    bob_in_chat = await joined(await server.connect(bob), conversation)
    bob_elsewhere = await server.connect(bob)
    bystander = await server.connect(carol)

    await typer.send(typing(conversation))
    for client in (bob_in_chat, bob_elsewhere):
        assert await client.recv() == shown(conversation, alice, True)
    await typer.send(typing(conversation, False))
    for client in (bob_in_chat, bob_elsewhere):
        assert await client.recv() == shown(conversation, alice, False)
    await asyncio.gather(
        *(c.nothing(0.5) for c in (typer, alice_other_tab, bob_in_chat, bob_elsewhere, bystander))
    )


async def test_ten_frames_in_one_second_relay_one_true(server: Server) -> None:
    alice, bob = await server.user("alice"), await server.user("bob")
    conversation = await server.conversation(bob, alice)  # either participant may type
    typer, receiver = await server.connect(alice), await server.connect(bob)
    before = await stats(server)
    for _ in range(10):
        await typer.send(typing(conversation))
        await asyncio.sleep(0.1)
    assert await receiver.recv() == shown(conversation, alice, True)
    await receiver.nothing(0.5)
    after = await stats(server)
    assert after["relayed"]["frame"] - before["relayed"]["frame"] == 1
    assert after["swallowed"] - before["swallowed"] == 9
    assert after["active"] >= 1
    metrics = (await server.http.get("/metrics")).text
    assert 'fonana_ws_typing_relayed_total{reason="frame"}' in metrics
    assert "fonana_ws_typing_swallowed_total" in metrics and "fonana_ws_typing_active" in metrics
    await typer.send(typing(conversation, False))
    assert await receiver.recv() == shown(conversation, alice, False)


async def test_silence_a_disconnect_or_a_new_message_each_end_in_exactly_one_false(server: Server) -> None:
    cases = {}
    for case in ("silence", "disconnect", "new_message"):
        typer_id, receiver_id = await server.user(f"{case}-a"), await server.user(f"{case}-b")
        conversation = await server.conversation(typer_id, receiver_id)
        cases[case] = (
            typer_id,
            conversation,
            await server.connect(typer_id),
            await server.connect(receiver_id),
        )
    started = time.monotonic()
    for typer_id, conversation, typer, receiver in cases.values():
        await typer.send(typing(conversation))
        assert await receiver.recv() == shown(conversation, typer_id, True)
    typer_id, conversation, typer, _ = cases["disconnect"]
    await typer.close()
    typer_id, conversation, typer, _ = cases["new_message"]
    message = await new_message(server.http, conversation, typer_id)  # the typer is not on the channel
    received = await asyncio.gather(*(collect(r, started + WINDOW) for *_, r in cases.values()))
    by_case = dict(zip(cases, received, strict=True))

    for case, frames in by_case.items():
        typer_id, conversation = cases[case][:2]
        falses = [at for at, f in frames if f == shown(conversation, typer_id, False)]
        assert len(falses) == 1, f"{case}: {only(frames)}"
        if case == "silence":
            assert EXPIRY - 0.2 <= falses[0] - started <= EXPIRY + 1.0, (
                f"false after {falses[0] - started:.2f} s"
            )
        else:
            assert falses[0] - started < 3.0, f"{case}: false after {falses[0] - started:.2f} s"
    assert canon(only(by_case["new_message"])) == canon(
        [message, shown(cases["new_message"][1], cases["new_message"][0], False)]
    )
    for case in ("silence", "disconnect"):
        assert len(by_case[case]) == 1, f"{case}: {only(by_case[case])}"


async def test_a_non_participant_is_refused_and_nobody_receives_anything(server: Server) -> None:
    alice, bob, carol = await server.user("alice"), await server.user("bob"), await server.user("carol")
    conversation = await server.conversation(alice, bob)
    intruder = await server.connect(carol)
    intruder_other_tab = await server.connect(carol)
    participants = [await joined(await server.connect(alice), conversation), await server.connect(bob)]
    for target in (conversation, "cv-no-such-conversation"):
        for is_typing in (True, True, False):  # remembered: refused again without a second lookup
            await intruder.send(typing(target, is_typing))
            assert await intruder.recv() == {
                "type": "error",
                "data": {"message": "Access denied to channel", "channel": conversation_channel(target)},
            }
    await asyncio.gather(*(c.nothing(0.5) for c in (intruder, intruder_other_tab, *participants)))
    await intruder.send({"type": "ping"})  # and the connection carries on
    assert await intruder.recv() == {"type": "pong"}
    # The relay works here: a participant's typing is bob's very next frame, so nothing of carol's was
    # queued before it (the silence above could not have been a relay that is broken altogether).
    await participants[0].send(typing(conversation))
    assert await participants[1].recv() == shown(conversation, alice, True)


async def test_a_malformed_typing_frame_is_an_invalid_format_error(server: Server) -> None:
    alice, bob = await server.user("alice"), await server.user("bob")
    conversation = await server.conversation(alice, bob)
    typer, receiver = await server.connect(alice), await server.connect(bob)
    for bad in (
        {"type": "typing", "conversationId": conversation},
        {**typing(conversation), "isTyping": "yes"},
    ):
        await typer.send(bad)
        assert await typer.recv() == {"type": "error", "data": {"message": "Invalid message format"}}
    await receiver.nothing(0.3)
    await typer.send(typing(conversation))  # the next relay is the receiver's next frame: none came before
    assert await receiver.recv() == shown(conversation, alice, True)


# -- two processes on Redis ---------------------------------------------------------------------------------


def redis_pair(tmp: Path) -> contextlib.AbstractAsyncContextManager[tuple[list[ServerProcess], Any]]:
    """Two processes on the shared Redis."""
    return process_pair(tmp, "redis")


async def connect(proc: ServerProcess, user: str) -> Client:
    ws = await websockets.connect(f"{proc.ws_url}?token={create_token(SECRET, user, 600)}", close_timeout=1)
    client = Client(ws)
    await client.recv_type("connected")
    return client


async def test_typing_across_two_processes_on_redis(tmp_path: Path) -> None:
    """Each process holds the typing state of its own typers and answers for it: one false per true,
    whichever process the message was published on; the sender's own tabs, on either process, get none."""
    async with redis_pair(tmp_path) as (procs, db):
        p0, p1 = procs
        alice, bob, xavier, yvonne = (f"{name}-{uuid.uuid4().hex[:6]}" for name in ("a", "b", "x", "y"))
        for user in (alice, bob, xavier, yvonne):
            await demo.insert_user(db, user)
        chat, other_chat = f"cv-{uuid.uuid4().hex[:8]}", f"cv-{uuid.uuid4().hex[:8]}"
        await demo.insert_conversation(db, chat, alice, bob)
        await demo.insert_conversation(db, other_chat, yvonne, xavier)

        # Nobody on p0 joins the conversation's channel: p0 hears of the message only by listening itself.
        alice_typing = await connect(p0, alice)
        bob_plain = await connect(p0, bob)
        yvonne_elsewhere = await connect(p0, yvonne)
        alice_tab = await joined(await connect(p1, alice), chat)
        bob_in_chat = await joined(await connect(p1, bob), chat)
        bob_typing = await connect(p1, bob)
        xavier_typing = await connect(p1, xavier)
        for client in (
            alice_typing,
            bob_plain,
            yvonne_elsewhere,
            alice_tab,
            bob_in_chat,
            bob_typing,
            xavier_typing,
        ):
            # Frames are read only once the connection's user topic is subscribed (the hub joins it
            # before the endpoint reads): a pong proves the subscription, where a sleep only hopes.
            await client.send({"type": "ping"})
            assert await client.recv() == {"type": "pong"}

        started = time.monotonic()
        await alice_typing.send(typing(chat))
        await bob_typing.send(typing(chat))
        await xavier_typing.send(typing(other_chat))
        assert await yvonne_elsewhere.recv() == shown(other_chat, xavier, True)
        await xavier_typing.close()  # on p1; yvonne is on p0
        bobs = {"bob_plain": bob_plain, "bob_in_chat": bob_in_chat, "bob_typing": bob_typing}
        for client in bobs.values():
            assert await client.recv() == shown(chat, alice, True)
        async with httpx.AsyncClient(base_url=p1.http_url) as http:  # not the process alice types on
            message = await new_message(http, chat, alice)
        watched = {"alice_typing": alice_typing, "alice_tab": alice_tab, **bobs, "yvonne": yvonne_elsewhere}
        windows = await asyncio.gather(*(collect(c, started + WINDOW) for c in watched.values()))
        got = dict(zip(watched, windows, strict=True))

        # bob sees alice's true (above), the message, and one false; never his own typing.
        for name in bobs:
            assert canon(only(got[name])) == canon([message, shown(chat, alice, False)]), name
        # alice sees bob's true, and his one false 6 s later (expired on p1); her tab the message too.
        assert canon(only(got["alice_typing"])) == canon([shown(chat, bob, True), shown(chat, bob, False)])
        assert canon(only(got["alice_tab"])) == canon(
            [shown(chat, bob, True), message, shown(chat, bob, False)]
        )
        expired_at = next(at for at, f in got["alice_typing"] if f == shown(chat, bob, False))
        assert expired_at - started >= EXPIRY - 0.2, f"bob's false after {expired_at - started:.2f} s"
        # xavier's disconnect on p1 ends his typing for yvonne on p0, once.
        assert only(got["yvonne"]) == [shown(other_chat, xavier, False)]


async def test_one_user_typing_from_tabs_on_two_processes_shows_one_true_and_one_false(
    tmp_path: Path,
) -> None:
    """The throttle and the one false hold per (user, conversation), whichever processes the user's tabs
    are on: a true relayed by one process is claimed on the typer's own user topic, the other counts it
    and leaves the false to it."""
    async with redis_pair(tmp_path) as (procs, db):
        p0, p1 = procs
        alice, bob = (f"{name}-{uuid.uuid4().hex[:6]}" for name in ("a", "b"))
        for user in (alice, bob):
            await demo.insert_user(db, user)
        chat = f"cv-{uuid.uuid4().hex[:8]}"
        await demo.insert_conversation(db, chat, alice, bob)
        tab_p0, tab_p1, bob_tab = await connect(p0, alice), await connect(p1, alice), await connect(p0, bob)
        for client in (tab_p0, tab_p1, bob_tab):
            await client.send({"type": "ping"})  # a pong: its user topic is subscribed
            assert await client.recv() == {"type": "pong"}

        started = time.monotonic()
        await tab_p0.send(typing(chat))
        assert await bob_tab.recv() == shown(chat, alice, True)
        await asyncio.sleep(0.3)  # the claim is a broker round trip ahead of the next frame
        for _ in range(3):  # the other tab, on the other process, within the 2 s: swallowed there
            await tab_p1.send(typing(chat))
            await asyncio.sleep(0.2)
        rest = only(await collect(bob_tab, started + WINDOW))
        assert rest == [shown(chat, alice, False)], rest
        # and typing on p1 after the throttle is relayed by p1 (the claim did not silence it for good)
        await tab_p1.send(typing(chat))
        assert await bob_tab.recv() == shown(chat, alice, True)
        await tab_p1.send(typing(chat, False))
        assert await bob_tab.recv() == shown(chat, alice, False)
        for client in (tab_p0, tab_p1):
            await client.nothing(0.2)
