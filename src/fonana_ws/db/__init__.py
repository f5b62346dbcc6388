"""The database: the web app's tables, read (and for notifications, written) through ``databases``."""

from .schema import create_schema
from .store import Store

__all__ = ["Store", "create_schema"]
