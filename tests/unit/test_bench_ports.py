"""bench/fanout.py: the spawned fonana-ws never shares a port with a spawned Node peer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fanout  # noqa: E402

pytestmark = pytest.mark.unit


def test_ours_moves_past_the_peers_ports() -> None:
    # --spawn-peer (8101) and --peer uws=DIR (8101 + 1) against --ours-port's default 8102.
    assert fanout.port_past(8102, {8101, 8102}) == 8103
    assert fanout.port_past(8102, {8101}) == 8102
    assert fanout.port_past(8102, set()) == 8102


def test_the_default_ports_collide_without_it() -> None:
    defaults = fanout.parse_args(["--spawn-peer", "--peer", "uws=/nowhere", "--spawn-ours"])
    peers = {defaults.peer_port, defaults.peer_port + 1}
    assert defaults.ours_port in peers  # what made round two's SQLite column measure uWS
    assert fanout.port_past(defaults.ours_port, peers) not in peers
