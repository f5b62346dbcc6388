"""Log setup: plain lines for a terminal, JSON lines when asked (LOG_JSON=true)."""

from __future__ import annotations

import logging
import re
import sys

import orjson

#: What a text line may not carry raw: C0 controls but tab, DEL, C1 controls, and the Unicode line and
#: paragraph separators (editors and ``str.splitlines`` start a new line at each of them).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r"}
#: A lifecycle value written as it is; anything else is quoted (``key="a b"``), so a value can neither
#: end its field nor forge another (``user=x client=6.6.6.6``).
_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+\-\[\]%~]+")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """``text`` on one line: line breaks and other control characters as backslash escapes."""
    return _CONTROL.sub(_escape_char, text) if _CONTROL.search(text) else text


def field_value(value: object) -> str:
    """A lifecycle field as the text line shows it: a plain token as it is, anything else JSON-quoted."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return orjson.dumps(text).decode()


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal; a record's message cannot make a second line (tracebacks still do)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


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
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = 5 if level == "trace" else getattr(logging, level.upper(), logging.INFO)
    root.setLevel(numeric)
    # uvicorn logs each accepted WebSocket with its query string, which carries the token: keep it quiet.
    logging.getLogger("uvicorn.error").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("uvicorn.access").disabled = True


_lifecycle_log = logging.getLogger("fonana_ws.connection")


def lifecycle(level: int, event: str, **fields: object) -> None:
    """One log line per lifecycle event: ``event k=v ...`` in text, separate fields in JSON logs.

    A value that is not a plain token (spaces, ``=``, quotes, control characters) is JSON-quoted.
    """
    if _lifecycle_log.isEnabledFor(level):
        fields = {k: v for k, v in fields.items() if v is not None}
        text = " ".join(f"{k}={field_value(v)}" for k, v in fields.items())
        _lifecycle_log.log(level, "%s %s", event, text, extra={"fields": {"event": event, **fields}})
