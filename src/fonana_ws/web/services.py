"""The long-lived pieces of one server process, built by ``create_app`` and shared by its routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fonana_ws.broker import Broker
from fonana_ws.config import Settings
from fonana_ws.db import Store
from fonana_ws.fanout.hub import Hub
from fonana_ws.fonana.publisher import Publisher
from fonana_ws.stats import Stats
from fonana_ws.web.admission import RateLimits


@dataclass
class Services:
    settings: Settings
    store: Store
    broker: Broker
    hub: Hub
    publisher: Publisher
    stats: Stats
    rate_limits: RateLimits
    #: Each user's connections across processes (``user_connections.UserConnections``).
    user_connections: Any
    #: (server, task) of the METRICS_PORT listener, when one is configured.
    metrics_server: Any = None
    #: The process's typing states (``fonana.typing.Typing``), made at the start (it needs the loop).
    typing: Any = None
    #: The process's online status (``fonana.status.OnlineStatus``), made at start: it needs the loop.
    status: Any = None
    #: The process's channel presence (``fonana.presence.ChannelPresence``), made at start.
    presence: Any = None
    #: Each connection's token deadline (``fanout.deadlines.Deadlines``, §7.6), made at the first one.
    expiry: Any = None
    #: Live revocation (``fonana.revocation.Revocation``, §7.7), made at start.
    revocation: Any = None

    def begin_shutdown(self) -> None:
        """The process is shutting down: the connections about to close are let go of at the end, in
        ``user_connections.stop`` and ``presence.stop``, not one by one. Their entries then expire after
        the grace, so that a survivor announces whoever did not reconnect elsewhere by then (a rolling
        restart is no change), rather than this process, whose grace timers would not outlive it."""
        self.user_connections.closing = True
        if self.presence is not None:
            self.presence.closing = True
