"""The database: the web app's tables, read (and for notifications, written) through ``databases``."""

from fonana_ws.db.schema import create_schema
from fonana_ws.db.store import Store

__all__ = ["Store", "create_schema"]
