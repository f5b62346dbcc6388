"""What a revoke (protocol §7.7) costs for a creator with N connected paying subscribers of a locked post.

    .venv/bin/python bench/revoke_cost.py [--n 5000] [--broker memory:// | redis://127.0.0.1:6379/0]

All on 127.0.0.1. ``fonana-ws serve`` (``bench/ours.py``: SQLite, one process, pinned to ``--server-cpus``)
starts with a creator, a locked post and N users, each with an active paid subscription to the creator.
N WebSocket connections (one per user, opened ``--concurrency`` at a time) subscribe to that post. Then:

A. ``POST /api/access/revoke {"postId": P}`` with nothing changed in the database: everybody stays. Wall
   time until the server counted the re-check (``/stats`` ``access_rechecks``), and its CPU time.
B. Half of the subscriptions are marked refunded in the SQLite file, then the same call: the time from
   the call to the last ``unsubscribed`` frame with ``"reason": "access revoked"`` (exactly N/2 must get
   one, and only them), its p50 over those connections, and the server's CPU time.
C. One remaining user's subscription ends (``isActive`` false), ``{"userId": U, "creatorId": C}``: the
   time to their ``unsubscribed``.

The server's CPU is user + system time from ``/proc/PID/stat`` over the phase, which includes the
``/stats`` polls (every ``POLL`` s until the re-check is counted); the "idle" row is the same polling
with no revoke, the part of each phase that is not the revoke's. The clients run in this one process,
so at large N the wall times include the clients' reading of their frames.

Bounded: stops after TIME_LIMIT seconds; the server is stopped at the end. Prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass, field

import databases
import httpx
import orjson
import websockets

sys.path.insert(0, os.path.dirname(__file__))

from fonana_ws.auth import create_token  # noqa: E402
from fonana_ws.db import demo  # noqa: E402
from ours import Ours, SeedExtra  # noqa: E402
from presence_cost import cpu_seconds  # noqa: E402
from status_cost import free_port  # noqa: E402

SECRET = "bench-revoke-secret-" + "s" * 32
API_KEY = "bench-revoke-key-" + "k" * 32
TIME_LIMIT = 300.0
CREATOR = "bench-creator"
POST_ID = "bench-locked"
POST = {"type": "post", "postId": POST_ID}
KEY = "post_" + POST_ID
REASON = "access revoked"
POLL = 0.005  # s between /stats polls while waiting for the re-check
SETTLE = 0.3  # s after a phase's end, so that nothing late is missed (and counted in the CPU window)


def user_ids(n: int) -> list[str]:
    return [f"bench-s{i}" for i in range(n)]


def seeder(subscribers: list[str]) -> SeedExtra:
    """The locked post and one active, paid subscription per subscriber."""

    async def extra(db: databases.Database) -> None:
        await demo.insert_post(db, POST_ID, CREATOR, locked=True)
        for i, user in enumerate(subscribers):
            await demo.insert_subscription(db, f"bench-sub-{i}", user, CREATOR)

    return extra


@dataclass
class Client:
    """One subscriber's socket, read in the background: when (if ever) it was told access was revoked."""

    user: str
    ws: websockets.ClientConnection
    revoked_at: float | None = None
    revoked: asyncio.Event = field(default_factory=asyncio.Event)
    other: list[dict] = field(default_factory=list)
    task: asyncio.Task | None = None

    async def read(self) -> None:
        async for raw in self.ws:
            frame = orjson.loads(raw)
            data = frame.get("data") or {}
            ours = (data.get("channelKey"), data.get("reason")) == (KEY, REASON)
            if frame["type"] == "unsubscribed" and ours:
                if self.revoked_at is None:
                    self.revoked_at = time.monotonic()
                    self.revoked.set()
            else:
                self.other.append(frame)


