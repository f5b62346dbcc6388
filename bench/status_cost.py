"""What online status (protocol §7.3) costs on Redis, and how long a dead process's users stay online.

    .venv/bin/python bench/status_cost.py [--redis redis://127.0.0.1:6379/0] [--ttl 3] [--trials 3]

All on 127.0.0.1. A counting TCP proxy sits in front of Redis; "round trips" are the requests the
clients wrote (a pipeline is one), "bytes" both directions.

1. ``RedisUserConnections`` alone: one connect (``admit``) and one disconnect (``release``) of a user's
   only connection, N times.
2. ``fonana-ws serve`` (``bench/ours.py``, SQLite, its broker and its count both through the proxy): a
   connect-then-disconnect cycle of a user nobody watches and of a watched user (a watcher on the same
   process subscribed to ``status_U``), including the user topic's subscribe/unsubscribe, the status
   publishes and, for the watched user, the frames coming back.
3. A process holding a user's connection is killed with SIGKILL (``--ttl`` seconds of WS_PRESENCE_TTL):
   seconds until a survivor's sweep reports the user gone (the offline frame follows WS_OFFLINE_GRACE
   later), extrapolated to the default 60 s.

Bounded: the whole run stops after TIME_LIMIT seconds; the server is stopped at the end. Prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import websockets

sys.path.insert(0, os.path.dirname(__file__))

from fonana_ws.auth import create_token  # noqa: E402
from fonana_ws.fonana.user_connections import RedisUserConnections  # noqa: E402
from ours import Ours  # noqa: E402

SECRET = "bench-status-secret-" + "s" * 32
API_KEY = "bench-status-key-" + "k" * 32
TIME_LIMIT = 150.0
GRACE = 0.3


@dataclass
class Counts:
    requests: int = 0
    up: int = 0
    down: int = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.requests, self.up, self.down


class CountingProxy:
    """127.0.0.1:port -> Redis, counting what goes through."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.counts = Counts()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upward: bool) -> None:
            try:
                while data := await src.read(65536):
                    if upward:
                        self.counts.requests += 1
                        self.counts.up += len(data)
                    else:
                        self.counts.down += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def per(before: tuple[int, int, int], after: tuple[int, int, int], n: int) -> tuple[float, float, float]:
    return tuple((a - b) / n for a, b in zip(after, before, strict=True))  # type: ignore[return-value]


async def component(proxy: CountingProxy, n: int) -> list[tuple[str, tuple[float, float, float]]]:
    uc = RedisUserConnections(
        f"redis://127.0.0.1:{proxy.port}/0", 32, ttl=600.0, key_prefix=f"bench-status-{uuid.uuid4().hex[:6]}"
    )
    users = [f"u{i}" for i in range(n)]
    await uc.admit("warm", "0")  # loads the scripts, opens the pool
    await uc.release("warm", "0")
    start = proxy.counts.snapshot()
    for u in users:
        await uc.admit(u, "c")
    mid = proxy.counts.snapshot()
    for u in users:
        await uc.release(u, "c")
    end = proxy.counts.snapshot()
    await uc.stop()
    return [("count: connect (admit)", per(start, mid, n)), ("count: disconnect (release)", per(mid, end, n))]


async def server_cycles(
    proxy: CountingProxy, n: int, port: int
) -> list[tuple[str, tuple[float, float, float]]]:
    os.environ["WS_OFFLINE_GRACE"] = str(GRACE)
    users = ["bench-watcher", "bench-plain", "bench-watched"]
    ours = Ours(port, SECRET, API_KEY, "0", users, broker=f"redis://127.0.0.1:{proxy.port}/0")
    await asyncio.to_thread(ours.start)
    try:
        url = f"ws://127.0.0.1:{port}/ws"

        async def connect(user: str) -> websockets.ClientConnection:
            ws = await websockets.connect(f"{url}?token={create_token(SECRET, user, 600)}")
            await ws.recv()  # connected
            await ws.send('{"type":"ping"}')
            await ws.recv()  # pong: the user topic is subscribed
            return ws

        watcher = await connect("bench-watcher")
        await watcher.send(
            orjson.dumps({"type": "subscribe", "channel": {"type": "status", "userId": "bench-watched"}})
        )
        await watcher.recv()  # subscribed
        await watcher.recv()  # the snapshot
        rows = []
        for user in ("bench-plain", "bench-watched"):
            await asyncio.sleep(GRACE + 0.5)
            before = proxy.counts.snapshot()
            for _ in range(n):
                ws = await connect(user)
                await ws.close()
                await asyncio.sleep(GRACE + 0.2)  # the offline announcement is part of the cycle
            after = proxy.counts.snapshot()
            # Redis traffic that is no cycle's (refreshes every TTL/3 = 20 s, pings) is within noise here.
            rows.append((f"server: connect+disconnect, {user.removeprefix('bench-')}", per(before, after, n)))
        await watcher.close()
        return rows
    finally:
        await asyncio.to_thread(ours.stop)


