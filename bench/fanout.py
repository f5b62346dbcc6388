#!/usr/bin/env python
"""Fan-out benchmark for any server that speaks the Fonana real-time protocol.

Drives one or more targets (fonana-ws, a Node.js peer given with --peer-src, ...) over loopback and
measures: sustainable deliveries/s, latency at a fixed rate, server CPU per delivery, server memory per
idle authenticated connection, and connections per second. See bench/README.md.

Design: the WebSocket clients live in worker processes pinned to the client CPUs (core 1 by default); the
orchestrator (same CPUs) mints tokens, publishes events through the HTTP publish API on an open-loop
schedule and reads the server's CPU time and RSS from /proc. Every published event carries
``"_bench": [step, seq, t_us]`` where ``t_us`` is the scheduled send time on CLOCK_MONOTONIC (shared by all
processes of the machine); receivers compute latency = receive time - scheduled send time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from ours import Ours, accepted_by

CLK_TCK = os.sysconf("SC_CLK_TCK")
EVENT_SIZE = 256
GEN_SATURATED = 0.85  # share of the generator's cores above which its numbers are suspect
NOISY = 0.10  # CPU of foreign processes (cores) above which a measurement is flagged as disturbed
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}

_loads = orjson.loads
_dumps = orjson.dumps
_mono_ns = time.monotonic_ns


# ---------------------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_cpus(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            cpus.extend(range(int(a), int(b) + 1))
        else:
            cpus.append(int(part))
    return sorted(set(cpus))


def raise_nofile(want: int = 1 << 20) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = hard if hard != resource.RLIM_INFINITY else want
    new = min(new, want) if hard == resource.RLIM_INFINITY else new
    if new > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def channel_for_key(key: str) -> dict:
    """`post_P` -> {"type":"post","postId":P}, `creator_C` -> {"type":"creator","id":C}, ..."""
    kind, _, ident = key.partition("_")
    if not ident:
        raise ValueError(f"bad channel key {key!r}: expected post_P, creator_C, notifications_U or feed_U")
    if kind == "post":
        return {"type": "post", "postId": ident}
    if kind == "creator":
        return {"type": "creator", "id": ident}
    if kind in ("notifications", "feed"):
        return {"type": kind, "userId": ident}
    raise ValueError(f"unknown channel kind in {key!r}")


def percentile(sorted_vals: Any, q: float) -> float | None:
    n = len(sorted_vals)
    if n == 0:
        return None
    i = min(n - 1, max(0, math.ceil(q / 100.0 * n) - 1))
    return sorted_vals[i]


def fmt_num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def fmt_ms(us: float | None) -> str:
    if us is None:
        return "-"
    ms = us / 1000.0
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


# ---------------------------------------------------------------------------------------------------------
# /proc probes: server CPU time and RSS, PID lookup by listening port


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def find_listening_pids(port: int) -> list[int]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    pids: list[int] = []
    if not inodes:
        return pids
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                try:
                    if os.readlink(f"/proc/{d}/fd/{fd}") in inodes:
                        pids.append(int(d))
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return sorted(pids)


class ServerProbe:
    """CPU time and RSS of a server: the given PIDs and all their descendants (uvicorn workers, ...)."""

    def __init__(self, roots: list[int]):
        self.roots = roots
        self.pids = list(roots)
        self.refresh()

    def refresh(self) -> None:
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                st = _stat_fields(int(d))
                if st:
                    children.setdefault(int(st[1]), []).append(int(d))
        seen: list[int] = []
        todo = list(self.roots)
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.append(p)
                todo.extend(children.get(p, []))
        self.pids = seen

    def alive(self) -> bool:
        return any(_stat_fields(p) is not None for p in self.roots)

    def cpu(self) -> tuple[float, float]:
        u = s = 0
        for p in self.pids:
            st = _stat_fields(p)
            if st:
                u += int(st[11])
                s += int(st[12])
        return u / CLK_TCK, s / CLK_TCK

    def cpu_by_pid(self) -> dict[int, float]:
        """User + system seconds of each process: how the work spread over ``--workers``."""
        out: dict[int, float] = {}
        for p in self.pids:
            st = _stat_fields(p)
            if st:
                out[p] = (int(st[11]) + int(st[12])) / CLK_TCK
        return out

    def rss_kb(self) -> int:
        total = 0
        for p in self.pids:
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            except OSError:
                continue
        return total

    def affinity(self) -> str:
        try:
            for line in Path(f"/proc/{self.roots[0]}/status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    def nofile(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.roots[0]}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        except (OSError, ValueError):
            pass
        return None

    def describe(self) -> str:
        names = []
        for p in self.pids:
            try:
                names.append(f"{p}:{Path(f'/proc/{p}/comm').read_text().strip()}")
            except OSError:
                names.append(str(p))
        return ", ".join(names)


def is_mp_helper(pid: int) -> bool:
    """multiprocessing's resource tracker: a child of uvicorn's --workers master that serves nothing."""
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = vals
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def self_cpu2() -> tuple[float, float]:
    t = os.times()
    return t.user, t.system


def cpu_sum(items: list[dict]) -> tuple[float, float]:
    """(user, sys) of the worker replies plus this process."""
    u, s = self_cpu2()
    for it in items:
        u += it["cpu2"][0]
        s += it["cpu2"][1]
    return u, s


# ---------------------------------------------------------------------------------------------------------
# worker process: WebSocket clients


class WState:
    """Per-worker counters for the current step (module-global for a cheap hot path)."""

    step = -1
    count = 0
    stale = 0
    lat: array = array("q")


S = WState()


class ConnectFailed(Exception):
    pass


class _Control:
    """Control-message plumbing shared by the client backends (the hot path is in each backend)."""

    def _ctl_init(self) -> None:
        self.ctrl: list[dict] = []
        self.waiter: asyncio.Future | None = None
        self.n = 0
        self.sx = 0
        self.closed = False
        self.close_info = ""

    def _control(self, d: Any) -> None:
        if isinstance(d, dict):
            self.ctrl.append(d)
            w = self.waiter
            if w is not None and not w.done():
                w.set_result(None)

    def _gone(self, info: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_info = self.close_info or info
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def expect(self, want: str, key: str | None, wait_s: float) -> dict:
        """Wait for a control frame of type `want` (and channelKey `key`); raise on error/close."""
        deadline = time.monotonic() + wait_s
        while True:
            for i, d in enumerate(self.ctrl):
                t = d.get("type")
                if t == want:
                    if key is None or (d.get("data") or {}).get("channelKey") == key:
                        del self.ctrl[i]
                        return d
                elif t == "error":
                    del self.ctrl[i]
                    raise ConnectFailed(f"server error: {orjson.dumps(d.get('data')).decode()[:200]}")
            if self.closed:
                raise ConnectFailed(f"closed before {want}: {self.close_info}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectFailed(f"timeout waiting for {want}")
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, left)
            except TimeoutError:
                pass
            finally:
                self.waiter = None


def _make_picows_backend():
    import picows

    TEXT = picows.WSMsgType.TEXT
    CLOSE = picows.WSMsgType.CLOSE
    CONT = picows.WSMsgType.CONTINUATION

    class PicowsConn(picows.WSListener, _Control):
        def __init__(self) -> None:
            super().__init__()
            self._ctl_init()
            self.transport = None
            self.frag: bytearray | None = None

        def on_ws_connected(self, transport) -> None:
            self.transport = transport

        def on_ws_frame(self, transport, frame) -> None:
            mt = frame.msg_type
            if mt is TEXT and frame.fin:
                data = frame.get_payload_as_bytes()
            elif mt is TEXT or mt is CONT:
                if mt is TEXT:
                    self.frag = bytearray(frame.get_payload_as_bytes())
                    return
                if self.frag is None:
                    return
                self.frag += frame.get_payload_as_bytes()
                if not frame.fin:
                    return
                data = bytes(self.frag)
                self.frag = None
            elif mt is CLOSE:
                msg = frame.get_close_message()
                self.close_info = (
                    f"close {int(frame.get_close_code())} {(msg or b'').decode(errors='replace')}"
                )
                transport.send_close(frame.get_close_code())
                transport.disconnect()
                return
            else:
                return
            # hot path: one orjson parse per message
            d = _loads(data)
            try:
                b = d["_bench"]
            except (KeyError, TypeError):
                self._control(d)
                return
            st = S
            if b[0] == st.step:
                self.n += 1
                self.sx += b[1]
                st.count += 1
                st.lat.append(_mono_ns() // 1000 - b[2])
            else:
                st.stale += 1

        def on_ws_disconnected(self, transport) -> None:
            self._gone("disconnected")

        def send_json(self, obj: Any) -> None:
            self.transport.send(TEXT, _dumps(obj))

        def close(self) -> None:
            if self.transport is not None and not self.closed:
                self.closed = True
                self.close_info = "closed by client"
                with contextlib.suppress(Exception):
                    self.transport.send_close(picows.WSCloseCode.OK)
                    self.transport.disconnect()

    async def open_conn(url: str, wait_s: float) -> PicowsConn:
        try:
            _, listener = await picows.ws_connect(
                PicowsConn,
                url,
                websocket_handshake_timeout=wait_s,
                enable_auto_pong=True,
            )
        except picows.WSError as e:
            raise ConnectFailed(f"handshake: {type(e).__name__}: {str(e)[:150]}") from None
        except OSError as e:
            raise ConnectFailed(f"connect: {e.strerror or e}") from None
        return listener

    return open_conn


def _make_websockets_backend():
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    class WebsocketsConn(_Control):
        def __init__(self, ws) -> None:
            self._ctl_init()
            self.ws = ws
            self.task = asyncio.get_running_loop().create_task(self._reader())

        async def _reader(self) -> None:
            ws = self.ws
            st = S
            try:
                async for data in ws:
                    d = _loads(data)
                    try:
                        b = d["_bench"]
                    except (KeyError, TypeError):
                        self._control(d)
                        continue
                    if b[0] == st.step:
                        self.n += 1
                        self.sx += b[1]
                        st.count += 1
                        st.lat.append(_mono_ns() // 1000 - b[2])
                    else:
                        st.stale += 1
            except ConnectionClosed:
                pass
            finally:
                rc = getattr(ws.protocol, "close_rcvd", None)
                self._gone(f"close {rc.code} {rc.reason}" if rc else "disconnected")

        def send_json(self, obj: Any) -> None:
            asyncio.get_running_loop().create_task(self.ws.send(_dumps(obj).decode()))

        def close(self) -> None:
            if not self.closed:
                self.closed = True
                self.close_info = "closed by client"
                asyncio.get_running_loop().create_task(self.ws.close())

    async def open_conn(url: str, wait_s: float) -> WebsocketsConn:
        try:
            ws = await ws_connect(
                url, compression=None, ping_interval=None, open_timeout=wait_s, max_queue=None
            )
        except (InvalidHandshake, TimeoutError) as e:
            raise ConnectFailed(f"handshake: {type(e).__name__}: {str(e)[:150]}") from None
        except OSError as e:
            raise ConnectFailed(f"connect: {e.strerror or e}") from None
        return WebsocketsConn(ws)

    return open_conn


def _make_aiohttp_backend():
    import aiohttp

    session: dict[str, aiohttp.ClientSession] = {}

    class AiohttpConn(_Control):
        def __init__(self, ws) -> None:
            self._ctl_init()
            self.ws = ws
            self.task = asyncio.get_running_loop().create_task(self._reader())

        async def _reader(self) -> None:
            ws = self.ws
            st = S
            TEXT = aiohttp.WSMsgType.TEXT
            try:
                async for msg in ws:
                    if msg.type is not TEXT:
                        continue
                    d = _loads(msg.data)
                    try:
                        b = d["_bench"]
                    except (KeyError, TypeError):
                        self._control(d)
                        continue
                    if b[0] == st.step:
                        self.n += 1
                        self.sx += b[1]
                        st.count += 1
                        st.lat.append(_mono_ns() // 1000 - b[2])
                    else:
                        st.stale += 1
            finally:
                self._gone(f"close {ws.close_code}")

        def send_json(self, obj: Any) -> None:
            asyncio.get_running_loop().create_task(self.ws.send_str(_dumps(obj).decode()))

        def close(self) -> None:
            if not self.closed:
                self.closed = True
                self.close_info = "closed by client"
                asyncio.get_running_loop().create_task(self.ws.close())

    async def open_conn(url: str, wait_s: float) -> AiohttpConn:
        if "s" not in session:
            session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            ws = await session["s"].ws_connect(
                url, compress=0, autoping=True, heartbeat=None, timeout=aiohttp.ClientWSTimeout(ws_close=2)
            )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ConnectFailed(f"handshake: {type(e).__name__}: {str(e)[:150]}") from None
        except OSError as e:
            raise ConnectFailed(f"connect: {e.strerror or e}") from None
        return AiohttpConn(ws)

    return open_conn


BACKENDS = {
    "picows": _make_picows_backend,
    "websockets": _make_websockets_backend,
    "aiohttp": _make_aiohttp_backend,
}


class Worker:
    """Runs inside a worker process: holds connections in named groups, answers orchestrator commands."""

    def __init__(self, backend: str):
        self.open_conn = BACKENDS[backend]()
        self.groups: dict[str, list[tuple[Any, tuple]]] = {}

    async def _open_one(self, url: str, spec: tuple, wait_s: float) -> tuple[Any, float]:
        _uid, token, chans = spec
        sep = "&" if "?" in url else "?"
        t0 = time.monotonic()
        conn = await asyncio.wait_for(self.open_conn(f"{url}{sep}token={token}", wait_s), wait_s + 1)
        try:
            await conn.expect("connected", None, wait_s)
            t1 = time.monotonic()
            for ch, _key in chans:
                conn.send_json({"type": "subscribe", "channel": ch})
            for _ch, key in chans:
                await conn.expect("subscribed", key, wait_s)
        except BaseException:
            conn.close()
            raise
        return conn, t1 - t0

    async def cmd_open(
        self,
        group: str,
        url: str,
        specs: list,
        concurrency: int,
        conn_timeout: float,
        close_after: bool = False,
    ) -> dict:
        sem = asyncio.Semaphore(max(1, concurrency))
        lst = self.groups.setdefault(group, [])
        errors: Counter = Counter()
        times: list[float] = []
        opened: list[Any] = []

        async def one(spec: tuple) -> None:
            async with sem:
                try:
                    conn, dt = await self._open_one(url, spec, conn_timeout)
                except (ConnectFailed, TimeoutError, OSError) as e:
                    errors[str(e) or type(e).__name__] += 1
                    return
                times.append(dt)
                if close_after:
                    opened.append(conn)
                else:
                    lst.append((conn, spec))

        c0 = self_cpu()
        t_start = time.monotonic()
        await asyncio.gather(*(one(s) for s in specs))
        t_end = time.monotonic()
        cpu = self_cpu() - c0
        for c in opened:
            c.close()
        return {
            "ok": len(times),
            "failed": sum(errors.values()),
            "errors": dict(errors.most_common(5)),
            "times": times,
            "t_start": t_start,
            "t_end": t_end,
            "cpu": cpu,
        }

    async def cmd_reconnect(self, group: str, url: str, concurrency: int, conn_timeout: float) -> dict:
        lst = self.groups.get(group, [])
        dead = [(i, spec) for i, (c, spec) in enumerate(lst) if c.closed]
        sem = asyncio.Semaphore(max(1, concurrency))
        errors: Counter = Counter()

        async def one(i: int, spec: tuple) -> None:
            async with sem:
                try:
                    conn, _ = await self._open_one(url, spec, conn_timeout)
                except (ConnectFailed, TimeoutError, OSError) as e:
                    errors[str(e)] += 1
                    return
                lst[i] = (conn, spec)

        await asyncio.gather(*(one(i, s) for i, s in dead))
        return {"dead": len(dead), "failed": sum(errors.values()), "errors": dict(errors.most_common(3))}

    async def cmd_close(self, group: str) -> dict:
        lst = self.groups.pop(group, [])
        for c, _ in lst:
            c.close()
        await asyncio.sleep(0)
        return {"closed": len(lst)}

    async def cmd_reset(self, step: int) -> dict:
        S.step = step
        S.count = 0
        S.stale = 0
        S.lat = array("q")
        for lst in self.groups.values():
            for c, _ in lst:
                c.n = 0
                c.sx = 0
        return {"cpu2": self_cpu2(), "t": time.monotonic()}

    def _dead(self) -> int:
        return sum(1 for lst in self.groups.values() for c, _ in lst if c.closed)

    async def cmd_poll(self) -> dict:
        return {"count": S.count, "stale": S.stale, "cpu2": self_cpu2(), "dead": self._dead()}

    async def cmd_collect(self, group: str) -> dict:
        per_conn: Counter = Counter()
        closes: Counter = Counter()
        for c, _ in self.groups.get(group, []):
            per_conn[(c.n, c.sx)] += 1
            if c.closed:
                closes[c.close_info] += 1
        return {
            "count": S.count,
            "stale": S.stale,
            "lat": S.lat.tobytes(),
            "per_conn": dict(per_conn),
            "closes": dict(closes.most_common(5)),
            "dead": sum(closes.values()),
            "cpu2": self_cpu2(),
        }

    async def cmd_cpu(self) -> dict:
        return {"cpu2": self_cpu2()}


def worker_main(pipe, cpus: list[int], backend: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, cpus)
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        w = Worker(backend)
        stop = loop.create_future()

        async def handle(msg_id: int, cmd: str, kw: dict) -> None:
            try:
                if cmd == "quit":
                    res: Any = None
                    if not stop.done():
                        stop.set_result(None)
                else:
                    res = await getattr(w, f"cmd_{cmd}")(**kw)
                pipe.send((msg_id, True, res))
            except Exception as e:  # report to the orchestrator
                pipe.send((msg_id, False, f"{type(e).__name__}: {e}"))

        def readable() -> None:
            try:
                msg_id, cmd, kw = pipe.recv()
            except EOFError:
                if not stop.done():
                    stop.set_result(None)
                return
            loop.create_task(handle(msg_id, cmd, kw))

        loop.add_reader(pipe.fileno(), readable)
        # uvloop makes the fd non-blocking; Connection.recv/send need whole messages: restore blocking
        os.set_blocking(pipe.fileno(), True)
        await stop
        for g in list(w.groups):
            await w.cmd_close(g)
        await asyncio.sleep(0.2)

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


# ---------------------------------------------------------------------------------------------------------
# orchestrator side


class WorkerHandle:
    def __init__(self, ctx, idx: int, cpus: list[int], backend: str):
        self.idx = idx
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, cpus, backend), daemon=True)
        self.proc.start()
        child.close()
        self.pipe = parent
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.pipe.fileno(), self._readable)
        os.set_blocking(self.pipe.fileno(), True)

    def _readable(self) -> None:
        try:
            msg_id, ok, res = self.pipe.recv()
        except (EOFError, OSError):
            self.loop.remove_reader(self.pipe.fileno())
            for f in self.pending.values():
                if not f.done():
                    f.set_exception(RuntimeError(f"worker {self.idx} died"))
            return
        f = self.pending.pop(msg_id, None)
        if f is not None and not f.done():
            if ok:
                f.set_result(res)
            else:
                f.set_exception(RuntimeError(f"worker {self.idx}: {res}"))

    async def call(self, cmd: str, tmo: float = 60.0, **kw) -> Any:
        self.next_id += 1
        f = self.loop.create_future()
        self.pending[self.next_id] = f
        self.pipe.send((self.next_id, cmd, kw))
        return await asyncio.wait_for(f, tmo)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.pipe.send((0, "quit", {}))
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(1)


class HttpPublisher:
    """Minimal keep-alive HTTP/1.1 client for POST /api/publish (cheap: the generator must not limit)."""

    def __init__(self, http_url: str, path: str, api_key: str, max_conns: int = 32):
        u = urlsplit(http_url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.path = path
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.max_idle = 1.0
        self.sem = asyncio.Semaphore(max_conns)
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {api_key}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for _r, w, _t in idle:
            w.close()

    async def _read_response(self, r: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        head = await r.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = None
        chunked = False
        keep = not lines[0].startswith(b"HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection":
                keep = value != b"close"
        if chunked:
            body = bytearray()
            while True:
                size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await r.readuntil(b"\r\n")
                    break
                body += await r.readexactly(size)
                await r.readexactly(2)
            return status, bytes(body), keep
        if length is None:
            return status, await r.read(), False
        return status, await r.readexactly(length), keep

    async def _take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        now = time.monotonic()
        while self.idle:
            r, w, since = self.idle.pop()
            # servers close idle keep-alive connections (Node and uvicorn after 5 s): do not race them
            if now - since < self.max_idle and not w.is_closing() and not r.at_eof():
                return r, w, True
            w.close()
        r, w = await asyncio.open_connection(self.host, self.port)
        return r, w, False

    async def post(self, body: bytes) -> tuple[int, bytes]:
        async with self.sem:
            fresh_only = False
            while True:
                if fresh_only:
                    r, w = await asyncio.open_connection(self.host, self.port)
                    reused = False
                else:
                    r, w, reused = await self._take()
                try:
                    w.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
                    status, resp, keep = await self._read_response(r)
                except (ConnectionError, asyncio.IncompleteReadError) as e:
                    w.close()
                    # a reused connection the server closed meanwhile, nothing answered: retry on a fresh one
                    if reused and not getattr(e, "partial", b""):
                        fresh_only = True
                        continue
                    raise
                if keep:
                    self.idle.append((r, w, time.monotonic()))
                else:
                    w.close()
                return status, resp


@dataclass
class Target:
    name: str
    ws_url: str
    http_url: str
    pids: list[int] = field(default_factory=list)
    probe: ServerProbe | None = None
    results: dict = field(default_factory=dict)


@dataclass
class StepResult:
    step: int
    offered: float  # deliveries/s offered
    ev_rate: float
    duration: float
    published: int
    publish_errors: dict
    expected: int
    received: int
    late_after_drain: int
    stale_before: int
    dead: int
    bad_conns: int
    p50: float | None
    p90: float | None
    p99: float | None
    p999: float | None
    max: float | None
    trend: float | None  # µs: median latency of the last fifth of the deliveries minus the first fifth
    pub_p50: float | None  # µs from an event's scheduled time to the publish API's answer
    pub_p99: float | None
    pub_max: float | None
    drain_s: float
    window_s: float
    achieved: float  # deliveries/s received over the window
    gen_cpu_s: float
    gen_user_s: float
    gen_sys_s: float
    gen_share: float  # of the generator's cores
    srv_user_s: float
    srv_sys_s: float
    srv_share: float  # of one core
    other_share: float  # CPU used by other processes of the machine (noise), in cores
    steal_share: float  # CPU stolen by the hypervisor, in cores
    pub_lag_ms: float
    delivered_reported: int | None
    passed: bool
    why: str
    srv_by_pid: dict = field(default_factory=dict)  # pid -> CPU seconds over the window


class Bench:
    def __init__(self, args: argparse.Namespace, workers: list[WorkerHandle], users: list[str]):
        self.a = args
        self.workers = workers
        self.users = users
        self.tokens: dict[str, str] = {}
        self.step_id = 0
        self.client_cores = max(1, len(parse_cpus(args.client_cpus)))
        self.channel_key = args.channel
        self.channel = channel_for_key(args.channel)
        kind, _, ident = args.channel.partition("_")
        self.post_id = ident if kind == "post" else None
        self.pad = self._compute_pad()

    # ----- tokens / specs

    def token(self, uid: str) -> str:
        t = self.tokens.get(uid)
        if t is None:
            import jwt

            t = jwt.encode({"userId": uid, "exp": int(time.time()) + 3600}, self.a.secret, algorithm="HS256")
            self.tokens[uid] = t
        return t

    def user(self, i: int) -> str:
        return self.users[i % len(self.users)]

    def fan_specs(self, n: int) -> list[tuple]:
        kind, _, ident = self.channel_key.partition("_")
        specs = []
        for i in range(n):
            uid = ident if kind in ("notifications", "feed") else self.user(i)
            specs.append((uid, self.token(uid), [(self.channel, self.channel_key)]))
        return specs

    def split(self, specs: list) -> list[list]:
        k = len(self.workers)
        return [specs[i::k] for i in range(k)]

    async def all(self, cmd: str, tmo: float = 60.0, per_worker: list[dict] | None = None, **kw) -> list:
        calls = []
        for i, w in enumerate(self.workers):
            extra = per_worker[i] if per_worker else {}
            calls.append(w.call(cmd, tmo=tmo, **kw, **extra))
        return await asyncio.gather(*calls)

    async def open_group(
        self, group: str, target: Target, specs: list, concurrency: int, close_after: bool = False
    ) -> dict:
        parts = self.split(specs)
        per = max(1, concurrency // len(self.workers))
        timeout = max(60.0, len(specs) / 50.0)
        res = await self.all(
            "open",
            tmo=timeout + 30,
            per_worker=[{"specs": p} for p in parts],
            group=group,
            url=target.ws_url,
            concurrency=per,
            conn_timeout=self.a.connect_timeout,
            close_after=close_after,
        )
        errors: Counter = Counter()
        for r in res:
            errors.update(r["errors"])
        times = sorted(t for r in res for t in r["times"])
        return {
            "ok": sum(r["ok"] for r in res),
            "failed": sum(r["failed"] for r in res),
            "errors": dict(errors.most_common(5)),
            "times": times,
            "wall": max(r["t_end"] for r in res) - min(r["t_start"] for r in res),
            "gen_cpu": sum(r["cpu"] for r in res),
        }

    async def gen_cpu(self) -> float:
        res = await self.all("cpu", tmo=10)
        return sum(cpu_sum(res))

    # ----- events

    def _compute_pad(self) -> str:
        ev = self._event(0, 0, int(time.monotonic() * 1e6), "")
        return "x" * max(0, EVENT_SIZE - len(_dumps(ev)))

    def _event(self, step: int, seq: int, ts_us: int, pad: str) -> dict:
        ev: dict[str, Any] = {"type": self.a.event_type}
        if self.post_id is not None:
            ev["postId"] = self.post_id
        ev["_bench"] = [step, seq, ts_us]
        ev["pad"] = pad
        return ev

    async def publish_schedule(
        self, pub: HttpPublisher, step: int, ev_rate: float, duration: float
    ) -> dict[str, Any]:
        n = max(1, round(ev_rate * duration))
        ok = 0
        seq_sum = 0
        errors: Counter = Counter()
        delivered: list[int] = []
        answer_us: list[int] = []  # scheduled send time -> HTTP answer
        pending: set[asyncio.Task] = set()
        max_lag = 0.0
        key = self.channel_key
        pad = self.pad
        inflight = self.a.publish_inflight

        async def one(seq: int, body: bytes, ti: float) -> None:
            nonlocal ok, seq_sum
            try:
                status, resp = await pub.post(body)
            except Exception as e:  # any failure of one publish is counted, never fatal to the step
                errors[type(e).__name__] += 1
                return
            answer_us.append(int((time.monotonic() - ti) * 1e6))
            if 200 <= status < 300:
                ok += 1
                seq_sum += seq
                with contextlib.suppress(Exception):
                    d = _loads(resp)
                    if isinstance(d, dict) and isinstance(d.get("delivered"), int):
                        delivered.append(d["delivered"])
            else:
                errors[f"HTTP {status} {resp[:80].decode(errors='replace')}"] += 1

        t0 = time.monotonic() + 0.01
        for seq in range(n):
            ti = t0 + seq / ev_rate
            d = ti - time.monotonic()
            if d > 0.0005:
                await asyncio.sleep(d)
            elif -d > max_lag:
                max_lag = -d
            body = _dumps({"channel": key, "event": self._event(step, seq, int(ti * 1e6), pad)})
            task = asyncio.get_running_loop().create_task(one(seq, body, ti))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if len(pending) >= inflight:
                await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
        if pending:
            _done, still = await asyncio.wait(set(pending), timeout=self.a.publish_timeout)
            for t in still:
                t.cancel()
                errors["publish timeout"] += 1
        return {
            "n": n,
            "ok": ok,
            "seq_sum": seq_sum,
            "errors": dict(errors),
            "t_end": time.monotonic(),
            "lag": max_lag,
            "delivered": sum(delivered) if delivered else None,
            "answer_us": sorted(answer_us),
        }

    # ----- one fan-out step

    async def run_step(self, target: Target, pub: HttpPublisher, nsubs: int, rate: float, duration: float):
        self.step_id += 1
        step = self.step_id
        ev_rate = rate / nsubs
        prev = await self.all("poll", tmo=10)
        stale_before = sum(p["stale"] for p in prev)
        resets = await self.all("reset", tmo=10, step=step)
        gu0, gs0 = cpu_sum(resets)
        target.probe.refresh()
        su0, ss0 = target.probe.cpu()
        by_pid0 = target.probe.cpu_by_pid()
        mb0, mst0 = machine_cpu()
        t0 = time.monotonic()
        pubres = await self.publish_schedule(pub, step, ev_rate, duration)
        expected = pubres["ok"] * nsubs
        # drain: wait for every expected delivery, at most --drain seconds after the last publish returned
        deadline = pubres["t_end"] + self.a.drain
        received = 0
        dead = 0
        while True:
            polls = await self.all("poll", tmo=10)
            received = sum(p["count"] for p in polls)
            dead = sum(p["dead"] for p in polls)
            if received >= expected or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        t1 = time.monotonic()
        su1, ss1 = target.probe.cpu()
        by_pid1 = target.probe.cpu_by_pid()
        mb1, mst1 = machine_cpu()
        gu1, gs1 = cpu_sum(polls)
        window = t1 - t0
        other = (mb1 - mb0) - (su1 - su0 + ss1 - ss0) - (gu1 - gu0 + gs1 - gs0)
        col = await self.all("collect", tmo=30, group="fan")
        lat = array("q")
        per_conn: Counter = Counter()
        closes: Counter = Counter()
        first = array("q")
        last = array("q")
        for c in col:
            arr = array("q")
            arr.frombytes(c["lat"])
            k = len(arr) // 5
            if k:
                first.extend(arr[:k])
                last.extend(arr[-k:])
            lat.extend(arr)
            per_conn.update(c["per_conn"])
            closes.update(c["closes"])
        lat_sorted = sorted(lat)
        # backlog trend: median latency of the last fifth of the deliveries minus that of the first fifth
        trend = None
        if first and last:
            trend = percentile(sorted(last), 50) - percentile(sorted(first), 50)
        want = (pubres["ok"], pubres["seq_sum"])
        bad = sum(k for pc, k in per_conn.items() if tuple(pc) != want)
        received_total = sum(c["count"] for c in col)
        why = []
        if pubres["errors"]:
            why.append(f"publish errors {pubres['errors']}")
        if received < expected:
            why.append(f"lost/late {expected - received}")
        if received > expected:
            why.append(f"duplicates {received - expected}")
        if dead:
            why.append(f"{dead} conns closed ({dict(closes.most_common(2))})")
        if bad and not why:
            why.append(f"{bad} conns got the wrong set of events")
        p99 = percentile(lat_sorted, 99)
        if p99 is not None and p99 > self.a.p99_max_ms * 1000:
            why.append(f"p99 {p99 / 1000:.0f} ms > {self.a.p99_max_ms:g} ms")
        if p99 is None:
            why.append("no deliveries")
        srv_u, srv_s = su1 - su0, ss1 - ss0
        return StepResult(
            step=step,
            offered=rate,
            ev_rate=ev_rate,
            duration=duration,
            published=pubres["ok"],
            publish_errors=pubres["errors"],
            expected=expected,
            received=received,
            late_after_drain=received_total - received,
            stale_before=stale_before,
            dead=dead,
            bad_conns=bad,
            p50=percentile(lat_sorted, 50),
            p90=percentile(lat_sorted, 90),
            p99=p99,
            p999=percentile(lat_sorted, 99.9),
            max=lat_sorted[-1] if lat_sorted else None,
            trend=trend,
            pub_p50=percentile(pubres["answer_us"], 50),
            pub_p99=percentile(pubres["answer_us"], 99),
            pub_max=pubres["answer_us"][-1] if pubres["answer_us"] else None,
            drain_s=t1 - pubres["t_end"],
            window_s=window,
            achieved=received / window if window > 0 else 0.0,
            gen_cpu_s=gu1 - gu0 + gs1 - gs0,
            gen_user_s=gu1 - gu0,
            gen_sys_s=gs1 - gs0,
            gen_share=(gu1 - gu0 + gs1 - gs0) / window / self.client_cores,
            srv_user_s=srv_u,
            srv_sys_s=srv_s,
            srv_share=(srv_u + srv_s) / window,
            other_share=max(0.0, other) / window,
            steal_share=(mst1 - mst0) / window,
            pub_lag_ms=pubres["lag"] * 1000,
            delivered_reported=pubres["delivered"],
            passed=not why,
            why="; ".join(why),
            srv_by_pid={p: by_pid1[p] - by_pid0.get(p, 0.0) for p in by_pid1},
        )

    async def settle(self, target: Target, max_s: float = 15.0, quiet: float = 0.3) -> None:
        """Wait until no delivery arrives and the server is (nearly) idle for `quiet` seconds."""
        t_end = time.monotonic() + max_s
        last = None
        while time.monotonic() < t_end:
            polls = await self.all("poll", tmo=10)
            tot = sum(p["count"] + p["stale"] for p in polls)
            u0, s0 = target.probe.cpu()
            await asyncio.sleep(quiet)
            u1, s1 = target.probe.cpu()
            polls = await self.all("poll", tmo=10)
            tot2 = sum(p["count"] + p["stale"] for p in polls)
            busy = (u1 + s1 - u0 - s0) / quiet
            if tot2 == tot and busy < 0.25 and last is not None:
                return
            last = tot2

    async def ensure_subscribers(self, target: Target, nsubs: int) -> None:
        polls = await self.all("poll", tmo=10)
        if sum(p["dead"] for p in polls):
            res = await self.all(
                "reconnect",
                tmo=120,
                group="fan",
                url=target.ws_url,
                concurrency=max(1, self.a.connect_concurrency // len(self.workers)),
                conn_timeout=self.a.connect_timeout,
            )
            log(f"[{target.name}] reconnected subscribers: {res}")

    def step_line(self, target: Target, what: str, r: StepResult) -> None:
        verdict = "PASS" if r.passed else f"FAIL ({r.why})"
        if r.gen_share >= GEN_SATURATED:
            verdict += " [generator saturated]"
        if r.other_share >= NOISY or r.steal_share >= NOISY:
            other, steal = r.other_share * 100, r.steal_share * 100
            verdict += f" [NOISY: other processes {other:.0f}%, steal {steal:.0f}% of a core]"
        log(
            f"[{target.name}] {what} step {r.step}: offered {r.offered:,.0f}/s ({r.ev_rate:.1f} ev/s) "
            f"got {r.received:,}/{r.expected:,} p50 {fmt_ms(r.p50)} p99 {fmt_ms(r.p99)} "
            f"max {fmt_ms(r.max)} trend {fmt_ms(r.trend)} ms, publish answered p99 {fmt_ms(r.pub_p99)} "
            f"max {fmt_ms(r.pub_max)} ms | server {r.srv_share * 100:.0f}% core, "
            f"generator {r.gen_share * 100:.0f}% ({r.gen_cpu_s / max(1, r.received) * 1e6:.1f} µs/delivery, "
            f"{r.gen_sys_s / max(1e-9, r.gen_cpu_s) * 100:.0f}% kernel) | {verdict}"
        )

    # ----- measurements

    async def fanout_measurements(self, target: Target, which: list[str]) -> None:
        a = self.a
        nsubs = a.subscribers
        await self.wait_quiet(target)
        log(f"[{target.name}] opening {nsubs} subscribers of {self.channel_key} ...")
        op = await self.open_group("fan", target, self.fan_specs(nsubs), a.connect_concurrency)
        if op["failed"]:
            await self.all("close", tmo=30, group="fan")
            raise RuntimeError(f"{op['failed']} of {nsubs} subscribers failed: {op['errors']}")
        log(f"[{target.name}] {nsubs} subscribers ready in {op['wall']:.1f}s")
        self.record_spread(target)
        pub = HttpPublisher(target.http_url, a.publish_path, a.api_key, max_conns=a.publish_conns)
        try:
            # warm-up: a short low-rate step (JITs, caches, keep-alive connections)
            w = await self.run_step(target, pub, nsubs, min(a.rate_start, 5 * nsubs), 1.0)
            if w.published == 0:
                raise RuntimeError(f"warm-up: no event could be published: {w.publish_errors}")
            if w.received == 0:
                raise RuntimeError(
                    f"warm-up: {w.published} events published, none delivered to the subscribers of "
                    f"{self.channel_key} (wrong channel key? publish API answered {w.delivered_reported})"
                )
            await self.settle(target)
            if "latency" in which:
                r = await self.fixed_rate(
                    target, pub, nsubs, "latency", nsubs * a.latency_events, a.latency_seconds
                )
                target.results["latency"] = r.__dict__
            if "cpu" in which:
                r = await self.fixed_rate(target, pub, nsubs, "cpu", a.cpu_rate, a.cpu_seconds)
                d = r.received or 1
                target.results["cpu"] = {
                    **r.__dict__,
                    "us_per_delivery": (r.srv_user_s + r.srv_sys_s) / d * 1e6,
                    "us_user": r.srv_user_s / d * 1e6,
                    "us_sys": r.srv_sys_s / d * 1e6,
                    "gen_us_per_delivery": r.gen_cpu_s / d * 1e6,
                    "gen_us_user": r.gen_user_s / d * 1e6,
                    "gen_us_sys": r.gen_sys_s / d * 1e6,
                }
            if "sustain" in which:
                await self.sustain(target, pub, nsubs)
        finally:
            await pub.close()
            await self.all("close", tmo=30, group="fan")
            await asyncio.sleep(0.5)

    def record_spread(self, target: Target) -> None:
        """Which server process holds the subscribers: with ``serve --workers`` the kernel chose."""
        target.probe.refresh()
        if len(target.probe.pids) < 2:
            return
        port = urlsplit(target.ws_url).port or 80
        held = accepted_by(target.probe.pids, port)
        log(f"[{target.name}] connections per server process: {held}")
        target.results["processes"] = {
            # one root is a --workers master; several (--ours-procs) are peers, none of them a master
            "root": target.pids[0] if len(target.pids) == 1 else None,
            "conns": held,
            "helpers": [p for p in target.probe.pids if is_mp_helper(p)],
        }

    async def fixed_rate(
        self, target: Target, pub: HttpPublisher, nsubs: int, what: str, rate: float, seconds: float
    ) -> StepResult:
        """One step at a fixed rate; with --wait-quiet, repeated once if other processes disturbed it."""
        r = await self.run_step(target, pub, nsubs, rate, seconds)
        self.step_line(target, what, r)
        await self.settle(target)
        await self.ensure_subscribers(target, nsubs)
        if self.a.wait_quiet > 0 and (r.other_share >= NOISY or r.steal_share >= NOISY):
            await self.wait_quiet(target)
            r2 = await self.run_step(target, pub, nsubs, rate, seconds)
            self.step_line(target, f"{what} (repeat)", r2)
            await self.settle(target)
            await self.ensure_subscribers(target, nsubs)
            if r2.other_share + r2.steal_share <= r.other_share + r.steal_share:
                r = r2
        return r

    async def sustain(self, target: Target, pub: HttpPublisher, nsubs: int) -> None:
        a = self.a
        budget_end = time.monotonic() + a.sustain_budget
        step_cost = a.step_seconds + a.drain + 1.0
        lo: StepResult | None = None
        hi: StepResult | None = None
        rate = float(a.rate_start)
        steps: list[StepResult] = []
        extended = 0.0
        stop_reason = "budget"
        while True:
            if time.monotonic() + step_cost > budget_end:
                stop_reason = "time budget"
                break
            r = await self.run_step(target, pub, nsubs, rate, a.step_seconds)
            steps.append(r)
            self.step_line(target, "sustain", r)
            noisy = r.other_share >= NOISY or r.steal_share >= NOISY
            if not r.passed and noisy and time.monotonic() + step_cost < budget_end:
                # other processes disturbed a failing step: repeat it once on a quieter machine
                await self.settle(target)
                await self.ensure_subscribers(target, nsubs)
                # time spent waiting for other processes does not count against the budget (capped)
                waited = await self.wait_quiet(target)
                extra = min(waited, a.sustain_budget - extended)
                extended += extra
                budget_end += extra
                r = await self.run_step(target, pub, nsubs, rate, a.step_seconds)
                steps.append(r)
                self.step_line(target, "sustain (repeat)", r)
            if r.passed:
                lo = r if lo is None or r.offered > lo.offered else lo
            else:
                hi = r if hi is None or r.offered < hi.offered else hi
            await self.settle(target)
            await self.ensure_subscribers(target, nsubs)
            if lo is not None and hi is not None:
                if hi.offered / lo.offered <= a.precision:
                    stop_reason = "converged"
                    break
                rate = math.sqrt(lo.offered * hi.offered)
            elif lo is not None:
                rate = lo.offered * a.growth
                if rate > a.rate_max:
                    stop_reason = "rate max"
                    break
            else:
                rate = hi.offered / a.growth
                if rate < a.rate_min:
                    stop_reason = "nothing passed"
                    break
        # the generator, not the server, may have been the limit: report it rather than hide it (the
        # server's share is of one core; a server pinned to several, e.g. --workers on 0-1, has more)
        affinity = target.probe.affinity()
        srv_cores = len(parse_cpus(affinity)) if affinity != "?" else 1
        gen_bound = hi is not None and hi.gen_share >= GEN_SATURATED and hi.srv_share < 0.9 * srv_cores
        target.results["sustain"] = {
            "best": lo.__dict__ if lo else None,
            "first_fail": hi.__dict__ if hi else None,
            "steps": [s.__dict__ for s in steps],
            "stop": stop_reason,
            "generator_bound": gen_bound,
        }

    async def memory(self, target: Target) -> None:
        a = self.a
        m = a.memory_conns
        creator = a.creator_id or self.users[0]
        specs = []
        for i in range(m):
            uid = self.user(i)
            chans = [
                ({"type": "notifications", "userId": uid}, f"notifications_{uid}"),
                ({"type": "creator", "id": creator}, f"creator_{creator}"),
            ]
            specs.append((uid, self.token(uid), chans))
        await asyncio.sleep(a.memory_settle)
        target.probe.refresh()
        rss0 = target.probe.rss_kb()
        log(f"[{target.name}] memory: server RSS {rss0 / 1024:.1f} MiB; opening {m} connections x 2 channels")
        op = await self.open_group("mem", target, specs, a.connect_concurrency)
        await asyncio.sleep(a.memory_settle)
        target.probe.refresh()
        rss1 = target.probe.rss_kb()
        polls = await self.all("poll", tmo=10)
        dead = sum(p["dead"] for p in polls)
        n = op["ok"] - dead
        per = (rss1 - rss0) / n if n > 0 else None
        log(
            f"[{target.name}] memory: RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB with {n} open "
            f"({op['failed']} failed, {dead} dropped): {fmt_num(per, 2)} KB/connection"
        )
        target.results["memory"] = {
            "conns": n,
            "failed": op["failed"],
            "errors": op["errors"],
            "dropped": dead,
            "rss_before_kb": rss0,
            "rss_after_kb": rss1,
            "kb_per_conn": per,
            "open_wall_s": op["wall"],
        }
        await self.all("close", tmo=60, group="mem")
        await asyncio.sleep(1.0)

    async def connect_rate(self, target: Target) -> None:
        a = self.a
        k = a.connect_count
        specs = [(self.user(i), self.token(self.user(i)), []) for i in range(k)]
        target.probe.refresh()
        u0, s0 = target.probe.cpu()
        g0 = self_cpu()
        m0, _ = machine_cpu()
        log(f"[{target.name}] connect: {k} connections, concurrency {a.connect_concurrency}")
        op = await self.open_group("conn", target, specs, a.connect_concurrency, close_after=True)
        u1, s1 = target.probe.cpu()
        g1 = self_cpu()
        m1, _ = machine_cpu()
        wall = op["wall"]
        times = op["times"]
        rate = op["ok"] / wall if wall > 0 else None
        gen = op["gen_cpu"] + g1 - g0
        res = {
            "count": k,
            "ok": op["ok"],
            "failed": op["failed"],
            "errors": op["errors"],
            "wall_s": wall,
            "per_s": rate,
            "p50_ms": (percentile(times, 50) or 0) * 1000 if times else None,
            "p99_ms": (percentile(times, 99) or 0) * 1000 if times else None,
            "srv_cpu_s": (u1 - u0) + (s1 - s0),
            "srv_share": ((u1 - u0) + (s1 - s0)) / wall if wall > 0 else None,
            "gen_share": gen / wall / self.client_cores if wall > 0 else None,
            # includes the workers' close handshakes after the timed window: an upper bound
            "other_share": max(0.0, (m1 - m0) - (u1 - u0 + s1 - s0) - gen) / wall if wall > 0 else None,
        }
        log(
            f"[{target.name}] connect: {op['ok']}/{k} in {wall:.2f}s = {fmt_num(rate)}/s, handshake p50 "
            f"{fmt_num(res['p50_ms'], 1)} ms p99 {fmt_num(res['p99_ms'], 1)} ms, server "
            f"{(res['srv_share'] or 0) * 100:.0f}% core, generator {(res['gen_share'] or 0) * 100:.0f}%, "
            f"other processes {(res['other_share'] or 0) * 100:.0f}%"
            + (f", errors {op['errors']}" if op["failed"] else "")
        )
        target.results["connect"] = res
        await asyncio.sleep(1.0)

    async def foreign_load(self, target: Target, window: float = 1.0) -> float:
        """CPU (in cores) used by processes other than the server and this benchmark, over `window`."""
        m0, _ = machine_cpu()
        g0 = await self.gen_cpu()
        u0, s0 = target.probe.cpu()
        t0 = time.monotonic()
        await asyncio.sleep(window)
        m1, _ = machine_cpu()
        g1 = await self.gen_cpu()
        u1, s1 = target.probe.cpu()
        return max(0.0, (m1 - m0) - (g1 - g0) - (u1 - u0 + s1 - s0)) / (time.monotonic() - t0)

    async def wait_quiet(self, target: Target) -> float:
        """Warn when other processes use the CPU; with --wait-quiet N, wait up to N s for them to stop.

        Returns the seconds spent waiting."""
        t0 = time.monotonic()
        deadline = t0 + self.a.wait_quiet
        while True:
            load = await self.foreign_load(target)
            if load < NOISY:
                return time.monotonic() - t0
            if time.monotonic() >= deadline:
                log(
                    f"[{target.name}] WARNING: other processes use {load * 100:.0f}% of a core: "
                    "expect noisy numbers (steps will say NOISY)"
                )
                return time.monotonic() - t0
            log(f"[{target.name}] waiting for a quiet machine: others use {load * 100:.0f}% of a core")
            await asyncio.sleep(2.0)

    async def run_target(self, target: Target, which: list[str]) -> None:
        target.probe = ServerProbe(target.pids)
        log(
            f"[{target.name}] server pids {target.probe.describe()} pinned to CPUs "
            f"{target.probe.affinity()}, nofile {target.probe.nofile()}"
        )
        client = set(parse_cpus(self.a.client_cpus))
        srv = target.probe.affinity()
        with contextlib.suppress(ValueError):
            if client & set(parse_cpus(srv)):
                log(f"[{target.name}] WARNING: server CPUs {srv} overlap the generator's {sorted(client)}")
        lim = target.probe.nofile()
        need = max(self.a.memory_conns, self.a.subscribers, self.a.connect_count) + 100
        if lim is not None and lim < need:
            log(f"[{target.name}] WARNING: server fd limit {lim} < {need}: connections will fail")
        t0 = time.monotonic()
        steps = [
            ("memory", self.memory),
            ("connect", self.connect_rate),
        ]
        for name, fn in steps:
            if name in which:
                await self.wait_quiet(target)
                try:
                    await asyncio.wait_for(fn(target), self.a.measure_timeout)
                except Exception as e:
                    log(f"[{target.name}] {name} FAILED: {type(e).__name__}: {e}")
                    target.results[name] = {"error": f"{type(e).__name__}: {e}"}
                    await self.all("close", tmo=60, group="mem" if name == "memory" else "conn")
        fan = [w for w in ("latency", "cpu", "sustain") if w in which]
        if fan:
            budget = self.a.measure_timeout + (self.a.sustain_budget if "sustain" in fan else 0)
            try:
                await asyncio.wait_for(self.fanout_measurements(target, fan), budget + 60)
            except Exception as e:
                log(f"[{target.name}] fan-out FAILED: {type(e).__name__}: {e}")
                for w in fan:
                    target.results.setdefault(w, {"error": f"{type(e).__name__}: {e}"})
                with contextlib.suppress(Exception):
                    await self.all("close", tmo=60, group="fan")
        log(f"[{target.name}] done in {time.monotonic() - t0:.0f}s")


# ---------------------------------------------------------------------------------------------------------
# the Node.js peer


class Peer:
    """A Node.js peer (``server.js`` + ``package.json``), copied to its own folder, installed, pinned."""

    def __init__(self, args: argparse.Namespace, name: str = "peer", src: str | None = None, port: int = 0):
        self.a = args
        self.name = name
        self.src = src if src is not None else args.peer_src
        self.port = port or args.peer_port
        self.dir = Path(args.peer_dir) if name == "peer" else Path(f"{args.peer_dir}-{name}")
        self.proc: subprocess.Popen | None = None
        self.logf = None

    def prepare(self) -> None:
        if not self.src:
            raise SystemExit(
                "--spawn-peer needs --peer-src DIR (or BENCH_PEER_SRC): the peer's server.js folder"
            )
        peer_src = Path(self.src)
        if not (peer_src / "server.js").is_file():
            raise SystemExit(f"peer {self.name} {peer_src}: no server.js there")
        self.dir.mkdir(parents=True, exist_ok=True)
        changed = False
        for name in ("server.js", "package.json", "README.md", ".npmrc"):
            src = peer_src / name
            dst = self.dir / name
            if src.exists() and (not dst.exists() or dst.read_bytes() != src.read_bytes()):
                changed = changed or name in ("package.json", ".npmrc")
                if dst.exists():
                    dst.chmod(0o644)
                shutil.copyfile(src, dst)
                dst.chmod(0o644)
        if changed or not (self.dir / "node_modules").exists():
            log(f"peer: npm install in {self.dir} ...")
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=self.dir,
                check=True,
                timeout=300,
                stdout=sys.stderr,
            )

    def start(self) -> Target:
        a = self.a
        busy = find_listening_pids(self.port)
        if busy:
            raise RuntimeError(f"port {self.port} is already taken by PID(s) {busy}: use --peer-port")
        env = dict(os.environ, JWT_SECRET=a.secret, API_KEY=a.api_key, PORT=str(self.port), HOST="127.0.0.1")
        self.logf = open(self.dir / "peer.log", "ab")  # noqa: SIM115
        cmd = ["node", "server.js"]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", a.server_cpus, *cmd]
        self.proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer exited with {self.proc.returncode}; see {self.dir / 'peer.log'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(
                f"peer {self.name} did not start listening in 15 s; see {self.dir / 'peer.log'}"
            )
        log(f"{self.name}: pid {self.proc.pid} on 127.0.0.1:{self.port}, CPUs {a.server_cpus}")
        return Target(
            self.name,
            f"ws://127.0.0.1:{self.port}/ws",
            f"http://127.0.0.1:{self.port}",
            pids=[self.proc.pid],
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(2)
            log("peer: stopped")
        if self.logf:
            self.logf.close()


# ---------------------------------------------------------------------------------------------------------
# report


def report(targets: list[Target], args: argparse.Namespace) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        Console = Table = None  # noqa: N806

    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn) -> None:
        vals = []
        for t in targets:
            try:
                vals.append(fn(t.results))
            except (KeyError, TypeError):
                vals.append("-")
        rows.append((label, vals))

    def err(res: dict, key: str) -> str | None:
        r = res.get(key)
        if r is None:
            return "-"
        if "error" in r:
            return "error: " + r["error"][:60]
        return None

    def sustain(res: dict) -> str:
        e = err(res, "sustain")
        if e:
            return e
        s = res["sustain"]
        b = s["best"]
        if not b:
            return "none passed"
        txt = f"{b['offered']:,.0f}/s (p99 {fmt_ms(b['p99'])} ms)"
        if s["generator_bound"]:
            txt += " ≥ generator-bound"
        return txt

    def sustain_fail(res: dict) -> str:
        e = err(res, "sustain")
        if e:
            return e
        f = res["sustain"]["first_fail"]
        if not f:
            return f"none failed ({res['sustain']['stop']})"
        return f"{f['offered']:,.0f}/s: {f['why'][:70]}"

    def sustain_cpu(res: dict) -> str:
        e = err(res, "sustain")
        if e:
            return e
        b = res["sustain"]["best"]
        return (
            f"server {b['srv_share'] * 100:.0f}% core, generator {b['gen_share'] * 100:.0f}%, "
            f"other {b['other_share'] * 100:.0f}%"
        )

    def lat(res: dict) -> str:
        e = err(res, "latency")
        if e:
            return e
        r = res["latency"]
        loss = r["expected"] - r["received"]
        return (
            f"{fmt_ms(r['p50'])} / {fmt_ms(r['p99'])} / {fmt_ms(r['max'])} ms"
            + (f", LOST {loss}" if loss else "")
            + ("" if r["passed"] else " (FAIL)")
        )

    def lat_cpu(res: dict) -> str:
        e = err(res, "latency")
        if e:
            return e
        r = res["latency"]
        return (
            f"server {r['srv_share'] * 100:.0f}% core, generator {r['gen_share'] * 100:.0f}%, "
            f"other {r['other_share'] * 100:.0f}%"
        )

    def cpu(res: dict) -> str:
        e = err(res, "cpu")
        if e:
            return e
        r = res["cpu"]
        return f"{r['us_per_delivery']:.2f} µs (user {r['us_user']:.2f} + kernel {r['us_sys']:.2f})"

    def cpu_share(res: dict) -> str:
        e = err(res, "cpu")
        if e:
            return e
        r = res["cpu"]
        ok = "" if r["passed"] else f" [{r['why'][:50]}]"
        return (
            f"server {r['srv_share'] * 100:.0f}% core, generator {r['gen_share'] * 100:.0f}% "
            f"({r['gen_us_per_delivery']:.2f} µs/delivery), other {r['other_share'] * 100:.0f}%{ok}"
        )

    def mem(res: dict) -> str:
        e = err(res, "memory")
        if e:
            return e
        r = res["memory"]
        grow = (r["rss_after_kb"] - r["rss_before_kb"]) / 1024
        txt = f"{fmt_num(r['kb_per_conn'], 2)} KB ({r['conns']} conns, +{grow:.1f} MiB)"
        if r["failed"] or r["dropped"]:
            txt += f" [{r['failed']} failed, {r['dropped']} dropped]"
        return txt

    def conn(res: dict) -> str:
        e = err(res, "connect")
        if e:
            return e
        r = res["connect"]
        txt = f"{fmt_num(r['per_s'])}/s (p50 {fmt_num(r['p50_ms'], 1)} ms, p99 {fmt_num(r['p99_ms'], 1)} ms)"
        if r["failed"]:
            txt += f" [{r['failed']} failed]"
        return txt

    def conn_cpu(res: dict) -> str:
        e = err(res, "connect")
        if e:
            return e
        r = res["connect"]
        return (
            f"server {(r['srv_share'] or 0) * 100:.0f}% core, generator {(r['gen_share'] or 0) * 100:.0f}%, "
            f"other {(r['other_share'] or 0) * 100:.0f}%"
        )

    a = args
    add(f"1. sustainable deliveries/s ({a.subscribers} subs, p99≤{a.p99_max_ms:g} ms, no loss)", sustain)
    add("   first failing step", sustain_fail)
    add("   CPU at the best step", sustain_cpu)
    add(
        f"2. latency p50/p99/max @ {a.subscribers}×{a.latency_events:g} ev/s = "
        f"{a.subscribers * a.latency_events:,.0f}/s",
        lat,
    )
    add("   CPU during it", lat_cpu)
    add(f"3. server CPU per delivery @ {a.cpu_rate:,.0f}/s", cpu)
    add("   CPU during it", cpu_share)
    add(f"4. server RSS per idle connection (2 channels, {a.memory_conns} conns)", mem)
    add(f"5. connects/s ({a.connect_count}, concurrency {a.connect_concurrency})", conn)
    add("   CPU during it", conn_cpu)

    which = set(a.only)
    keep = {
        "sustain": ("1.", "   first", "   CPU at the best"),
        "latency": ("2.",),
        "cpu": ("3.",),
        "memory": ("4.",),
        "connect": ("5.",),
    }
    filtered: list[tuple[str, list[str]]] = []
    current = None
    for label, vals in rows:
        for k, prefixes in keep.items():
            if label.startswith(prefixes[0]):
                current = k
        if current in which:
            filtered.append((label, vals))

    title = (
        f"fan-out benchmark: client={a.client}, generator CPUs {a.client_cpus}, "
        f"{len(parse_cpus(a.client_cpus))} core(s), {a.workers} worker(s), event {EVENT_SIZE} B"
    )
    if Table is not None:
        console = Console(width=None if sys.stdout.isatty() else 180)
        table = Table(title=title, show_lines=False)
        table.add_column("measurement", style="bold")
        for t in targets:
            table.add_column(t.name)
        for label, vals in filtered:
            table.add_row(label, *vals)
        console.print(table)
        for t in targets:
            s = t.results.get("sustain")
            if not s or "steps" not in s:
                continue
            st = Table(title=f"{t.name}: sustain steps (stop: {s['stop']})")
            for col in (
                "offered/s",
                "ev/s",
                "received",
                "p50 ms",
                "p99 ms",
                "max ms",
                "trend ms",
                "server core",
                "gen cores",
                "other",
                "result",
            ):
                st.add_column(col)
            for r in s["steps"]:
                st.add_row(
                    f"{r['offered']:,.0f}",
                    f"{r['ev_rate']:.1f}",
                    f"{r['received']:,}/{r['expected']:,}",
                    fmt_ms(r["p50"]),
                    fmt_ms(r["p99"]),
                    fmt_ms(r["max"]),
                    fmt_ms(r["trend"]),
                    f"{r['srv_share'] * 100:.0f}%",
                    f"{r['gen_share'] * 100:.0f}%",
                    f"{r['other_share'] * 100:.0f}%",
                    "pass" if r["passed"] else r["why"][:60],
                )
            console.print(st)
    else:
        print(title)
        for label, vals in filtered:
            print(f"{label:<70} " + " | ".join(vals))


# ---------------------------------------------------------------------------------------------------------
# CLI


QUICK = {
    "subscribers": 200,
    "step_seconds": 1.5,
    "drain": 1.0,
    "sustain_budget": 20.0,
    "latency_seconds": 3.0,
    "cpu_seconds": 3.0,
    "cpu_rate": 20000,
    "memory_conns": 500,
    "memory_settle": 1.5,
    "connect_count": 200,
    "connect_concurrency": 50,
    "rate_start": 5000,
    "user_count": 200,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fanout.py",
        description="Fan-out benchmark for servers speaking the Fonana real-time protocol (loopback only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("targets")
    g.add_argument(
        "--target",
        action="append",
        default=None,
        metavar="NAME=WS_URL,HTTP_URL",
        help="a server to measure, e.g. ours=ws://127.0.0.1:3002/ws,http://127.0.0.1:3002 (repeatable)",
    )
    g.add_argument(
        "--pid",
        action="append",
        default=None,
        metavar="NAME=PID",
        help="server PID of a target (repeatable); none = the process listening on the target's port",
    )
    g.add_argument(
        "--secret", default=os.environ.get("JWT_SECRET"), help="HS256 secret for tokens [$JWT_SECRET]"
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("WS_API_KEY") or os.environ.get("API_KEY"),
        help="publish API key [$WS_API_KEY]",
    )
    g.add_argument("--publish-path", default="/api/publish", help="path of the HTTP publish API")
    g.add_argument(
        "--spawn-peer", action="store_true", help="start the Node.js peer (target 'peer') and stop it"
    )
    p.add_argument(
        "--spawn-ours",
        action="store_true",
        help="start fonana-ws (target 'ours') on a throwaway SQLite seeded with the bench users, and stop it",
    )
    p.add_argument("--ours-port", type=int, default=8102, help="port for --spawn-ours (and the next ones)")
    p.add_argument(
        "--ours-checkout",
        action="append",
        metavar="NAME=DIR",
        help="start the fonana-ws of a checkout (DIR/.venv/bin/python, e.g. the commit before a change) as "
        "target NAME; twice (or with --spawn-ours) gives before/after in one run (repeatable)",
    )
    p.add_argument(
        "--ours-variant",
        action="append",
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="also start this checkout's fonana-ws with these settings on top, as target NAME (with "
        "--spawn-ours: the same server with and without them, e.g. history-off:WS_HISTORY_TTL=0; repeatable)",
    )
    p.add_argument(
        "--ours-procs",
        type=int,
        default=1,
        help="--spawn-ours processes sharing --ours-broker: publish on the first, subscribe on the last",
    )
    p.add_argument(
        "--ours-workers",
        type=int,
        default=1,
        help="run --spawn-ours as one `fonana-ws serve --workers N` (needs --ours-broker redis://...): the "
        "processes share one port and the kernel spreads the connections and publishes over them",
    )
    p.add_argument(
        "--ours-broker",
        default="memory://",
        help="BROADCAST_URL for --spawn-ours (e.g. redis://127.0.0.1:6379/0)",
    )
    g.add_argument("--peer-port", type=int, default=8101, help="port of the spawned peer")
    g.add_argument(
        "--peer-src",
        default=os.environ.get("BENCH_PEER_SRC"),
        help="the Node.js peer's source folder (server.js, package.json), e.g. the team's bench-peer",
    )
    g.add_argument(
        "--peer-dir", default="/tmp/fonana-bench-peer", help="where the peer is copied and installed"
    )
    g.add_argument(
        "--peer",
        action="append",
        metavar="NAME=DIR",
        help="one more Node.js peer to start as target NAME, e.g. uws=PATH/TO/bench-peer-uws (repeatable; "
        "ports after --peer-port, folders --peer-dir-NAME)",
    )
    g.add_argument("--server-cpus", default="0", help="CPUs for the spawned peer (taskset -c)")

    g = p.add_argument_group("users and channels")
    g.add_argument("--users", help="comma-separated user ids")
    g.add_argument("--user-ids-file", help="file with one user id per line")
    g.add_argument("--user-prefix", default="bench-u", help="ids PREFIX0..PREFIX{N-1}")
    g.add_argument("--user-count", type=int, default=1000, help="connections cycle through the users")
    g.add_argument("--channel", default="post_bench", help="fan-out channel key (post_P, creator_C, ...)")
    g.add_argument("--creator-id", help="creator channel for the memory test; none = the first user id")
    g.add_argument("--event-type", default="post_updated", help="type of the published events")

    g = p.add_argument_group("generator")
    g.add_argument(
        "--client", default="picows", choices=sorted(BACKENDS), help="WebSocket client implementation"
    )
    g.add_argument("--client-cpus", default="1", help="CPUs for the generator processes")
    g.add_argument("--workers", type=int, help="client processes; none = one per client CPU")
    g.add_argument("--connect-concurrency", type=int, default=100, help="connections being opened at once")
    g.add_argument(
        "--connect-timeout", type=float, default=15.0, help="seconds for connect + connected + subscribed"
    )
    g.add_argument("--publish-conns", type=int, default=16, help="keep-alive HTTP connections for publishing")
    g.add_argument(
        "--publish-inflight", type=int, default=64, help="publish requests awaiting an answer, at most"
    )
    g.add_argument("--publish-timeout", type=float, default=15.0, help="seconds to wait for publish answers")

    g = p.add_argument_group("measurements")
    g.add_argument(
        "--only",
        default="sustain,latency,cpu,memory,connect",
        help="comma list of: sustain, latency, cpu, memory, connect",
    )
    g.add_argument("--quick", action="store_true", help="small smoke run (200 subscribers, short steps)")
    g.add_argument("--subscribers", type=int, default=2000, help="subscribers of the fan-out channel")
    g.add_argument("--p99-max-ms", type=float, default=250.0, help="latency bar of a sustainable step")
    g.add_argument("--rate-start", type=float, default=10000, help="first sustain step, deliveries/s")
    g.add_argument("--rate-min", type=float, default=500, help="give up below this rate (deliveries/s)")
    g.add_argument("--rate-max", type=float, default=3_000_000, help="stop ramping above this rate")
    g.add_argument("--growth", type=float, default=2.0, help="ramp factor until the first failure")
    g.add_argument("--precision", type=float, default=1.1, help="stop bisecting when fail/pass ≤ this")
    g.add_argument("--step-seconds", type=float, default=3.0, help="publishing time of one sustain step")
    g.add_argument(
        "--drain", type=float, default=2.0, help="seconds to wait for late deliveries after a step"
    )
    g.add_argument("--sustain-budget", type=float, default=60.0, help="seconds for the sustain search")
    g.add_argument("--latency-events", type=float, default=10.0, help="events/s for the latency measurement")
    g.add_argument("--latency-seconds", type=float, default=10.0, help="duration of the latency measurement")
    g.add_argument("--cpu-rate", type=float, default=40000, help="deliveries/s for the CPU measurement")
    g.add_argument("--cpu-seconds", type=float, default=8.0, help="duration of the CPU measurement")
    g.add_argument(
        "--memory-conns", type=int, default=5000, help="idle connections for the memory measurement"
    )
    g.add_argument("--memory-settle", type=float, default=3.0, help="seconds before each RSS reading")
    g.add_argument(
        "--connect-count", type=int, default=1000, help="connections for the connect-rate measurement"
    )
    g.add_argument("--measure-timeout", type=float, default=120.0, help="hard limit per measurement")
    g.add_argument("--json", help="write all results to this JSON file")
    g.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement wait up to SECONDS for other processes to leave the CPUs idle",
    )

    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**QUICK)
    a = p.parse_args(argv)
    a.only = [w.strip() for w in a.only.split(",") if w.strip()]
    a.target = a.target or []
    a.pid = a.pid or []
    bad = set(a.only) - {"sustain", "latency", "cpu", "memory", "connect"}
    if bad:
        p.error(f"unknown measurement(s) in --only: {', '.join(sorted(bad))}")
    a.ours_variant = [parse_variant(p, spec) for spec in a.ours_variant or []]
    if a.spawn_peer or a.peer or a.spawn_ours or a.ours_checkout or a.ours_variant:
        a.secret = a.secret or "fonana-bench-secret-0123456789abcdef"
        a.api_key = a.api_key or "bench-api-key-0123456789"
    if not a.secret or not a.api_key:
        p.error("--secret and --api-key are required (or $JWT_SECRET / $WS_API_KEY, or --spawn-peer)")
    a.ours_checkout = a.ours_checkout or []
    if (
        not a.target
        and not a.spawn_peer
        and not a.peer
        and not a.spawn_ours
        and not a.ours_checkout
        and not a.ours_variant
    ):
        p.error("give at least one --target NAME=WS_URL,HTTP_URL, --spawn-peer or --spawn-ours")
    if a.workers is None:
        a.workers = len(parse_cpus(a.client_cpus))
    return a


def ours_name(a: argparse.Namespace) -> str:
    """The --spawn-ours target's name: how many processes, and how they are reached."""
    broker = a.ours_broker.split(":")[0]
    if a.ours_workers > 1:
        return f"ours --workers {a.ours_workers} ({broker})"
    if a.ours_procs > 1:
        return f"ours x{a.ours_procs} ({broker})"
    return "ours"


