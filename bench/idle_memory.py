"""RSS per idle authenticated connection (N connections x 2 subscriptions), and where it goes.

Starts ``fonana-ws serve`` (embedded SQLite, memory broker, LOG_LEVEL=warning, presence and history at
their defaults) through ``bench/ours.py``, opens N connections from this process (a separate process from
the server), each authenticated and subscribed to its ``notifications_U`` and one ``creator_C``, lets it
settle, and reads the server's RSS before and after.

``--breakdown`` also asks the server, through SIGUSR1 and a ``sitecustomize`` planted on its path, for a
dump before and after: per-type counts and ``sys.getsizeof`` totals over the gc-tracked objects, and with
``--tracemalloc`` a snapshot whose diff is grouped by file:line (tracemalloc inflates RSS: the RSS figure
of such a run is not comparable).

    .venv/bin/python bench/idle_memory.py --n 5000
    .venv/bin/python bench/idle_memory.py --n 2000 --breakdown --tracemalloc
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import jwt
import orjson
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ours import Ours  # noqa: E402

SECRET = "fonana-bench-secret-0123456789abcdef"
API_KEY = "fonana-bench-api-key"

# Planted as sitecustomize.py on the server's PYTHONPATH: a SIGUSR1 dump of what the heap holds.
SITECUSTOMIZE = r"""
import os, signal
if os.environ.get("FONANA_MEMDUMP"):
    import gc, pickle, sys, tracemalloc
    if os.environ.get("FONANA_TRACEMALLOC"):
        tracemalloc.start(int(os.environ["FONANA_TRACEMALLOC"]))
    _n = [0]
    def _dump(signum, frame):
        _n[0] += 1
        base = os.environ["FONANA_MEMDUMP"] + f".{_n[0]}"
        gc.collect()
        types = {}
        for o in gc.get_objects():
            t = type(o)
            name = f"{t.__module__}.{t.__qualname__}"
            c = types.setdefault(name, [0, 0])
            c[0] += 1
            c[1] += sys.getsizeof(o, 0)
            try:  # some objects (pydantic's mocks) raise on any attribute
                d = None if isinstance(o, type) else object.__getattribute__(o, "__dict__")
            except Exception:
                d = None
            if type(d) is dict:
                c[1] += sys.getsizeof(d)
        snap = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        with open(base + ".tmp", "wb") as f:
            pickle.dump({"types": types, "snapshot": snap}, f)
        os.replace(base + ".tmp", base)
    signal.signal(signal.SIGUSR1, _dump)
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def server_pid(procs: list) -> int:
    """The Python process (taskset execs into it, so the Popen pid is the server)."""
    return procs[0].pid


