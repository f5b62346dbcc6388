"""A direct-path connection's frames of one loop turn, written together: one write per socket per turn.

``Sink`` is the reference, over any ``Outlet``'s write. Where the C module ``_sink`` is built, ``Wire`` hands
out its ``FdSink`` instead: the same four operations, but the write is a ``send()`` on the socket's file
descriptor while the transport holds nothing (what the kernel does not take goes to ``transport.write``
and keeps its place), and ``flush_all`` runs the whole turn's sinks in one C loop. At 40,000 deliveries/s
that chain of Python calls between two syscalls was most of our user time per recipient.
"""

from __future__ import annotations

from typing import Protocol

#: ``push``'s answers.
QUEUED, FIRST, OVER = 0, 1, 2


class Pending(Protocol):
    """What a connection asks of its sink (``Sink``, or the C ``FdSink``)."""

    @property
    def pending(self) -> int:
        """Bytes pushed and not written yet."""
        ...

    def push(self, frame: bytes) -> int:
        """Add a frame: ``FIRST`` for the first of this turn (mark the sink), ``OVER`` past the limit."""
        ...

    def flush(self) -> bool:
        """Write what is pending; False once the transport holds more than the limit (a slow client)."""
        ...

    def clear(self) -> None:
        """Drop what is pending (the connection is closing)."""
        ...


class Writable(Protocol):
    """The part of ``fanout.connection.Outlet`` a ``Sink`` writes through."""

    def write(self, data: bytes) -> None: ...

    def buffered(self) -> int: ...


class Sink:
    """The pure-Python sink: frames joined and handed to ``outlet.write``."""

    __slots__ = ("_outlet", "_limit", "_frames", "pending")

    def __init__(self, outlet: Writable, limit: int) -> None:
        self._outlet = outlet
        self._limit = limit
        self._frames: list[bytes] = []
        self.pending = 0

    def push(self, frame: bytes) -> int:
        self._frames.append(frame)
        self.pending += len(frame)
        if self.pending > self._limit:
            return OVER
        return FIRST if len(self._frames) == 1 else QUEUED

    def flush(self) -> bool:
        frames = self._frames
        if not frames:
            return True
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self._frames = []
        self.pending = 0
        self._outlet.write(data)
        return self._outlet.buffered() <= self._limit

    def clear(self) -> None:
        self._frames = []
        self.pending = 0


def flush_all(sinks: list[Pending]) -> tuple[list[int], list[tuple[int, Exception]]]:
    """Flush every sink: the indices of the slow ones, and (index, exception) of those that failed."""
    slow: list[int] = []
    failed: list[tuple[int, Exception]] = []
    for i, sink in enumerate(sinks):
        try:
            if not sink.flush():
                slow.append(i)
        except Exception as exc:  # one broken socket must not leave the others' frames unwritten
            failed.append((i, exc))
    return slow, failed


try:  # the C module is built by pip install; without a compiler the Python above is the path
    from fonana_ws.fanout._sink import FdSink
    from fonana_ws.fanout._sink import flush_all as flush_all  # handles Sink objects too
except ImportError:  # pragma: no cover - exercised where the extension is not built
    FdSink = None
