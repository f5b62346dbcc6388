"""Log setup: plain lines for a terminal, JSON lines when asked (LOG_JSON=true)."""

from __future__ import annotations

import logging
import sys

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            body.update(fields)
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body).decode()


def configure_logging(level: str = "info", json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = 5 if level == "trace" else getattr(logging, level.upper(), logging.INFO)
    root.setLevel(numeric)
    # uvicorn logs each accepted WebSocket with its query string, which carries the token: keep it quiet.
    logging.getLogger("uvicorn.error").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("uvicorn.access").disabled = True


_lifecycle_log = logging.getLogger("fonana_ws.connection")


def lifecycle(level: int, event: str, **fields: object) -> None:
    """One log line per lifecycle event: ``event k=v ...`` in text, separate fields in JSON logs."""
    if _lifecycle_log.isEnabledFor(level):
        fields = {k: v for k, v in fields.items() if v is not None}
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        _lifecycle_log.log(level, "%s %s", event, text, extra={"fields": {"event": event, **fields}})
