"""The HTTP side: publishing with the server API key, health and readiness."""

from __future__ import annotations

from .conftest import API_KEY, Server


async def test_publish_needs_the_api_key(server: Server) -> None:
    body = {"channel": "creator_x", "event": {"type": "creator_updated"}}
    missing = await server.publish(body, key=None)
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    wrong = await server.publish(body, key="wrong-" + API_KEY)
    assert wrong.status_code == 401
    # the users' JWT secret is not the API key
    assert (await server.publish(body, key=server.settings.jwt_secret)).status_code == 401


async def test_publish_validates_the_body(server: Server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    cases = [
        (b"not json", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b'{"channel": "creator_x"}', "event is required"),
        (b'{"event": {"type": "x"}}', "channel or user"),
        (b'{"channel": "bogus", "event": {"type": "x"}}', "channel"),
        (b'{"channel": 5, "event": {"type": "x"}}', "channel"),
        (b'{"user": ["u"], "event": {"type": "x"}}', "user"),
        (b'{"channel": "creator_x", "event": "text"}', "event must be a JSON object"),
        (b'{"channel": "creator_x", "event": {"no": "type"}}', "event.type"),
    ]
    for body, reason in cases:
        response = await server.http.post("/api/publish", content=body, headers=headers)
        assert response.status_code == 400, body
        assert reason in response.json()["error"], (body, response.json())


async def test_publish_answers_202_and_delivers(server: Server) -> None:
    user = await server.user()
    client = await server.connect(user)
    await client.subscribe({"type": "post", "postId": "ghost"})  # refused: no such post
    await client.subscribe({"type": "creator", "id": user})
    response = await server.publish(
        {"channel": f"creator_{user}", "event": {"type": "earnings_updated", "x": 1}}
    )
    assert response.status_code == 202
    body = response.json()
    assert body["ok"] is True and body["id"] and body["channels"] == [f"creator_{user}"]
    assert await client.recv() == {"type": "earnings_updated", "x": 1}


async def test_health_and_ready(server: Server) -> None:
    assert (await server.http.get("/health")).json() == {"status": "ok"}
    ready = await server.http.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": "ok", "broker": "ok"}


async def test_a_retried_publish_with_its_id_is_delivered_once(server: Server) -> None:
    user = await server.user()
    client = await server.connect(user)
    await client.subscribe({"type": "creator", "id": f"retry-{user}"})
    body = {
        "channel": f"creator_retry-{user}",
        "event": {"type": "creator_updated", "n": 1},
        "id": f"e-{user}",
    }
    first = await server.publish(body)
    assert first.status_code == 202 and first.json()["id"] == f"e-{user}"
    assert (await server.publish(body)).status_code == 202  # the web app retried after a timeout
    assert await client.recv() == {"type": "creator_updated", "n": 1}
    await client.nothing(0.3)
    await server.publish({**body, "id": f"other-{user}"})  # another id is another event
    assert await client.recv() == {"type": "creator_updated", "n": 1}
    bad = await server.publish({**body, "id": 5})
    assert bad.status_code == 400 and "id" in bad.json()["error"]