def port_past(port: int, taken: set[int]) -> int:
    """``port``, or the first port above the ``taken`` ones if it is one of them.

    A peer on our port would answer our readiness probe and all of our traffic, while our process died
    of the taken port: the "ours" column would then measure that peer again.
    """
    return max(taken) + 1 if port in taken else port


def parse_variant(p: argparse.ArgumentParser, spec: str) -> tuple[str, dict[str, str]]:
    """``NAME:VAR=VALUE[,VAR=VALUE]`` -> (NAME, {VAR: VALUE}); a value cannot hold a comma."""
    name, _, assignments = spec.partition(":")
    env: dict[str, str] = {}
    for item in assignments.split(","):
        var, eq, value = item.strip().partition("=")
        if not eq or not var.isidentifier():
            p.error(f"bad --ours-variant {spec!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
        env[var] = value
    if not name or name == "ours":
        p.error(f"bad --ours-variant {spec!r}: it needs a name of its own (not 'ours')")
    return name, env


def load_users(a: argparse.Namespace) -> list[str]:
    if a.users:
        users = [u.strip() for u in a.users.split(",") if u.strip()]
    elif a.user_ids_file:
        users = [u.strip() for u in Path(a.user_ids_file).read_text().splitlines() if u.strip()]
    else:
        users = [f"{a.user_prefix}{i}" for i in range(a.user_count)]
    if not users:
        raise SystemExit("no user ids")
    return users


def parse_targets(a: argparse.Namespace) -> list[Target]:
    targets = []
    pids: dict[str, list[int]] = {}
    for spec in a.pid:
        name, _, pid = spec.partition("=")
        pids.setdefault(name, []).append(int(pid))
    for spec in a.target:
        name, _, urls = spec.partition("=")
        ws_url, _, http_url = urls.partition(",")
        if not name or not ws_url or not http_url:
            raise SystemExit(f"bad --target {spec!r}: expected NAME=WS_URL,HTTP_URL")
        for u in (ws_url, http_url):
            if urlsplit(u).hostname not in LOOPBACK:
                raise SystemExit(f"--target {name}: {u} is not loopback (this benchmark reads /proc)")
        t = Target(name, ws_url, http_url, pids=pids.get(name, []))
        if not t.pids:
            port = urlsplit(ws_url).port or 80
            t.pids = find_listening_pids(port)
            if not t.pids:
                raise SystemExit(f"--target {name}: no process listens on port {port}; give --pid {name}=PID")
        targets.append(t)
    return targets


async def amain(a: argparse.Namespace, targets: list[Target], users: list[str]) -> None:
    ctx = mp.get_context("spawn")
    cpus = parse_cpus(a.client_cpus)
    workers = [WorkerHandle(ctx, i, cpus, a.client) for i in range(a.workers)]
    loop = asyncio.get_running_loop()
    for w in workers:
        w.attach(loop)
    bench = Bench(a, workers, users)
    try:
        await asyncio.gather(*(w.call("cpu", tmo=30) for w in workers))
        log(
            f"generator: {a.workers} {a.client} worker(s) on CPUs {a.client_cpus}; event size "
            f"{len(_dumps(bench._event(0, 0, int(time.monotonic() * 1e6), bench.pad)))} B"
        )
        for t in targets:
            await bench.run_target(t, a.only)
    finally:
        for w in workers:
            w.stop()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    raise_nofile()
    users = load_users(a)
    peers = [Peer(a)] if a.spawn_peer else []
    for i, spec in enumerate(a.peer or [], 1):
        name, _, folder = spec.partition("=")
        if not name or not folder or name == "peer":
            raise SystemExit(f"bad --peer {spec!r}: need NAME=DIR (NAME not 'peer')")
        peers.append(Peer(a, name, folder, a.peer_port + i))
    a.ours_port = port_past(a.ours_port, {peer.port for peer in peers})
    ours = (
        Ours(
            a.ours_port,
            a.secret,
            a.api_key,
            a.server_cpus,
            users,
            a.ours_broker,
            a.ours_procs,
            workers=a.ours_workers,
        )
        if a.spawn_ours
        else None
    )
    others: list[tuple[str, Ours]] = []
    for i, spec in enumerate(a.ours_checkout, 1):
        name, _, folder = spec.partition("=")
        python = Path(folder) / ".venv" / "bin" / "python"
        if not name or not python.is_file():
            raise SystemExit(f"bad --ours-checkout {spec!r}: need NAME=DIR with DIR/.venv/bin/python")
        port = a.ours_port + 10 * i
        others.append(
            (name, Ours(port, a.secret, a.api_key, a.server_cpus, users, a.ours_broker, 1, str(python)))
        )
    # Variants of this checkout: as many processes (--ours-procs / --ours-workers) and the same broker as
    # --spawn-ours, so that the only difference is their settings. On Redis they share its pub/sub with
    # "ours" (it has no namespace), harmless since targets are measured one after the other and an idle
    # target has no clients.
    for i, (name, env) in enumerate(a.ours_variant, len(others) + 1):
        port = a.ours_port + 10 * i
        variant = Ours(
            port,
            a.secret,
            a.api_key,
            a.server_cpus,
            users,
            a.ours_broker,
            a.ours_procs,
            env=env,
            workers=a.ours_workers,
        )
        others.append((name, variant))
    targets: list[Target] = []
    try:
        for peer in peers:
            peer.prepare()
            targets.append(peer.start())
        if ours:
            ws_url, http_url, pids = ours.start()
            log(f"ours: pids {pids} from port {a.ours_port}, CPUs {a.server_cpus}, broker {a.ours_broker}")
            name = ours_name(a)
            targets.append(Target(name, ws_url, http_url, pids=pids))
        for name, other in others:
            ws_url, http_url, pids = other.start()
            extra = f", with {other.env}" if other.env else ""
            log(f"{name}: pids {pids} ({other.python}{extra}), CPUs {a.server_cpus}, broker {a.ours_broker}")
            targets.append(Target(name, ws_url, http_url, pids=pids))
        targets.extend(parse_targets(a))
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, parse_cpus(a.client_cpus))
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(amain(a, targets, users))
    except KeyboardInterrupt:
        log("interrupted")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log(f"error: {type(e).__name__}: {e}")
        return 2
    finally:
        for peer in peers:
            peer.stop()
        if ours:
            ours.stop()
        for _name, other in others:
            other.stop()
    report(targets, a)
    if a.json:
        out = {
            "args": {k: v for k, v in vars(a).items() if k not in ("secret", "api_key")},
            "targets": {t.name: {"ws": t.ws_url, "http": t.http_url, **t.results} for t in targets},
        }
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))
        log(f"results written to {a.json}")
    failed = [f"{t.name}:{k}" for t in targets for k, v in t.results.items() if "error" in v]
    if failed:
        log(f"measurements that failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
