"""Churn soak: many short connections against a real server process, and its resources must stay flat.

``FONANA_WS_SOAK_SECONDS`` (60 by default; longer by hand) of 20 workers each looping: connect,
subscribe to a channel of its own (a fresh broker key every cycle) and sometimes a shared one, receive an
event published over ``POST /api/publish``, disconnect (mostly a closing handshake, every fifth time an
abrupt TCP abort). The first 15% of the time is a warm-up: then the clients stop, the server goes idle,
and its RSS (``/proc/<pid>/status`` VmRSS), open descriptors (``/proc/<pid>/fd``) and asyncio tasks
(``GET /stats`` ``tasks``) are taken; the same at the end. Tasks and descriptors must be back to the
warm-up level, no connection, channel or broker subscription left, RSS grown less than 10 MB (or 15%).

Traffic stays on 127.0.0.1; the figures are printed (``pytest -s`` or ``-rA``) and written to
``soak.txt`` in the test's tmp dir. Run longer: ``FONANA_WS_SOAK_SECONDS=600 pytest tests/test_soak.py -s``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets

from fonana_ws.auth import create_token

from .conftest import API_KEY, SECRET, ServerProcess

SOAK_SECONDS = float(os.environ.get("FONANA_WS_SOAK_SECONDS", "60"))
WORKERS = int(os.environ.get("FONANA_WS_SOAK_WORKERS", "20"))
WARMUP = 0.15
SAMPLE_EVERY = 3.0
RSS_SLACK_MB, RSS_SLACK_SHARE = 10.0, 0.15
FD_SLACK, TASK_SLACK = 3, 2

pytestmark = pytest.mark.timeout(int(SOAK_SECONDS) + 180)

USERS = ["demo-creator", "demo-subscriber", "demo-outsider"]
SHARED = {"type": "post", "postId": "demo-post-open"}
BAD_LINE = re.compile(r"Traceback \(most recent call last\)|^\S+ \S+ (ERROR|CRITICAL) ", re.M)


@dataclass
class Sample:
    at: float
    phase: str
    rss_kb: int
    fds: int
    stats: dict[str, Any]

    @property
    def tasks(self) -> int:
        return int(self.stats["tasks"])

    @property
    def rss_mb(self) -> float:
        return self.rss_kb / 1024


@dataclass
class Tally:
    cycles: int = 0
    aborts: int = 0
    failures: list[str] = field(default_factory=list)


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match.group(1))


async def sample(proc: ServerProcess, phase: str, started: float) -> Sample:
    """Read /proc first (so that the /stats request's own socket is not counted), then /stats."""
    pid = proc.proc.pid
    rss, fds = rss_kb(pid), len(os.listdir(f"/proc/{pid}/fd"))
    async with httpx.AsyncClient(base_url=proc.http_url, timeout=10) as http:
        stats = (await http.get("/stats", headers={"Connection": "close"})).json()
    return Sample(time.monotonic() - started, phase, rss, fds, stats)


async def idle(proc: ServerProcess, phase: str, started: float) -> Sample:
    """Wait until the server holds no connection, let closing sockets go (1 s grace), then sample."""
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(base_url=proc.http_url, timeout=10) as http:
        while True:
            stats = (await http.get("/stats", headers={"Connection": "close"})).json()
            if stats["connections"] == 0 and stats["connected_users"] == 0:
                break
            assert time.monotonic() < deadline, f"connections left after the clients stopped: {stats}"
            await asyncio.sleep(0.2)
    await asyncio.sleep(2.0)
    return await sample(proc, phase, started)


async def cycle(proc: ServerProcess, http: httpx.AsyncClient, worker: int, n: int, tally: Tally) -> None:
    user = USERS[(worker + n) % len(USERS)]
    token = create_token(SECRET, user, 600)
    ws = await websockets.connect(f"{proc.ws_url}?token={token}", open_timeout=10, close_timeout=2)
    try:
        first = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] == "connected", first
        own = {"type": "creator", "id": f"soak-{worker}-{n}"}
        channels = [own, SHARED] if n % 2 else [own]
        if n % 3 == 0:
            channels.append({"type": "notifications", "userId": user})
        for channel in channels:
            await ws.send(orjson.dumps({"type": "subscribe", "channel": channel}).decode())
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            while reply["type"] not in ("subscribed", "error"):  # an event of the shared channel
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["type"] == "subscribed", reply
        marker = f"{worker}-{n}"
        body = {"channel": f"creator_{own['id']}", "event": {"type": "soak_event", "marker": marker}}
        response = await http.post("/api/publish", json=body)
        assert response.status_code == 202, response.text
        if n % 4 == 1:  # and one to the shared channel, which the other workers in it receive too
            body = {"channel": "post_demo-post-open", "event": {"type": "soak_shared", "marker": marker}}
            assert (await http.post("/api/publish", json=body)).status_code == 202
        while True:
            frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame.get("type") == "soak_event" and frame.get("marker") == marker:
                break
        if n % 5 == 4:
            tally.aborts += 1
            ws.transport.abort()  # no closing handshake: the server finds out from the TCP end
        else:
            await ws.close()
        tally.cycles += 1
    finally:
        if ws.state is not websockets.State.CLOSED:
            ws.transport.abort()


