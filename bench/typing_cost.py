"""What relaying typing (protocol §7.2) costs the server: CPU for N concurrent conversations.

    .venv/bin/python bench/typing_cost.py [--conversations 1000] [--broker redis://127.0.0.1:6379/0]

Starts ``fonana-ws serve`` (``bench/ours.py``: a throwaway SQLite database, pinned to ``--server-cpus``,
loopback only) with 2N users and N conversations, opens 2N connections (a typer and a receiver per
conversation) and measures the server's CPU time from ``/proc`` in phases: idle (connections only), every
typer sending a ping once a second (what any client frame costs, for comparison), repeating
``isTyping: true`` once a second and four times a second (keystrokes), then silence while the server
sends its own N ``false`` after 6 s. The cost of typing is the CPU above the idle phase, per client
frame. Every phase has a fixed length and the whole run a time limit; the server is stopped at the end.
Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import websockets

from fonana_ws.auth import create_token
from fonana_ws.db import Store, demo
from ours import Ours

CLK_TCK = os.sysconf("SC_CLK_TCK")
SECRET = "bench-typing-secret-" + "s" * 32
API_KEY = "bench-typing-key-" + "k" * 32
TIME_LIMIT = 240.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Counts:
    sent: int = 0
    shown_true: int = 0
    shown_false: int = 0
    other: list[Any] = field(default_factory=list)


#: (phase, seconds, what was sent and received, server CPU seconds)
Row = tuple[str, float, Counts, float]


async def seed_conversations(database_url: str, n: int) -> None:
    store = Store(database_url)
    await store.connect()
    try:
        async with store.db.transaction():
            for i in range(n):
                await demo.insert_conversation(store.db, f"bench-c{i}", f"bench-t{i}", f"bench-r{i}")
    finally:
        await store.disconnect()


async def open_socket(url: str, user: str) -> Any:
    ws = await websockets.connect(f"{url}?token={create_token(SECRET, user, 3600)}", max_size=None)
    assert orjson.loads(await ws.recv())["type"] == "connected"
    return ws


async def read(ws: Any, counts: Counts) -> None:
    try:
        async for raw in ws:
            frame = orjson.loads(raw)
            if frame.get("type") == "typing":
                if frame["isTyping"]:
                    counts.shown_true += 1
                else:
                    counts.shown_false += 1
            elif len(counts.other) < 5:
                counts.other.append(frame)
    except websockets.ConnectionClosed:
        pass


async def send_every(ws: Any, frame: str, period: float, until: float, counts: Counts) -> None:
    # Spread over the period, as independent clients are.
    await asyncio.sleep((hash(frame) % 1000) / 1000 * period)
    while time.monotonic() < until:
        await ws.send(frame)
        counts.sent += 1
        await asyncio.sleep(period)


async def run(args: argparse.Namespace, ours: Ours, ws_url: str, http_url: str, pid: int) -> list[Row]:
    n = args.conversations
    await seed_conversations(f"sqlite+aiosqlite:///{ours.dir / 'bench.db'}", n)
    typers, receivers = [], []
    for start in range(0, n, 100):  # in batches: the listen backlog, not the server, limits bursts
        batch = range(start, min(n, start + 100))
        typers += await asyncio.gather(*(open_socket(ws_url, f"bench-t{i}") for i in batch))
        receivers += await asyncio.gather(*(open_socket(ws_url, f"bench-r{i}") for i in batch))
    counts = Counts()
    readers = [asyncio.create_task(read(ws, counts)) for ws in receivers]
    replies = Counts()  # the typers' pongs, read so that they never back up
    readers += [asyncio.create_task(read(ws, replies)) for ws in typers]
    await asyncio.sleep(1.0)
    rows = []

    def typing(i: int) -> str:
        return orjson.dumps({"type": "typing", "conversationId": f"bench-c{i}", "isTyping": True}).decode()

    async def phase(name: str, seconds: float, period: float | None = None, ping: bool = False) -> None:
        before = Counts(counts.sent, counts.shown_true, counts.shown_false)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        until = t0 + seconds
        if period is not None:
            frames = [f'{{"type":"ping","n":{i}}}' if ping else typing(i) for i in range(len(typers))]
            await asyncio.gather(
                *(
                    send_every(ws, frame, period, until, counts)
                    for ws, frame in zip(typers, frames, strict=True)
                )
            )
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        elapsed = time.monotonic() - t0
        delta = Counts(
            counts.sent - before.sent,
            counts.shown_true - before.shown_true,
            counts.shown_false - before.shown_false,
        )
        rows.append((name, elapsed, delta, cpu_seconds(pid) - cpu0))
        print(f"  {name}: done", flush=True)

    await phase("idle (2N connections)", args.seconds)
    # Any client frame's cost (read, rate limit, parse, a reply): the floor under a typing frame.
    await phase("ping each 1 s (for comparison)", args.seconds, 1.0, ping=True)
    await phase("typing, a repeat each 1 s", args.seconds, 1.0)
    await phase("typing, a repeat each 0.25 s", args.seconds, 0.25)
    await phase("silence: the server's own false", 8.0)
    async with httpx.AsyncClient(base_url=http_url) as http:
        rows.append(("/stats typing", 0.0, Counts(other=[(await http.get("/stats")).json()["typing"]]), 0.0))
    await asyncio.gather(*(ws.close() for ws in (*typers, *receivers)))
    for task in readers:
        task.cancel()
    if counts.other:
        print(f"  unexpected frames (first 5): {counts.other}", flush=True)
    return rows


def table(rows: list[Row], n: int, broker: str) -> None:
    idle_rate = rows[0][3] / rows[0][1]
    print(f"\n{n} conversations ({2 * n} connections), one server process, broker {broker}, CPU from /proc")
    print("CPU % is of one core; µs columns are CPU above the idle phase's rate, per frame in / event out")
    print(
        f"{'phase':34} {'s':>5} {'frames in':>10} {'true out':>9} {'false out':>10} {'CPU %':>6} "
        f"{'µs/frame':>9} {'µs/out':>7}"
    )
    for name, seconds, c, cpu in rows:
        if name.startswith("/stats"):
            print(f"{name}: {c.other[0]}")
            continue
        above = cpu - idle_rate * seconds
        out = c.shown_true + c.shown_false
        per_frame = f"{above / c.sent * 1e6:9.1f}" if c.sent else f"{'-':>9}"
        per_out = f"{above / out * 1e6:7.1f}" if out else f"{'-':>7}"
        print(
            f"{name:34} {seconds:5.1f} {c.sent:10d} {c.shown_true:9d} {c.shown_false:10d} "
            f"{cpu / seconds * 100:6.1f} {per_frame} {per_out}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured phase")
    parser.add_argument("--broker", default="memory://")
    parser.add_argument("--port", type=int, default=8112)
    parser.add_argument("--server-cpus", default="0")
    args = parser.parse_args()
    # 2N sockets on each side: the soft limit (often 1024) would refuse them; the server inherits this.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpus = os.sched_getaffinity(0)
    server_cpus = {int(c) for c in args.server_cpus.split(",")}
    if len(cpus - server_cpus) >= 1:
        os.sched_setaffinity(0, cpus - server_cpus)  # the load generator keeps off the server's core

    n = args.conversations
    users = [f"bench-t{i}" for i in range(n)] + [f"bench-r{i}" for i in range(n)]
    ours = Ours(args.port, SECRET, API_KEY, args.server_cpus, users, broker=args.broker)
    ws_url, http_url, pids = ours.start()  # seeds the users with asyncio.run: outside our loop

    async def bounded() -> list[Row]:
        async with asyncio.timeout(TIME_LIMIT):
            return await run(args, ours, ws_url, http_url, pids[0])

    try:
        rows = asyncio.run(bounded())
    finally:
        ours.stop()
    table(rows, n, args.broker)


if __name__ == "__main__":
    main()
