"""Live revocation (protocol §7.7) with two real processes over Redis and real clients: the web app
changes the database, calls ``POST /api/access/revoke`` on process 0, and the subscribers on process 1
who lost access leave the channel; a subscription whose ``validUntil`` passes does the same by itself.

Every "nothing more" is proved able to fail: a marker event published on the channel must be the next
frame (a subscriber that kept the channel gets it; one that lost it must not, which the marker on
another channel it holds proves).
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from fonana_ws.auth import create_token
from fonana_ws.db import demo

from .conftest import API_KEY, SECRET, Client, process_pair

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def connect(url: str, user: str) -> Client:
    ws = await websockets.connect(f"{url}?token={create_token(SECRET, user, 600)}", close_timeout=1)
    client = Client(ws)
    await client.recv_type("connected")
    return client


async def subscribe(client: Client, post_id: str) -> None:
    channel = {"type": "post", "postId": post_id}
    reply = await client.subscribe(channel)
    assert reply["type"] == "subscribed", reply
    assert (reply["data"]["channel"], reply["data"]["channelKey"]) == (channel, f"post_{post_id}"), reply


def revoked(post_id: str) -> dict[str, Any]:
    return {
        "type": "unsubscribed",
        "data": {
            "channel": {"type": "post", "postId": post_id},
            "channelKey": f"post_{post_id}",
            "reason": "access revoked",
        },
    }


async def publish(http: httpx.AsyncClient, key: str, n: int) -> dict[str, Any]:
    event = {"type": "marker", "n": n}
    answer = await http.post("/api/publish", json={"channel": key, "event": event}, headers=AUTH)
    assert answer.status_code == 202, answer.text
    return event


async def revoke(http: httpx.AsyncClient, body: dict[str, str]) -> None:
    answer = await http.post("/api/access/revoke", json=body, headers=AUTH)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"ok": True, **body}


@pytest.fixture
async def pair(tmp_path: Path):
    async with process_pair(tmp_path, "redis") as (procs, db):
        async with httpx.AsyncClient(base_url=procs[0].http_url, timeout=10) as http:
            yield procs, db, http


async def test_a_refunded_subscription_loses_the_locked_post_and_nothing_else(pair) -> None:
    procs, db, http = pair
    creator, paid, other = uid("creator"), uid("paid"), uid("other")
    for user in (creator, paid, other):
        await demo.insert_user(db, user, is_creator=user == creator)
    locked, open_post = uid("locked"), uid("open")
    await demo.insert_post(db, locked, creator, locked=True)
    await demo.insert_post(db, open_post, creator)
    sub = uid("sub")
    await demo.insert_subscription(db, sub, paid, creator)
    await demo.insert_subscription(db, uid("sub"), other, creator)

    s = await connect(procs[1].ws_url, paid)
    await subscribe(s, locked)
    await subscribe(s, open_post)
    o = await connect(procs[1].ws_url, other)
    await subscribe(o, locked)

    await db.execute("UPDATE subscriptions SET \"paymentStatus\" = 'REFUNDED' WHERE id = :id", {"id": sub})
    started = time.monotonic()
    await revoke(http, {"userId": paid, "creatorId": creator})
    assert await s.recv() == revoked(locked)
    took = 1000 * (time.monotonic() - started)
    print(f"\n[revoke] revoke call to unsubscribed across processes: {took:.1f} ms")
    # No further events of the locked post; the open post and the other subscriber are untouched.
    await publish(http, f"post_{locked}", 1)
    assert await o.recv() == {"type": "marker", "n": 1}
    marker = await publish(http, f"post_{open_post}", 2)
    assert await s.recv() == marker, "the next frame is the open post's: none of the locked post's came"
    # And the access cache does not let it back in: a new subscribe is refused.
    await s.send({"type": "subscribe", "channel": {"type": "post", "postId": locked}})
    assert (await s.recv())["data"]["message"] == "Access denied to channel"


async def test_a_refunded_purchase_and_a_locked_post(pair) -> None:
    procs, db, http = pair
    creator, buyer, fan = uid("creator"), uid("buyer"), uid("fan")
    for user in (creator, buyer, fan):
        await demo.insert_user(db, user, is_creator=user == creator)
    bought, post = uid("bought"), uid("post")
    await demo.insert_post(db, bought, creator, locked=True)
    await demo.insert_post(db, post, creator)
    await db.execute(
        'INSERT INTO post_purchases (id, "postId", "userId", "paymentStatus") VALUES (:id, :p, :u, :s)',
        {"id": uid("buy"), "p": bought, "u": buyer, "s": "COMPLETED"},
    )
    b = await connect(procs[1].ws_url, buyer)
    await subscribe(b, bought)
    await subscribe(b, post)
    f = await connect(procs[1].ws_url, fan)
    await subscribe(f, post)
    c = await connect(procs[1].ws_url, creator)
    await subscribe(c, post)

    await db.execute(
        'UPDATE post_purchases SET "paymentStatus" = \'REFUNDED\' WHERE "postId" = :p', {"p": bought}
    )
    await revoke(http, {"userId": buyer, "postId": bought})
    assert await b.recv() == revoked(bought)

    # The creator locks the open post: its non-paying subscribers leave, the creator stays.
    await db.execute('UPDATE posts SET "isLocked" = TRUE WHERE id = :p', {"p": post})
    await revoke(http, {"postId": post})
    assert await b.recv() == revoked(post)
    assert await f.recv() == revoked(post)
    marker = await publish(http, f"post_{post}", 3)
    assert await c.recv() == marker


async def test_a_subscription_that_ends_takes_the_post_with_it(pair) -> None:
    procs, db, http = pair
    creator, fan = uid("creator"), uid("fan")
    for user in (creator, fan):
        await demo.insert_user(db, user, is_creator=user == creator)
    locked, open_post = uid("locked"), uid("open")
    await demo.insert_post(db, locked, creator, locked=True)
    await demo.insert_post(db, open_post, creator)
    await demo.insert_subscription(db, uid("sub"), fan, creator, valid_for=timedelta(seconds=2))
    f = await connect(procs[1].ws_url, fan)
    subscribed_at = time.monotonic()
    await subscribe(f, locked)
    await subscribe(f, open_post)
    assert await f.recv(timeout=6) == revoked(locked)
    after = time.monotonic() - subscribed_at
    assert 1.0 <= after <= 4.0, f"lost {after:.2f} s after subscribing to a subscription of 2 s"
    marker = await publish(http, f"post_{open_post}", 4)
    assert await f.recv() == marker


async def test_the_revoke_route_refuses_what_it_cannot_act_on(pair) -> None:
    _, _, http = pair
    for body in (
        {},
        {"userId": "u"},
        {"creatorId": "c"},
        {"postId": "p", "creatorId": "c"},
        {"postId": ""},
        {"postId": 5},
        {"userId": "u", "postId": "p", "x": 1},
        [],
    ):
        answer = await http.post("/api/access/revoke", json=body, headers=AUTH)
        assert answer.status_code == 400, (body, answer.text)
    assert (await http.post("/api/access/revoke", json={"postId": "p"})).status_code == 401


async def test_the_cli_revokes_over_http_and_refuses_a_bad_form(pair, tmp_path: Path) -> None:
    from .conftest import clean_env
    from .test_disconnect import fonana_ws

    procs, db, http = pair
    creator, fan = uid("creator"), uid("fan")
    for user in (creator, fan):
        await demo.insert_user(db, user, is_creator=user == creator)
    locked = uid("locked")
    await demo.insert_post(db, locked, creator, locked=True)
    sub = uid("sub")
    await demo.insert_subscription(db, sub, fan, creator)
    f = await connect(procs[1].ws_url, fan)
    await subscribe(f, locked)
    await db.execute('UPDATE subscriptions SET "isActive" = FALSE WHERE id = :id', {"id": sub})
    env = clean_env(WS_API_KEY=API_KEY)
    url = ["--url", procs[0].http_url]
    code, out, err = await fonana_ws(
        "revoke", "--user", fan, "--creator", creator, *url, cwd=tmp_path, env=env
    )
    assert code == 0, (out, err)
    assert await f.recv() == revoked(locked)
    code, out, err = await fonana_ws("revoke", "--creator", creator, *url, cwd=tmp_path, env=env)
    assert code == 2 and "--post" in err, (out, err)
