"""fonana-ws: Fonana's real-time server.

The public surface for other Python code: ``create_app`` to embed the server, ``load_settings`` for its
configuration, ``Events`` / ``connect_events`` to emit every Fonana event (``Publisher`` for any other),
``create_token`` to mint a test token.
"""

from .app import create_app
from .auth import create_token, verify_token
from .config import ConfigError, Settings, load_settings
from .events import Emission, Events, connect_events
from .publisher import Publisher, PublishError

__all__ = [
    "ConfigError",
    "Emission",
    "Events",
    "PublishError",
    "connect_events",
    "Publisher",
    "Settings",
    "create_app",
    "create_token",
    "load_settings",
    "verify_token",
]
