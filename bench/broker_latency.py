"""Cross-process publish-to-delivery latency through each broker.

Starts two ``fonana-ws serve`` processes on loopback (each on its own embedded SQLite file, sharing the
broker), connects subscribers to process B, publishes on process A over HTTP at a fixed rate with a send
timestamp in each event, and prints p50/p99/max of receive time minus send time. Bounded: a few seconds
per broker, 127.0.0.1 only, stops by itself.

    .venv/bin/python bench/broker_latency.py [--brokers memory,redis,postgres] [--events 500] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import websockets

from fonana_ws.auth import create_token

SECRET = "bench-secret-" + "s" * 32
API_KEY = "bench-api-key-" + "k" * 32
URLS = {
    "memory": "memory://",
    "redis": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "postgres": os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start(broker_url: str, workdir: Path) -> tuple[subprocess.Popen, int]:
    workdir.mkdir(parents=True)  # noqa: ASYNC240 - once, before the server starts
    port = free_port()
    env = {
        **os.environ,
        "JWT_SECRET": SECRET,
        "WS_API_KEY": API_KEY,
        "BROADCAST_URL": broker_url,
        "WS_PORT": str(port),
        "FONANA_WS_DATA_DIR": str(workdir),
        "LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "fonana_ws", "serve"],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    async with httpx.AsyncClient() as http:
        for _ in range(200):
            try:
                if (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
                    return proc, port
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise SystemExit(f"server on {broker_url} did not become ready")


async def measure(broker: str, events: int, rate: float, subscribers: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        a, port_a = await start(URLS[broker], Path(tmp) / "a")
        b, port_b = (a, port_a) if broker == "memory" else await start(URLS[broker], Path(tmp) / "b")
        try:
            token = create_token(SECRET, "demo-subscriber", 600)
            sockets = [
                await websockets.connect(f"ws://127.0.0.1:{port_b}/ws?token={token}")
                for _ in range(subscribers)
            ]
            for ws in sockets:
                await ws.recv()
                await ws.send('{"type":"subscribe","channel":{"type":"creator","id":"demo-creator"}}')
                await ws.recv()
            latencies: list[float] = []

            async def read(ws: websockets.ClientConnection) -> None:
                for _ in range(events):
                    frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                    latencies.append(time.time() - frame["t"])

            readers = [asyncio.create_task(read(ws)) for ws in sockets]
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_a}", headers=headers) as http:
                for i in range(events):
                    event = {"type": "creator_updated", "i": i, "t": time.time()}
                    response = await http.post(
                        "/api/publish", json={"channel": "creator_demo-creator", "event": event}
                    )
                    response.raise_for_status()
                    await asyncio.sleep(1 / rate)
            await asyncio.gather(*readers)
            for ws in sockets:
                await ws.close()
            return latencies
        finally:
            for proc in {a, b}:
                proc.terminate()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", default="memory,redis,postgres")
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--subscribers", type=int, default=10)
    args = parser.parse_args()
    print(f"{args.events} events at {args.rate:g}/s to {args.subscribers} subscribers on another process")
    print(f"{'broker':<10} {'deliveries':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for broker in args.brokers.split(","):
        lat = sorted(asyncio.run(measure(broker, args.events, args.rate, args.subscribers)))
        p50 = statistics.median(lat) * 1000
        p99 = lat[int(len(lat) * 0.99) - 1] * 1000
        print(f"{broker:<10} {len(lat):>10} {p50:>8.2f} {p99:>8.2f} {lat[-1] * 1000:>8.2f}")


if __name__ == "__main__":
    main()