async def open_client(url: str, user: str, limit: asyncio.Semaphore) -> Client:
    async with limit:
        ws = await websockets.connect(
            f"{url}?token={create_token(SECRET, user, 3600)}", max_queue=None, open_timeout=60
        )
        connected = orjson.loads(await ws.recv())
        assert connected["type"] == "connected", connected
        await ws.send(orjson.dumps({"type": "subscribe", "channel": POST}).decode())
        frame = orjson.loads(await ws.recv())
        assert frame["type"] == "subscribed", frame
    client = Client(user, ws)
    client.task = asyncio.get_running_loop().create_task(client.read())
    return client


@dataclass
class Row:
    phase: str
    affected: int
    cpu_ms: float
    wall_ms: float | None
    p50_ms: float | None
    note: str = ""


async def run(args: argparse.Namespace) -> list[Row]:
    if not args.broker.startswith(("memory", "redis://127.0.0.1", "redis://localhost")):
        raise SystemExit("--broker must be memory:// or a Redis on 127.0.0.1")
    subscribers = user_ids(args.n)
    port = free_port()
    ours = Ours(
        port, SECRET, API_KEY, args.server_cpus, [CREATOR, *subscribers], broker=args.broker,
        seed_extra=seeder(subscribers),
    )  # fmt: skip
    _, http_url, pids = await asyncio.to_thread(ours.start)
    pid = pids[0]
    db_file = ours.database_url.split("///", 1)[1]
    url = f"ws://127.0.0.1:{port}/ws"
    http = httpx.AsyncClient(base_url=http_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    clients: list[Client] = []
    rows: list[Row] = []

    async def rechecks() -> int:
        answer = await http.get("/stats")
        answer.raise_for_status()
        return int(answer.json()["totals"]["access_rechecks"])

    async def until_rechecked(before: int, deadline: float) -> float:
        """Poll until the server counted one more re-check; the monotonic time it was seen."""
        while time.monotonic() < deadline:
            if await rechecks() > before:
                return time.monotonic()
            await asyncio.sleep(POLL)
        raise TimeoutError("the server did not count the re-check")

    async def revoke(body: dict) -> float:
        t0 = time.monotonic()
        answer = await http.post("/api/access/revoke", json=body)
        assert answer.status_code == 202, (answer.status_code, answer.text)
        return t0

    def refund(users: list[str], column: str, value: object) -> None:
        """What the web app does before calling revoke (the server's SQLite file, another connection)."""
        with sqlite3.connect(db_file, timeout=30) as con:
            con.executemany(
                f'UPDATE subscriptions SET "{column}" = ? WHERE "userId" = ?', [(value, u) for u in users]
            )

    try:
        limit = asyncio.Semaphore(args.concurrency)
        t = time.monotonic()
        clients = list(await asyncio.gather(*(open_client(url, u, limit) for u in subscribers)))
        print(f"{len(clients)} subscribers connected in {time.monotonic() - t:.1f} s", file=sys.stderr)
        await asyncio.sleep(1.0)  # the connects' own work done

        # idle: the polling alone, as long as a phase polls (the part of a phase's CPU that is not revoke's)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        polls = 0
        while time.monotonic() - t0 < args.idle_seconds:
            await rechecks()
            polls += 1
            await asyncio.sleep(POLL)
        await asyncio.sleep(SETTLE)
        rows.append(
            Row("idle: /stats polled, no revoke", 0, (cpu_seconds(pid) - cpu0) * 1000,
                None, None, f"{polls} polls over {args.idle_seconds:g} s + {SETTLE:g} s")
        )  # fmt: skip

        # A: nothing changed, everybody stays
        before = await rechecks()
        cpu0 = cpu_seconds(pid)
        t0 = await revoke({"postId": POST_ID})
        seen = await until_rechecked(before, t0 + 30)
        await asyncio.sleep(SETTLE)
        cpu = cpu_seconds(pid) - cpu0
        lost = [c.user for c in clients if c.revoked_at is not None]
        rows.append(
            Row("A: revoke postId, nothing changed", len(clients), cpu * 1000, (seen - t0) * 1000, None,
                f"wall = call -> re-check counted; {len(lost)} unsubscribed (want 0)")
        )  # fmt: skip
        if lost:
            raise AssertionError(f"phase A: {len(lost)} subscribers lost access, e.g. {lost[:3]}")

        # B: half refunded
        refunded = {c.user for c in clients[::2]}
        await asyncio.to_thread(refund, sorted(refunded), "paymentStatus", "REFUNDED")
        before = await rechecks()
        cpu0 = cpu_seconds(pid)
        t0 = await revoke({"postId": POST_ID})
        await until_rechecked(before, t0 + 60)
        with contextlib.suppress(TimeoutError):  # who missed it is reported below
            waits = [c.revoked.wait() for c in clients if c.user in refunded]
            await asyncio.wait_for(asyncio.gather(*waits), t0 + 60 - time.monotonic())
        await asyncio.sleep(SETTLE)
        cpu = cpu_seconds(pid) - cpu0
        got = {c.user for c in clients if c.revoked_at is not None}
        times = sorted(c.revoked_at - t0 for c in clients if c.revoked_at is not None)
        rows.append(
            Row("B: half refunded, revoke postId", len(got), cpu * 1000,
                times[-1] * 1000 if times else None, statistics.median(times) * 1000 if times else None,
                f"{len(got)} unsubscribed (want {len(refunded)}, exactly the refunded)")
        )  # fmt: skip
        if got != refunded:
            raise AssertionError(
                f"phase B: {len(got - refunded)} wrongly unsubscribed, {len(refunded - got)} missed"
            )

        # C: one remaining user's subscription ends
        one = next(c for c in clients if c.user not in refunded)
        await asyncio.to_thread(refund, [one.user], "isActive", False)
        cpu0 = cpu_seconds(pid)
        t0 = await revoke({"userId": one.user, "creatorId": CREATOR})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(one.revoked.wait(), 30)
        await asyncio.sleep(SETTLE)
        cpu = cpu_seconds(pid) - cpu0
        extra = {c.user for c in clients if c.revoked_at is not None} - refunded - {one.user}
        rows.append(
            Row("C: one subscription ended, userId+creatorId", int(one.revoked_at is not None), cpu * 1000,
                (one.revoked_at - t0) * 1000 if one.revoked_at else None, None,
                f"{len(extra)} others unsubscribed (want 0)")
        )  # fmt: skip
        if one.revoked_at is None or extra:
            raise AssertionError(f"phase C: revoked={one.revoked_at is not None}, others={len(extra)}")
        unexpected = sum(len(c.other) for c in clients)
        if unexpected:
            print(f"note: {unexpected} other frames received (e.g. {clients[0].other[:1]})", file=sys.stderr)
    finally:
        await asyncio.gather(*(c.ws.close() for c in clients), return_exceptions=True)
        await http.aclose()
        await asyncio.to_thread(ours.stop)
    return rows


def show(rows: list[Row], args: argparse.Namespace) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    print(f"\nrevoke cost: {args.n} paying subscribers of one locked post, one fonana-ws, {args.broker}")
    print(f"{'phase':<46} {'affected':>8} {'server CPU ms':>14} {'wall ms':>9} {'p50 ms':>8}  note")
    for r in rows:
        cols = f"{r.affected:>8} {r.cpu_ms:>14.1f} {ms(r.wall_ms):>9} {ms(r.p50_ms):>8}"
        print(f"{r.phase:<46} {cols}  {r.note}")
    print("(wall: call -> last unsubscribed frame received; for A -> re-check counted. CPU includes polls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="paying subscribers, one connection each")
    parser.add_argument("--broker", default="memory://", help="memory:// or redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrency", type=int, default=200, help="connections being opened at once")
    parser.add_argument("--server-cpus", default="0", help="taskset -c for the server")
    parser.add_argument("--idle-seconds", type=float, default=0.2, help="the idle polling row's length")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.n + 100 > hard:
        raise SystemExit(f"--n {args.n} needs more file descriptors than the limit {hard}")

    async def bounded() -> list[Row]:
        async with asyncio.timeout(TIME_LIMIT):
            return await run(args)

    show(asyncio.run(bounded()), args)


if __name__ == "__main__":
    main()
