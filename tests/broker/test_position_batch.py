"""history_position on Redis: concurrent calls share one pipeline, with the same answers as one by one."""

from __future__ import annotations

import asyncio
import uuid

from redis import asyncio as aioredis

from fonana_ws.broker.history import HistoryLimits, Target
from fonana_ws.broker.redis_backend import RedisBackend

LIMITS = HistoryLimits(size=100, ttl=300)


def _target(key: str) -> Target:
    event = f'{{"channelKey":"{key}"}}'
    return Target(f"fonana-ws:{key}", f'{{"event":{event}}}', key, event)


async def test_two_thousand_concurrent_positions_take_one_round_trip(redis_url: str) -> None:
    backend = RedisBackend(redis_url)
    await backend.connect()
    try:
        run = uuid.uuid4().hex[:8]
        keys = [f"post_{run}_{i}" for i in range(2000)]
        # Some keys have events already, so the batch must tell them apart.
        assert await backend.publish_targets([_target(k) for k in keys[:3]] * 2, LIMITS) == [1, 1, 1, 2, 2, 2]
        await backend.history_position(f"post_{run}_warm", LIMITS)  # the script in Redis's cache
        before = backend.position_round_trips
        together = await asyncio.gather(*(backend.history_position(k, LIMITS) for k in keys))
        assert backend.position_round_trips - before == 1
        alone = [await backend.history_position(k, LIMITS) for k in keys[:50]]
        assert together[:50] == alone
        assert [p.offset for p in together[:3]] == [2, 2, 2]
        assert all(p.offset == 0 for p in together[3:])
        assert len({p.epoch for p in together}) == len(keys)  # each key its own epoch, none shared
    finally:
        await backend.disconnect()


async def test_a_script_cache_emptied_by_a_restart_costs_one_more_round_trip(redis_url: str) -> None:
    backend = RedisBackend(redis_url)
    await backend.connect()
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [f"post_{uuid.uuid4().hex[:8]}" for _ in range(20)]
        await client.script_flush()
        before = backend.position_round_trips
        positions = await asyncio.gather(*(backend.history_position(k, LIMITS) for k in keys))
        assert backend.position_round_trips - before == 2
        assert [p.offset for p in positions] == [0] * 20
        assert [await backend.history_position(k, LIMITS) for k in keys] == positions
    finally:
        await client.aclose()
        await backend.disconnect()