_CHILD = """
import asyncio, sys
from fonana_ws.fonana.user_connections import RedisUserConnections
async def main():
    uc = RedisUserConnections(sys.argv[1], 32, ttl=float(sys.argv[2]), key_prefix=sys.argv[3])
    await uc.start()
    await uc.acquire(sys.argv[4], "c")
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def dead_process(redis_url: str, ttl: float, trials: int) -> list[float]:
    prefix = f"bench-status-dead-{uuid.uuid4().hex[:6]}"
    survivor = RedisUserConnections(redis_url, 32, ttl=ttl, key_prefix=prefix)
    gone: dict[str, asyncio.Future[float]] = {}

    def on_offline(users: list[str]) -> None:
        for u in users:
            if u in gone and not gone[u].done():
                gone[u].set_result(time.monotonic())

    survivor.on_offline = on_offline
    await survivor.start()
    results = []
    try:
        for i in range(trials):
            user = f"dead-{i}"
            gone[user] = asyncio.get_running_loop().create_future()
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _CHILD,
                redis_url,
                str(ttl),
                prefix,
                user,
                stdout=asyncio.subprocess.PIPE,
            )
            assert child.stdout is not None
            assert (await asyncio.wait_for(child.stdout.readline(), 20)).strip() == b"ready"
            await asyncio.sleep(ttl * (0.4 + 0.3 * i / max(1, trials - 1)))  # kill at different phases
            child.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await child.wait()
            results.append(await asyncio.wait_for(gone[user], ttl * 3) - killed)
    finally:
        await survivor.stop()
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(args: argparse.Namespace) -> None:
    parts = urlsplit(args.redis)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("--redis must be on 127.0.0.1")
    proxy = CountingProxy(parts.hostname, parts.port or 6379)
    await proxy.start()
    try:
        rows = await component(proxy, args.n)
        rows += await server_cycles(proxy, args.cycles, free_port())
    finally:
        proxy.close()
    dead = await dead_process(args.redis, args.ttl, args.trials)

    print(f"\nonline status on Redis ({args.redis}), through a counting proxy")
    print(f"{'what':<44} {'round trips':>12} {'bytes up':>10} {'bytes down':>11}")
    for name, (requests, up, down) in rows:
        print(f"{name:<44} {requests:>12.1f} {up:>10.0f} {down:>11.0f}")
    mean = sum(dead) / len(dead)
    print(
        f"\ndead process, WS_PRESENCE_TTL {args.ttl:g} s: swept "
        f"{', '.join(f'{d:.2f}' for d in dead)} s after SIGKILL"
    )
    print(
        f"  mean {mean:.2f} s = {mean / args.ttl:.2f} TTL; bound TTL x 4/3 = {args.ttl * 4 / 3:.2f} s; "
        f"the offline frame follows WS_OFFLINE_GRACE later"
    )
    print(f"  at the default 60 s: about {60 * mean / args.ttl:.0f} s (at most 80 s), + 5 s of grace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--n", type=int, default=200, help="admit/release pairs measured")
    parser.add_argument("--cycles", type=int, default=20, help="server connect/disconnect cycles per row")
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(TIME_LIMIT):
            await run(args)

    asyncio.run(bounded())


if __name__ == "__main__":
    main()
