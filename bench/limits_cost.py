"""What the limits of protocol §7.5 cost: per inbound frame, and per connect, on each backend.

    .venv/bin/python bench/limits_cost.py [--redis redis://127.0.0.1:6379/0] [--pg postgresql://...]

Prints one table: microseconds per operation (median of 5 runs). The per-frame figure is the
``WS_CLIENT_RATE`` check every client frame pays; the per-connect figures are ``WS_CONNECT_RATE`` (only
when set) and the ``WS_MAX_CONNECTIONS_PER_USER`` slot (acquire at connect plus release at close).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from fonana_ws.config import load_settings
from fonana_ws.web.admission import RateLimits


def settings_for(broker: str, **env: str):  # type: ignore[no-untyped-def]
    return load_settings(
        {"JWT_SECRET": "x" * 32, "BROADCAST_URL": broker, "WS_CONNECT_RATE": "1000000/1 minute", **env},
        env_file=None,
    )


def per_op_sync(fn: Callable[[int], object], n: int) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


async def per_op(fn: Callable[[int], Awaitable[object]], n: int) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(n):
            await fn(i)
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    rows: list[tuple[str, str, float]] = []

    memory = RateLimits(settings_for("memory://"))
    # 1,000 live connections' counters, as a busy process has.
    rows.append(
        (
            "inbound frame (WS_CLIENT_RATE)",
            "memory",
            per_op_sync(lambda i: memory.frame_allowed(i % 1000), 20000),
        )
    )
    rows.append(
        (
            "connect (WS_CONNECT_RATE)",
            "memory",
            await per_op(lambda i: memory.connect_allowed(f"10.0.{i % 250}.1"), args.n),
        )
    )
    redis_limits = RateLimits(settings_for(args.redis))
    rows.append(
        (
            "connect (WS_CONNECT_RATE)",
            "redis",
            await per_op(lambda i: redis_limits.connect_allowed(f"10.0.{i % 250}.1"), args.n),
        )
    )
    await redis_limits.close()

    from fonana_ws.fonana import user_connections

    for name, url in (("memory", "memory://"), ("redis", args.redis), ("postgresql", args.pg)):
        registry = user_connections.for_settings(settings_for(url, WS_MAX_CONNECTIONS_PER_USER="100000"))
        await registry.start()

        async def slot(i: int, registry=registry) -> None:  # type: ignore[no-untyped-def]
            await registry.acquire(f"bench-user-{i % 50}", f"c{i}")
            await registry.release(f"bench-user-{i % 50}", f"c{i}")

        rows.append(("connect + close (per-user slot)", name, await per_op(slot, args.n // 2)))
        await registry.stop()

    print(f"{'what':34} {'backend':11} {'µs per op':>10}")
    for what, backend, us in rows:
        print(f"{what:34} {backend:11} {us:10.1f}")


if __name__ == "__main__":
    asyncio.run(main())
