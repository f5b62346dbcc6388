#!/usr/bin/env python
"""What ``fonana-ws serve --workers N`` buys: N = 1 and 2 over Redis, measured one after the other.

For each N, ``bench/fanout.py --spawn-ours --ours-workers N`` runs the sustain search (deliveries/s at
p99 <= 250 ms, no loss) and the CPU step (server CPU per delivery at one fixed rate both sustain), on
2000 subscribers of one channel, with the broker on its own Redis database (``--broker``, default db 11,
flushed before and after each N; db 0 is refused). N = 1 is plain ``serve`` on the same Redis broker, so
the difference is the second process, not the broker. With ``--workers`` the processes share one port:
the kernel, not the benchmark, picks the process of every subscriber and every publish, so the table
shows how the subscribers spread and how the server's CPU split over the processes.

CPU pinning, on this 2-core machine: the server (the master and all its workers, ``taskset`` is
inherited) on core 0, the generator on core 1, as in every other figure of bench/README.md. The generator
needs a core of its own, or its CPU and the server's would compete and neither figure would hold. What
the figure therefore shows: the cost of the second process (server µs per delivery summed over the
master and its workers, the Redis hop included), how evenly the kernel spreads the work, and the
throughput of N processes sharing one core. What it does not show: the throughput of N processes on N
cores, i.e. what a second core buys in deliveries/s; that needs a machine with a core more than the
server gets (on 3+ cores: ``--server-cpus 0-1 --client-cpus 2``). Read the split with the cost: only the
share the other worker carries could move to a second core. ``--server-cpus 0-1`` lets the workers use
both cores here, and then they compete with the generator on core 1: the sustained figure is then the
machine's, generator included.

The sustained figure is flagged "generator-bound" when the failing step had the generator's core at
>= 85 % while the server's was below 90 %: it is then a lower bound of the server, not its capacity.

    .venv/bin/python bench/workers.py                 # about 3 minutes
    .venv/bin/python bench/workers.py --quick         # smoke test, about 1 minute

Any other option is passed to bench/fanout.py (e.g. ``--wait-quiet 60``, ``--cpu-rate 20000``).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
RUN_TIMEOUT = 300.0  # seconds for one N; fanout.py bounds itself, this only catches a hang
NOISY = 0.10  # cores of other processes above which a figure is marked disturbed (as fanout.py)


def redis_db(url: str) -> int:
    """The database number of a ``redis://`` URL; db 0 (the default, other people's) is refused."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"{url}: the broker must be redis://127.0.0.1:PORT/DB (loopback only)")
    db = parts.path.strip("/")
    if not db.isdigit() or int(db) == 0:
        raise ValueError(
            f"{url}: name a database of the benchmark's own, not 0 (e.g. redis://127.0.0.1:6379/11)"
        )
    return int(db)


def flush(url: str) -> None:
    """Empty the benchmark's own Redis database (history keys of the previous run), nothing else."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def run_fanout(workers: int, broker: str, extra: list[str], out: Path) -> int:
    """One fanout.py run against ``serve --workers N``; its progress and own table go to stderr."""
    cmd = [
        sys.executable,
        str(HERE / "fanout.py"),
        "--spawn-ours",
        "--ours-workers",
        str(workers),
        "--ours-broker",
        broker,
        "--only",
        "cpu,sustain",
        "--json",
        str(out),
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=sys.stderr)
    try:
        return proc.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGINT, not SIGKILL: fanout.py then stops the server it started
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)


def share(value: float) -> str:
    return f"{value * 100:.0f}%"


def sustain_cell(res: dict[str, Any]) -> str:
    s = res.get("sustain") or {}
    if "error" in s:
        return "error: " + s["error"][:60]
    best = s.get("best")
    if not best:
        return "none passed"
    text = f"{best['offered']:,.0f}/s (p99 {best['p99'] / 1000:.0f} ms)"
    if s.get("generator_bound"):
        text = "≥ " + text + ", generator-bound"
    fail = s.get("first_fail")
    text += (
        f"; {fail['offered']:,.0f}/s failed: {fail['why'][:50]}" if fail else f"; none failed ({s['stop']})"
    )
    return text


def step_cpu_cell(step: dict[str, Any] | None) -> str:
    if not step:
        return "-"
    srv, gen, other = share(step["srv_share"]), share(step["gen_share"]), share(step["other_share"])
    text = f"server {srv}, generator {gen}, other {other}"
    if step["other_share"] >= NOISY:
        text += " NOISY"
    return text


def cpu_cell(res: dict[str, Any]) -> str:
    c = res.get("cpu") or {}
    if "error" in c:
        return "error: " + c["error"][:60]
    if not c:
        return "-"
    text = f"{c['us_per_delivery']:.2f} µs (user {c['us_user']:.2f} + kernel {c['us_sys']:.2f})"
    return text + ("" if c["passed"] else f" [{c['why'][:40]}]")


def split_cell(by_pid: dict[str, float], processes: dict[str, Any]) -> str:
    """Each process's share of the server's CPU, and the subscribers it holds: the master first, then
    the workers, busiest first, then multiprocessing's helper."""
    total = sum(by_pid.values())
    if total <= 0 or len(by_pid) < 2:
        return "one process"
    root = str(processes.get("root"))
    helpers = {str(p) for p in processes.get("helpers") or []}
    conns = processes.get("conns") or {}

    def role(pid: str) -> str:
        if pid == root:
            return "master"
        if pid in helpers:
            return "helper"
        return f"worker, {conns.get(pid, 0)} conns"

    order = sorted(by_pid, key=lambda p: (p != root, p in helpers, -by_pid[p]))
    return ", ".join(f"{role(p)}: {by_pid[p] / total * 100:.0f}%" for p in order)


