"""A connect storm of users nobody has seen lately: every one admitted, the lookups shared by batches."""

from __future__ import annotations

import asyncio

import pytest
import websockets

from fonana_ws.db import demo

from .conftest import Server


async def test_a_storm_of_cold_connects_shares_user_lookups(server: Server) -> None:
    users = [f"cold-{server.services.store.dialect}-{i}" for i in range(150)]
    for user in users:
        await demo.insert_user(server.db, user)
    lookup = server.services.store.users
    before = lookup.queries, lookup.asked
    strangers = [f"never-inserted-{i}" for i in range(5)]  # asked in the same batches, refused alone
    clients = await asyncio.gather(
        *(server.connect(user) for user in users),  # each asserts its `connected`
        *(server.connect(user, expect_connected=False) for user in strangers),
    )
    queries, asked = lookup.queries - before[0], lookup.asked - before[1]
    assert asked == len(users) + len(strangers)  # none was cached: each asked of the database once
    assert queries < len(users), f"{queries} queries for {asked} cold users: not batched"
    for refused in clients[len(users) :]:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await refused.ws.recv()
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "Unauthorized: unknown user")
    await asyncio.gather(*(c.close() for c in clients[: len(users)]))
