"""fonana-ws: Fonana's real-time server.

The public surface for other Python code: ``create_app`` to embed the server, ``load_settings`` for its
configuration, ``Events`` / ``connect_events`` to emit every Fonana event (``Publisher`` for any other),
``create_token`` to mint a test token.

Each name is imported when first used (PEP 562): ``import fonana_ws.config`` alone must not pay for
uvicorn, Starlette and the database drivers (~500 modules, ~300 ms), as ``fonana-ws token`` would.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "create_app": "web.app",
    "create_token": "auth",
    "verify_token": "auth",
    "ConfigError": "config",
    "Settings": "config",
    "load_settings": "config",
    "Emission": "fonana.events",
    "Events": "fonana.events",
    "connect_events": "fonana.events",
    "Publisher": "fonana.publisher",
    "PublishError": "fonana.publisher",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fonana_ws' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
