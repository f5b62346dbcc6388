"""The one-process broker keeps the backend contract the Redis and PostgreSQL ones keep."""

from __future__ import annotations

import asyncio

import pytest

from fonana_ws.broker import create_backend
from fonana_ws.broker.memory_backend import MemoryBackend

pytestmark = pytest.mark.unit


async def next_message(backend: MemoryBackend) -> tuple[str, str]:
    event = await asyncio.wait_for(backend.next_published(), 1)
    return event.channel, event.message


async def test_the_memory_url_makes_ours() -> None:
    assert isinstance(create_backend("memory://"), MemoryBackend)


async def test_subscribes_are_idempotent_and_one_unsubscribe_ends_it() -> None:
    backend = MemoryBackend()
    await backend.connect()
    for _ in range(3):
        await backend.subscribe("post_1")
    await backend.publish("post_1", "once")
    assert await next_message(backend) == ("post_1", "once")
    await backend.unsubscribe("post_1")
    await backend.unsubscribe("post_1")  # a second one is harmless (broadcaster's raises KeyError)
    await backend.publish("post_1", "nobody listens")
    await backend.subscribe("post_2")
    await backend.publish("post_2", "after")
    assert await next_message(backend) == ("post_2", "after"), "a message nobody subscribed to was kept"


async def test_a_batch_arrives_in_order() -> None:
    backend = MemoryBackend()
    await backend.connect()
    await backend.subscribe("a")
    await backend.subscribe("b")
    await backend.publish_many([("a", "1"), ("b", "2"), ("a", "3")])
    assert [await next_message(backend) for _ in range(3)] == [("a", "1"), ("b", "2"), ("a", "3")]
