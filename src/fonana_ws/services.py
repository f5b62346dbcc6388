"""The long-lived pieces of one server process, built by ``create_app`` and shared by its routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .admission import RateLimits
from .broker import Broker
from .config import Settings
from .db import Store
from .hub import Hub
from .publisher import Publisher
from .stats import Stats


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
