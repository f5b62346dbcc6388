"""bench/workers.py and the /proc parsing it relies on in bench/ours.py: the figures the lead copies into
docs/performance.md come out of these functions, so a wrong label or a wrong socket count would be
published as a measurement."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import ours  # noqa: E402
import workers  # noqa: E402

pytestmark = pytest.mark.unit

# /proc/net/tcp: a listener on 8102 (0A), a subscriber accepted on it, the generator's end of that
# connection, and a worker's connection to Redis (6379), all established (01) but the listener.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1FA6 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1
   1: 0100007F:1FA6 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 1002 1
   2: 0100007F:C350 0100007F:1FA6 01 00000000:00000000 00:00000000 00000000     0        0 1003 1
   3: 0100007F:D000 0100007F:18EB 01 00000000:00000000 00:00000000 00000000     0        0 1004 1
"""


def test_established_maps_inodes_to_local_and_remote_ports() -> None:
    assert ours.established(TCP) == {"1002": (8102, 50000), "1003": (50000, 8102), "1004": (53248, 6379)}


@pytest.mark.parametrize(
    ("url", "port"),
    [("redis://127.0.0.1:6379/11", 6379), ("redis://127.0.0.1/11", 6379), ("postgresql://u@h/db", 5432)],
)
def test_broker_port(url: str, port: int) -> None:
    assert ours.broker_port(url) == port


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379", "redis://10.0.0.5:6379/11", "memory://"]
)
def test_redis_db_refuses_db_0_and_other_hosts(url: str) -> None:
    with pytest.raises(ValueError):
        workers.redis_db(url)


def test_redis_db_accepts_a_numbered_loopback_db() -> None:
    assert workers.redis_db("redis://127.0.0.1:6379/11") == 11


def test_split_names_master_workers_and_helper() -> None:
    by_pid = {"10": 0.1, "11": 3.0, "12": 6.0, "13": 0.9}  # JSON keys are strings
    processes = {"root": 10, "conns": {"11": 900, "12": 1100}, "helpers": [13]}
    assert workers.split_cell(by_pid, processes) == (
        "master: 1%, worker, 1100 conns: 60%, worker, 900 conns: 30%, helper: 9%"
    )


def test_split_of_one_process() -> None:
    assert workers.split_cell({"10": 2.0}, {}) == "one process"


def step(offered: float, p99_us: float, why: str = "") -> dict:
    return {"offered": offered, "p99": p99_us, "why": why}


def test_sustain_cell_flags_a_generator_bound_result_as_a_lower_bound() -> None:
    res = {
        "sustain": {
            "best": step(160_000, 41_000),
            "first_fail": step(320_000, 850_000, "p99 850 ms > 250 ms"),
            "generator_bound": True,
            "stop": "converged",
        }
    }
    assert workers.sustain_cell(res) == (
        "≥ 160,000/s (p99 41 ms), generator-bound; 320,000/s failed: p99 850 ms > 250 ms"
    )


def test_sustain_cell_without_a_failure_says_why_it_stopped() -> None:
    res = {"sustain": {"best": step(10_000, 5_000), "first_fail": None, "stop": "time budget"}}
    assert workers.sustain_cell(res) == "10,000/s (p99 5 ms); none failed (time budget)"


def test_step_cpu_cell_marks_a_disturbed_step() -> None:
    quiet = {"srv_share": 0.94, "gen_share": 0.87, "other_share": 0.02}
    noisy = {**quiet, "other_share": 0.61}
    assert workers.step_cpu_cell(quiet) == "server 94%, generator 87%, other 2%"
    assert workers.step_cpu_cell(noisy).endswith(" NOISY")
