"""The Python cost of one delivery, without sockets: ``Hub.deliver`` plus the ``Outbox`` flush per recipient.

The fan-out benchmark (bench/fanout.py) measures a real server's CPU per delivery, kernel included, and
moves ±30 % between runs on a shared machine. This isolates the part that is ours: the per-recipient
Python from the broker message to ``transport.write``, over the real ``Connection``, ``Outbox`` and
``transport.wire.Wire`` on a ``FonanaWSProtocol`` whose transport is a C no-op (writes are discarded;
the buffer is always empty). Prints ns per delivery, best of several rounds (the least disturbed one),
for both sinks (fanout/sink.py): the Python ``Sink`` and the C ``FdSink``, the latter without a
descriptor, so that its ``send()`` is skipped and the frame goes to the no-op ``transport.write``.

    .venv/bin/python bench/deliver_path.py --recipients 2000 --events 200
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from types import SimpleNamespace

from websockets.protocol import State

from fonana_ws.broker import Broker
from fonana_ws.fanout.connection import Connection
from fonana_ws.fanout.hub import Hub
from fonana_ws.fanout.sink import FdSink, Pending
from fonana_ws.protocol import envelope as env
from fonana_ws.transport.wire import FonanaWSProtocol, Wire


def fake_protocol() -> FonanaWSProtocol:
    """An open, accepted socket whose transport's write is a C no-op and whose buffer stays empty."""
    p = object.__new__(FonanaWSProtocol)
    sink = collections.deque(maxlen=0)
    p.transport = SimpleNamespace(  # type: ignore[assignment]
        write=sink.append, get_write_buffer_size=int, is_closing=bool, get_extra_info=lambda name: None
    )
    p.close_sent = False
    p.disconnected = False
    p.handshake_complete = True
    p.conn = SimpleNamespace(state=State.OPEN, extensions=[])  # type: ignore[assignment]
    return p


class NoSocketWire(Wire):
    """A ``Wire`` handing out the C sink on no descriptor (``Wire.sink`` would see there is no socket)."""

    __slots__ = ()

    def sink(self, limit: int) -> Pending:
        assert FdSink is not None
        return FdSink(-1, self._protocol.transport, self._protocol, limit)


async def measure(recipients: int, events: int, rounds: int, wire: type[Wire]) -> list[float]:
    hub = Hub(Broker("memory://"))
    conns = set()
    for i in range(recipients):
        conn = Connection(None, f"u{i}", hub.outbox, limit=1 << 20, outlet=wire(fake_protocol()))
        conns.add(conn)
    event = {"type": "post_liked", "postId": "bench", "pad": "x" * 200}
    message = env.encode(event, env.new_event_id(), key="post_bench")
    per_delivery = []
    for _ in range(rounds):
        start = time.process_time_ns()
        for _ in range(events):
            hub.deliver(conns, message, "post_bench")
            hub.outbox.flush()  # what the loop's call_soon runs once per turn
        elapsed = time.process_time_ns() - start
        per_delivery.append(elapsed / (events * recipients))
    return per_delivery


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipients", type=int, default=2000)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    print(f"| sink | recipients | events | ns per delivery (best of {args.rounds}) | median |")
    print("|---|---|---|---|---|")
    kinds: list[tuple[str, type[Wire]]] = [("Python Sink", Wire)]
    if FdSink is not None:
        kinds.append(("C FdSink", NoSocketWire))
    else:
        print("(the C extension is not built: pip install -e . compiles it)")
    for name, wire in kinds:
        ordered = sorted(asyncio.run(measure(args.recipients, args.events, args.rounds, wire)))
        best, median = ordered[0], ordered[len(ordered) // 2]
        print(f"| {name} | {args.recipients} | {args.events} | {best:.0f} | {median:.0f} |")


if __name__ == "__main__":
    main()
