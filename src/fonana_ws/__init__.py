"""fonana-ws: Fonana's real-time server.

The public surface for other Python code: ``create_app`` to embed the server, ``load_settings`` for its
configuration, ``Publisher`` to emit events into the broker, ``create_token`` to mint a test token.
"""

from .app import create_app
from .auth import create_token, verify_token
from .config import ConfigError, Settings, load_settings
from .publisher import Publisher, PublishError

__all__ = [
    "ConfigError",
    "PublishError",
    "Publisher",
    "Settings",
    "create_app",
    "create_token",
    "load_settings",
    "verify_token",
]