async def load(proc: ServerProcess, seconds: float, tally: Tally, offset: int) -> None:
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=WORKERS, max_keepalive_connections=WORKERS)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=proc.http_url, headers=headers, timeout=10, limits=limits) as http:

        async def worker(w: int) -> None:
            n = offset
            while time.monotonic() < stop_at:
                try:
                    await cycle(proc, http, w, n, tally)
                except Exception as exc:
                    tally.failures.append(f"worker {w} cycle {n}: {type(exc).__name__}: {exc}")
                    if len(tally.failures) > 20:
                        raise
                n += 1

        await asyncio.gather(*(worker(w) for w in range(WORKERS)))


async def sampler(proc: ServerProcess, samples: list[Sample], phase: str, started: float) -> None:
    while True:
        await asyncio.sleep(SAMPLE_EVERY)
        samples.append(await sample(proc, phase, started))


async def run_phase(
    proc: ServerProcess,
    seconds: float,
    tally: Tally,
    offset: int,
    samples: list[Sample],
    phase: str,
    t0: float,
) -> None:
    watcher = asyncio.create_task(sampler(proc, samples, phase, t0))
    try:
        await load(proc, seconds, tally, offset)
    finally:
        watcher.cancel()
        try:
            await watcher
        except asyncio.CancelledError:
            pass


def table(rows: list[tuple[str, Sample, int]]) -> str:
    head = (
        f"{'point':<22}{'t (s)':>8}{'RSS (MB)':>10}{'fds':>6}{'tasks':>7}{'conns':>7}{'keys':>6}"
        f"{'broker subs':>13}{'cycles':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, s, cycles in rows:
        keys = sum(s.stats["channels"].values())
        lines.append(
            f"{name:<22}{s.at:>8.1f}{s.rss_mb:>10.1f}{s.fds:>6}{s.tasks:>7}{s.stats['connections']:>7}"
            f"{keys:>6}{s.stats['broker']['subscriptions']:>13}{cycles:>8}"
        )
    return "\n".join(lines)


async def test_churn_soak_leaves_resources_flat(tmp_path: Path) -> None:
    env = {
        "JWT_SECRET": SECRET,
        "WS_API_KEY": API_KEY,
        "FONANA_WS_DATA_DIR": str(tmp_path / "data"),
        "WS_HOST": "127.0.0.1",
        "LOG_LEVEL": "warning",  # one line per connection would be ~100k lines in a long soak
        # Every cycle publishes to a fresh key, and each key's history is kept WS_HISTORY_TTL after its
        # last event: short here, so that the soak also shows that kept history is let go of.
        "WS_HISTORY_TTL": "3",
    }
    warm_seconds = SOAK_SECONDS * WARMUP
    tally = Tally()
    samples: list[Sample] = []
    async with ServerProcess(env, tmp_path, inherit=False) as proc:
        t0 = time.monotonic()
        start = await idle(proc, "start", t0)
        await run_phase(proc, warm_seconds, tally, 0, samples, "warm-up", t0)
        warm_cycles = tally.cycles
        warm = await idle(proc, "warm-up idle", t0)
        loaded_from = len(samples)
        await run_phase(proc, SOAK_SECONDS - warm_seconds, tally, 10**6, samples, "soak", t0)
        end = await idle(proc, "end idle", t0)
        log = proc.log()

    under_load = samples[loaded_from:]
    peak = max(under_load, key=lambda s: s.rss_kb) if under_load else end
    rows = [("start (idle)", start, 0), ("warm-up done (idle)", warm, warm_cycles)]
    if under_load:
        rows += [("soak first sample", under_load[0], warm_cycles), ("soak peak RSS", peak, tally.cycles)]
        rows.append(("soak last sample", under_load[-1], tally.cycles))
    rows.append(("end (idle)", end, tally.cycles))
    elapsed = end.at - warm.at
    report = (
        f"churn soak: {SOAK_SECONDS:.0f} s, {WORKERS} workers, {tally.cycles} cycles "
        f"({tally.cycles / max(SOAK_SECONDS, 1):.0f}/s), {tally.aborts} abrupt disconnects, "
        f"{len(tally.failures)} failed cycles\n"
        + table(rows)
        + f"\nRSS warm-up -> end: {end.rss_mb - warm.rss_mb:+.2f} MB over {elapsed:.0f} s; "
        f"fds {end.fds - warm.fds:+d}; tasks {end.tasks - warm.tasks:+d}\n"
        + "samples (t, phase, RSS MB, fds, tasks, conns): "
        + "; ".join(
            f"{s.at:.0f} {s.phase} {s.rss_mb:.1f} {s.fds} {s.tasks} {s.stats['connections']}" for s in samples
        )
        + "\n"
    )
    print("\n" + report)
    (tmp_path / "soak.txt").write_text(report)
    print(f"(written to {tmp_path / 'soak.txt'})")

    assert not tally.failures, "\n".join(tally.failures[:20])
    assert tally.cycles > warm_cycles > 0
    assert not BAD_LINE.search(log), log[-5000:]
    assert end.stats["connections"] == 0 and end.stats["connected_users"] == 0
    assert sum(end.stats["channels"].values()) == 0, end.stats["channels"]
    assert end.stats["broker"]["subscriptions"] <= warm.stats["broker"]["subscriptions"], end.stats["broker"]
    assert end.fds <= warm.fds + FD_SLACK, (warm.fds, end.fds)
    assert end.tasks <= warm.tasks + TASK_SLACK, (warm.tasks, end.tasks)
    growth_mb = end.rss_mb - warm.rss_mb
    assert growth_mb < max(RSS_SLACK_MB, RSS_SLACK_SHARE * warm.rss_mb), report