def gen_cell(res: dict[str, Any]) -> str:
    c = res.get("cpu") or {}
    if "gen_us_per_delivery" not in c:
        return "-"
    return f"{c['gen_us_per_delivery']:.2f} µs/delivery, {share(c['gen_share'])} of its core"


def table(runs: dict[int, dict[str, Any]], cpu_rate: str) -> str:
    """One markdown table, a column per N."""
    counts = sorted(runs)
    rows = [
        ("sustained deliveries/s (p99 ≤ 250 ms, no loss)", lambda r: sustain_cell(r)),
        ("  CPU at the best step", lambda r: step_cpu_cell((r.get("sustain") or {}).get("best"))),
        (f"server CPU per delivery at {cpu_rate}/s (all processes)", cpu_cell),
        (
            "  CPU during it",
            lambda r: step_cpu_cell(r.get("cpu") if "error" not in (r.get("cpu") or {}) else None),
        ),
        (
            "  split over the processes",
            lambda r: split_cell((r.get("cpu") or {}).get("srv_by_pid") or {}, r.get("processes") or {}),
        ),
        ("generator at that rate", gen_cell),
    ]
    lines = ["| measurement | " + " | ".join(f"--workers {n}" for n in counts) + " |"]
    lines.append("|---|" + "---|" * len(counts))
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(runs[n]) for n in counts) + " |")
    return "\n".join(lines)


def only_target(path: Path) -> dict[str, Any]:
    """The results of the one target a fanout.py --json file holds (empty if the run wrote none)."""
    if not path.is_file():
        return {}
    targets = json.loads(path.read_text())["targets"]
    return next(iter(targets.values()), {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--broker", default="redis://127.0.0.1:6379/11", help="the benchmark's own Redis database")
    p.add_argument("--counts", default="1,2", help="values of --workers to measure")
    p.add_argument("--server-cpus", default="0", help="CPUs of the server (master and workers)")
    p.add_argument("--client-cpus", default="1", help="CPUs of the generator")
    p.add_argument(
        "--cpu-rate", default=None, help="deliveries/s of the CPU step (fanout.py's default if none)"
    )
    a, extra = p.parse_known_args(argv)
    try:
        redis_db(a.broker)
    except ValueError as e:
        p.error(str(e))
    counts = [int(n) for n in a.counts.split(",") if n.strip()]
    extra += ["--server-cpus", a.server_cpus, "--client-cpus", a.client_cpus]
    if a.cpu_rate:
        extra += ["--cpu-rate", a.cpu_rate]
    cpu_rate = a.cpu_rate or ("20000" if "--quick" in extra else "40000")
    runs: dict[int, dict[str, Any]] = {}
    failed = 0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fonana-bench-workers-") as tmp:
        for n in counts:
            flush(a.broker)
            out = Path(tmp) / f"workers-{n}.json"
            try:
                rc = run_fanout(n, a.broker, extra, out)
            finally:
                flush(a.broker)
            failed += rc != 0
            runs[n] = only_target(out)
    print(
        f"serve --workers N over {a.broker}: server CPUs {a.server_cpus}, generator CPUs {a.client_cpus}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.monotonic() - t0:.0f} s\n"
    )
    print(table(runs, f"{float(cpu_rate):,.0f}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
