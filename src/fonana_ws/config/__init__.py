"""Settings from the environment and an optional ``.env`` file.

One table (``table.py``: a ``Settings`` field per setting, carrying its variable, kind, bounds, default
and doc) drives loading, ``fonana-ws config``, ``doctor`` and the docs. The old server's names
(``WS_PORT``'s ``PORT``, ``NEXTAUTH_SECRET``, ``REDIS_URL``) keep working. A bad value stops the start
with a ``ConfigError`` that names the setting.

Importing this loads no web server, ASGI framework or database driver (``fonana-ws token`` and
``config`` need only this): python-dotenv and the standard library.
"""

from __future__ import annotations

from .devfiles import DEV_API_KEY_FILE, DEV_SECRET_FILE, dev_secret
from .kinds import ConfigError, normalize_database_url
from .load import load_settings, lookup, read_env_file
from .table import BY_NAME, SECTIONS, SETTINGS, Setting, Settings

__all__ = [
    "BY_NAME",
    "DEV_API_KEY_FILE",
    "DEV_SECRET_FILE",
    "SECTIONS",
    "SETTINGS",
    "ConfigError",
    "Setting",
    "Settings",
    "dev_secret",
    "load_settings",
    "lookup",
    "normalize_database_url",
    "read_env_file",
]
