"""What channel presence (protocol §7.4) costs: 2,000 connections joining one post channel, on Redis.

    .venv/bin/python bench/presence_cost.py [--redis redis://127.0.0.1:6379/0] [--n 2000] [--cycles 50]

All on 127.0.0.1. ``fonana-ws serve`` (``bench/ours.py``: SQLite, one process) has its broker and its
shared state on Redis through a counting TCP proxy ("round trips" are the requests its clients wrote, a
pipeline being one; "bytes" both directions). A watcher subscribes to ``post_bench`` with
``"presence": true``; then:

1. ``--cycles`` times, one more user connects, joins the channel, and closes (after the grace, so that
   the leave is part of the cycle): Redis round trips and bytes per cycle, the connection's own
   (user topic, status) included, and the same cycle on a channel without presence (``notifications_U``)
   for the difference.
2. ``--n`` users connect, then all join ``post_bench`` at once: the server's CPU time (``/proc``) and
   Redis's own (``INFO cpu``) over the joins, the round trips, and the frames the watcher got (counts:
   the channel is above WS_PRESENCE_LIST_LIMIT after 100 users). Then all leave at once, likewise.

Bounded: stops after TIME_LIMIT seconds; the server is stopped at the end. Prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from urllib.parse import urlsplit

import orjson
import websockets
from redis import asyncio as aioredis

sys.path.insert(0, os.path.dirname(__file__))

from fonana_ws.auth import create_token  # noqa: E402
from ours import Ours  # noqa: E402
from status_cost import CountingProxy, free_port, per  # noqa: E402

SECRET = "bench-presence-secret-" + "s" * 32
API_KEY = "bench-presence-key-" + "k" * 32
TIME_LIMIT = 240.0
GRACE = 0.3
POST = {"type": "post", "postId": "bench"}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def redis_cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


class Frames:
    """Reads a socket in the background, counting frames by type."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.by_type: dict[str, int] = {}
        self.last: dict[str, object] = {}
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            frame = orjson.loads(raw)
            self.by_type[frame["type"]] = self.by_type.get(frame["type"], 0) + 1
            self.last[frame["type"]] = frame


async def run(args: argparse.Namespace) -> None:
    parts = urlsplit(args.redis)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("--redis must be on 127.0.0.1")
    proxy = CountingProxy(parts.hostname, parts.port or 6379)
    await proxy.start()
    os.environ["WS_OFFLINE_GRACE"] = str(GRACE)
    users = (
        ["bench-watcher"]
        + [f"bench-c{i}" for i in range(args.cycles)]
        + [f"bench-{i}" for i in range(args.n)]
    )
    port = free_port()
    ours = Ours(port, SECRET, API_KEY, "0", users, broker=f"redis://127.0.0.1:{proxy.port}/0")
    _, _, pids = await asyncio.to_thread(ours.start)
    redis = aioredis.from_url(args.redis)
    url = f"ws://127.0.0.1:{port}/ws"

    async def connect(user: str) -> websockets.ClientConnection:
        ws = await websockets.connect(f"{url}?token={create_token(SECRET, user, 600)}", max_queue=None)
        await ws.recv()  # connected
        return ws

    async def subscribe(ws: websockets.ClientConnection, channel: dict, presence: bool = False) -> None:
        await ws.send(orjson.dumps({"type": "subscribe", "channel": channel, "presence": presence}).decode())
        frame = orjson.loads(await ws.recv())
        assert frame["type"] == "subscribed", frame

    rows: list[tuple[str, tuple[float, float, float]]] = []
    phases: list[tuple[str, float, float, int, float]] = []
    try:
        watcher = await connect("bench-watcher")
        await subscribe(watcher, POST, presence=True)
        seen = Frames(watcher)
        for label, channel_of in (
            ("join + leave post_bench (presence)", lambda u: POST),
            ("join + leave notifications_U (none)", lambda u: {"type": "notifications", "userId": u}),
        ):
            await asyncio.sleep(GRACE + 0.5)
            before = proxy.counts.snapshot()
            for i in range(args.cycles):
                user = f"bench-c{i}"
                ws = await connect(user)
                await subscribe(ws, channel_of(user))
                await ws.close()
                await asyncio.sleep(GRACE + 0.2)  # the leave (after the grace) is part of the cycle
            rows.append(
                (f"server: connect, {label}, close", per(before, proxy.counts.snapshot(), args.cycles))
            )

        socks = []
        for i in range(args.n):
            socks.append(await connect(f"bench-{i}"))
        await asyncio.sleep(2.0)  # the connects' own work (status, counts) done
        for label, work in (
            (
                f"{args.n} join post_bench at once",
                lambda: asyncio.gather(*(subscribe(ws, POST) for ws in socks)),
            ),
            (f"{args.n} close at once", lambda: asyncio.gather(*(ws.close() for ws in socks))),
        ):
            frames_before = sum(seen.by_type.values())
            before = proxy.counts.snapshot()
            cpu0, rcpu0, t0 = cpu_seconds(pids[0]), await redis_cpu(redis), time.monotonic()
            await work()
            await asyncio.sleep(GRACE + 1.5)  # leaves wait out the grace; the writer's last round lands
            cpu1, rcpu1 = cpu_seconds(pids[0]), await redis_cpu(redis)
            trips = proxy.counts.snapshot()[0] - before[0]
            frames = sum(seen.by_type.values()) - frames_before
            phases.append((label, cpu1 - cpu0, rcpu1 - rcpu0, trips, time.monotonic() - t0, frames))
        counts = seen.by_type
        await watcher.close()
    finally:
        await asyncio.to_thread(ours.stop)
        proxy.close()
        await redis.aclose()

    print(f"\nchannel presence on Redis ({args.redis}), one fonana-ws process, through a counting proxy")
    print(f"{'per cycle':<64} {'round trips':>12} {'bytes up':>10} {'bytes down':>11}")
    for name, (requests, up, down) in rows:
        print(f"{name:<64} {requests:>12.1f} {up:>10.0f} {down:>11.0f}")
    print(
        f"\n{'phase':<28} {'server CPU ms':>14} {'µs per conn':>12} {'Redis CPU ms':>13} "
        f"{'round trips':>12} {'frames':>7}"
    )
    for label, cpu, rcpu, trips, _wall, frames in phases:
        print(
            f"{label:<28} {cpu * 1000:>14.0f} {cpu * 1e6 / args.n:>12.0f} {rcpu * 1000:>13.0f} "
            f"{trips:>12} {frames:>7}"
        )
    print(f"(the watcher's frames by type over the run: {counts}; the phases include {GRACE + 1.5:g} s idle)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--n", type=int, default=2000, help="connections joining at once")
    parser.add_argument("--cycles", type=int, default=50, help="single join/leave cycles measured")
    args = parser.parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(TIME_LIMIT):
            await run(args)

    asyncio.run(bounded())


if __name__ == "__main__":
    main()
