"""What the hub needs of a pub/sub backend beyond broadcaster's ``BroadcastBackend``.

broadcaster's interface has no notion of health: a backend there either works or its listener dies.
Ours report whether the broker is reachable, so that ``/ready`` and the publish API can say so.
"""

from __future__ import annotations

from broadcaster._backends.base import BroadcastBackend


class BrokerUnavailable(Exception):
    """The broker cannot take a publish or a subscription right now (it is down or reconnecting)."""


class PayloadTooLarge(ValueError):
    """The backend cannot carry a message this large."""


def backend_is_up(backend: BroadcastBackend) -> bool:
    """True when the backend can publish and deliver now; backends without health are always up."""
    return bool(getattr(backend, "is_up", True))