async def open_one(url: str, uid: str, creator: str, wait_s: float) -> object:
    token = jwt.encode({"userId": uid, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    ws = await asyncio.wait_for(
        connect(f"{url}?token={token}", compression=None, max_queue=4, ping_interval=None), wait_s
    )
    want = {f"notifications_{uid}", f"creator_{creator}"}

    async def until(pred: object) -> None:
        while True:
            msg = orjson.loads(await ws.recv())
            if msg.get("type") == "error":
                raise RuntimeError(f"server error: {msg}")
            if pred(msg):  # type: ignore[operator]
                return

    await asyncio.wait_for(until(lambda m: m.get("type") == "connected"), wait_s)
    await ws.send(
        orjson.dumps({"type": "subscribe", "channel": {"type": "notifications", "userId": uid}}).decode()
    )
    await ws.send(orjson.dumps({"type": "subscribe", "channel": {"type": "creator", "id": creator}}).decode())

    def subscribed(m: dict) -> bool:
        if m.get("type") == "subscribed":
            want.discard((m.get("data") or {}).get("channelKey"))
        return not want

    await asyncio.wait_for(until(subscribed), wait_s)
    return ws


async def open_all(url: str, users: list[str], n: int, concurrency: int) -> list:
    sem = asyncio.Semaphore(concurrency)
    out: list = []
    failed: list[str] = []

    async def one(i: int) -> None:
        async with sem:
            try:
                out.append(await open_one(url, users[i % len(users)], users[0], 15.0))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failed.append(repr(exc)[:120])

    await asyncio.gather(*(one(i) for i in range(n)))
    if failed:
        print(f"{len(failed)} failed, e.g. {failed[0]}", file=sys.stderr)
    return out


def request_dump(pid: int, path: Path, k: int, timeout: float = 120.0) -> dict:
    os.kill(pid, signal.SIGUSR1)
    target = Path(f"{path}.{k}")
    deadline = time.monotonic() + timeout
    while not target.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("server did not write its dump")
        time.sleep(0.2)
    with target.open("rb") as f:
        return pickle.load(f)


def report_breakdown(before: dict, after: dict, n: int, top: int) -> None:
    rows = []
    for name, (cnt, size) in after["types"].items():
        c0, s0 = before["types"].get(name, (0, 0))
        if size - s0 > 0:
            rows.append((size - s0, cnt - c0, name))
    rows.sort(reverse=True)
    print(f"\nper-type (gc-tracked objects, getsizeof incl. __dict__), per connection, N={n}:")
    print(f"{'bytes/conn':>10} {'objs/conn':>9}  type")
    for size, cnt, name in rows[:top]:
        print(f"{size / n:10.1f} {cnt / n:9.2f}  {name}")
    print(f"{sum(r[0] for r in rows) / n:10.1f} {'':9}  total of growing types")
    s0, s1 = before["snapshot"], after["snapshot"]
    if s0 is None or s1 is None:
        return
    stats = s1.compare_to(s0, "lineno")
    print(f"\ntracemalloc diff by file:line, per connection, N={n}:")
    total = 0
    for st in stats[:top]:
        fr = st.traceback[0]
        short = "/".join(Path(fr.filename).parts[-3:])
        print(f"{st.size_diff / n:10.1f} B {st.count_diff / n:6.2f} blocks  {short}:{fr.lineno}")
    total = sum(st.size_diff for st in stats)
    print(f"{total / n:10.1f} B total traced growth per connection")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="connections")
    p.add_argument("--user-prefix", default="bench-u")
    p.add_argument("--user-count", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--settle", type=float, default=3.0, help="seconds before each RSS reading")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cpus", default="0")
    p.add_argument("--breakdown", action="store_true", help="per-type dump from the server")
    p.add_argument("--tracemalloc", action="store_true", help="with --breakdown: tracemalloc diff too")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    port = a.port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    users = [f"{a.user_prefix}{i}" for i in range(a.user_count)]
    env: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="idle-mem-"))
    dump = tmp / "dump"
    if a.breakdown:
        (tmp / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env["PYTHONPATH"] = f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        env["FONANA_MEMDUMP"] = str(dump)
        if a.tracemalloc:
            env["FONANA_TRACEMALLOC"] = "1"
    ours = Ours(port, SECRET, API_KEY, a.cpus, users, env=env)
    url, _http, _pids = ours.start()
    try:
        pid = server_pid(ours.procs)
        time.sleep(a.settle)
        before = request_dump(pid, dump, 1) if a.breakdown else None
        rss0 = rss_kb(pid)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        t0 = time.monotonic()
        conns = loop.run_until_complete(open_all(url, users, a.n, a.concurrency))
        wall = time.monotonic() - t0
        time.sleep(a.settle)
        rss1 = rss_kb(pid)
        alive = sum(1 for c in conns if c.state.name == "OPEN")  # type: ignore[attr-defined]
        after = request_dump(pid, dump, 2) if a.breakdown else None
        per = (rss1 - rss0) / alive if alive else float("nan")
        result = {"n": a.n, "open": alive, "rss_before_kb": rss0, "rss_after_kb": rss1, "kb_per_conn": per}
        print(
            f"RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB with {alive}/{a.n} open "
            f"(opened in {wall:.1f} s): {per:.2f} KB per connection"
            + (" [tracemalloc on: not comparable]" if a.tracemalloc else "")
        )
        if a.json:
            print(json.dumps(result))
        if before is not None and after is not None:
            report_breakdown(before, after, alive, a.top)
        loop.run_until_complete(asyncio.gather(*(c.close() for c in conns), return_exceptions=True))  # type: ignore[attr-defined]
        loop.close()
    finally:
        ours.stop()


if __name__ == "__main__":
    main()
