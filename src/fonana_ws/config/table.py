"""The settings table: ``Settings`` has one field per setting, and each field carries its row (``setting``).

The row drives everything else: loading and validation (``load.py``), ``fonana-ws config`` (every row, its
source, secrets masked), the value checks of ``fonana-ws doctor``, and the README's table and
``config/.env.example`` (``docs.py`` writes both; a unit test fails when they are stale). Adding a setting
is one field here plus the code that reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .devfiles import DEV_API_KEY_FILE, DEV_SECRET_FILE, dev_secret
from .kinds import (
    BrokerUrl,
    Choice,
    DatabaseUrl,
    Directory,
    Flag,
    Items,
    Kind,
    Number,
    Origins,
    Rate,
    Secret,
    Text,
    Whole,
)

#: The README's subsections and .env.example's groups, in this order, each with a sentence for both.
SECTIONS = {
    "Where to listen": (
        "Behind nginx keep `WS_HOST` at `127.0.0.1`: only nginx and the web app talk to the server."
    ),
    "Tokens and keys": (
        "`JWT_SECRET` wins over `NEXTAUTH_SECRET`, exactly as the web app signs. Required when "
        "`DATABASE_URL` points at PostgreSQL; never commit either."
    ),
    "Database and broker": (
        "The server reads the web app's `users`, `posts`, `subscriptions`, `post_purchases` and "
        "`notifications`, and never alters its tables."
    ),
    "Connections": "",
    "Limits and protection": (
        "Each refusal is one log line (no token text) and a count in "
        "`fonana_ws_limit_refusals_total{cause=...}`."
    ),
    "Logging and tests": "",
}
LISTEN, AUTH, DATA, CONNECTIONS, LIMITS, LOGS = SECTIONS

Values = Mapping[str, Any]
"""The values loaded so far, by ``Settings`` field name (what ``check``/``derive``/``generate`` see)."""


@dataclass(frozen=True)
class Setting:
    """One row: the variable, what it may be, its default and where it is documented.

    ``derive``: the default computed from other values (no side effects). ``check``: a message when the
    value does not fit the others (runs on the default too). ``generate``: the default that writes a file
    (value, source), run only once every value is valid. ``production`` / ``unsafe``: what ``doctor``
    says when the row is unset outside the embedded default / set at all.
    """

    env: str
    kind: Kind
    default: Any
    section: str
    doc: str
    aliases: tuple[str, ...] = ()
    secret: bool = False
    default_doc: str = ""
    example: str = ""
    derive: Callable[[Values], Any] | None = None
    check: Callable[[Any, Values], str | None] | None = None
    generate: Callable[[Values], tuple[Any, str]] | None = None
    production: str = ""
    unsafe: str = ""
    #: The ``Settings`` attribute, filled in from the dataclass below.
    attr: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """Every variable that sets it, the first found winning."""
        return (self.env, *self.aliases)

    def show(self, value: Any) -> str:
        """The value as ``fonana-ws config`` and the docs print it ("off" when unset); never masked here,
        the caller masks ``secret`` rows."""
        if value is None or value == () or value == "":
            return "off"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


_ROW = "fonana_ws.setting"


def setting(env: str, kind: Kind, default: Any, section: str, doc: str, **more: Any) -> Any:
    """A ``Settings`` field and its row (``more``: the optional ``Setting`` attributes); a secret stays out
    of the dataclass's repr, so logging the settings cannot leak it."""
    row = Setting(env, kind, default, section, doc, **more)
    return field(default=default, repr=not row.secret, metadata={_ROW: row})


def _embedded(values: Values) -> bool:
    return str(values["database_url"]).startswith("sqlite")


def _no_configuration(values: Values) -> bool:
    """SQLite and the memory broker; read before ``database_url`` is derived ("" is its SQLite default)."""
    database = str(values["database_url"])
    return (not database or database.startswith("sqlite")) and str(values["broadcast_url"]).startswith(
        "memory"
    )


def _secret_needed(value: str, values: Values) -> str | None:
    if value or _embedded(values):
        return None
    return (
        "JWT_SECRET (or NEXTAUTH_SECRET) must be set when DATABASE_URL points at PostgreSQL: "
        "use the web app's secret"
    )


def _dev_file(name: str, label: str, embedded_only: bool) -> Callable[[Values], tuple[Any, str]]:
    def generate(values: Values) -> tuple[Any, str]:
        if embedded_only and not _embedded(values):
            return None, "default"
        data_dir: Path = values["data_dir"]
        return dev_secret(data_dir, name), f"{label} {data_dir / name}"

    return generate


def _metrics_port_free(value: int | None, values: Values) -> str | None:
    if value is None or value != values["port"]:
        return None
    return f"METRICS_PORT must differ from WS_PORT ({value}): /metrics is on the main port already"


@dataclass(frozen=True)
class Settings:
    """The server's settings, immutable and picklable (``serve --workers`` children load their own)."""

    # -- where to listen
    host: str = setting("WS_HOST", Text(), "127.0.0.1", LISTEN, "address to listen on")
    port: int = setting(
        "WS_PORT", Whole(0, 65535), 3002, LISTEN, "port to listen on (0: any free one)", aliases=("PORT",)
    )
    trusted_proxies: tuple[str, ...] = setting(
        "TRUSTED_PROXIES",
        Items(),
        ("127.0.0.1", "::1"),
        LISTEN,
        "peers whose `X-Forwarded-For` is believed (each hop must be an IP address)",
    )
    metrics_port: int | None = setting(
        "METRICS_PORT",
        Whole(1, 65535),
        None,
        LISTEN,
        "also serve `/metrics` and `/stats` on a port of their own (the old server's); unset: main port only",
        example="9090",
        check=_metrics_port_free,
    )
    metrics_host: str = setting(
        "METRICS_HOST",
        Text(),
        "127.0.0.1",
        LISTEN,
        "address of the `METRICS_PORT` listener; same rule as the main port: loopback not proxied, or the "
        "API key",
    )
    console: bool = setting(
        "WS_CONSOLE",
        Flag(),
        False,
        LISTEN,
        "serve the live console at `/console` (its data: loopback not proxied, or the API key)",
        default_doc="on in the embedded default (SQLite, `memory://`), else off",
        example="1",
        derive=lambda values: _no_configuration(values),
    )
    # -- tokens and keys
    jwt_secret: str = setting(
        "JWT_SECRET",
        Secret(16),
        "",
        AUTH,
        "the web app's HS256 secret; the log says which variable was used, never its value",
        aliases=("NEXTAUTH_SECRET",),
        secret=True,
        default_doc="dev secret (SQLite only)",
        check=_secret_needed,
        generate=_dev_file(DEV_SECRET_FILE, "dev secret file", embedded_only=False),
    )
    #: Which variable the secret came from: JWT_SECRET, NEXTAUTH_SECRET or the dev secret file.
    jwt_secret_source: str = ""
    jwt_issuer: str | None = setting(
        "JWT_ISSUER",
        Text(),
        None,
        AUTH,
        "the `iss` claim a token must carry; unset: not checked",
        example="fonana.me",
    )
    jwt_audience: str | None = setting(
        "JWT_AUDIENCE",
        Text(),
        None,
        AUTH,
        "the `aud` claim a token must carry; unset: not checked",
        example="fonana-websocket",
    )
    jwt_leeway: float = setting(
        "JWT_LEEWAY",
        Number(0.0, 300.0),
        30.0,
        AUTH,
        "seconds of clock difference allowed on `exp`, `nbf` and `iat`",
    )
    api_key: str | None = setting(
        "WS_API_KEY",
        Secret(16),
        None,
        AUTH,
        "Bearer key of the publish API (`/api/*`); not the users' JWT secret, the web app needs the same "
        "value",
        secret=True,
        default_doc="dev key (SQLite only)",
        generate=_dev_file(DEV_API_KEY_FILE, "dev key file", embedded_only=True),
    )
    # -- database and broker
    data_dir: Path = setting(
        "FONANA_WS_DATA_DIR",
        Directory(),
        Path(".fonana-ws"),
        DATA,
        "the embedded default's SQLite file, development secret and API key",
    )
    database_url: str = setting(
        "DATABASE_URL",
        DatabaseUrl(),
        "",
        DATA,
        "the web app's PostgreSQL (Prisma's URL works as is); with it the server creates nothing and needs a "
        "secret",
        default_doc="SQLite file `fonana.db` in `FONANA_WS_DATA_DIR`",
        example="postgresql://user:password@127.0.0.1:5432/fonana",
        derive=lambda values: f"sqlite+aiosqlite:///{values['data_dir'] / 'fonana.db'}",
    )
    broadcast_url: str = setting(
        "BROADCAST_URL",
        BrokerUrl(),
        "memory://",
        DATA,
        "the broker: `memory://` (one process), Redis, or PostgreSQL (LISTEN/NOTIFY) for several processes",
        aliases=("REDIS_URL",),
        example="redis://127.0.0.1:6379/0",
    )
    #: Seconds a user found in the database is remembered for later connects (0: ask every time).
    user_cache_ttl: float = setting(
        "WS_USER_CACHE_TTL",
        Number(0.0, 3600.0),
        60.0,
        DATA,
        "seconds a user found in `users` is remembered for later connects (0: every time); a user the web "
        "app deleted can connect this long afterwards",
    )
    # -- connections
    ping_interval: float = setting(
        "WS_PING_INTERVAL",
        Number(0.0, 3600.0),
        30.0,
        CONNECTIONS,
        "seconds between protocol pings (0: none); a connection that misses one is dropped",
    )
    #: Bytes a connection may have waiting (ours plus the kernel-refused part) before it is cut.
    send_buffer: int = setting(
        "WS_SEND_BUFFER",
        Whole(1024, 1 << 30),
        1 << 20,
        CONNECTIONS,
        "bytes a connection may have waiting before it is cut as a slow consumer (close 1013)",
    )
    max_message_size: int = setting(
        "WS_MAX_MESSAGE_SIZE",
        Whole(128, 16 << 20),
        64 * 1024,
        CONNECTIONS,
        "largest frame a client may send, in bytes (close 1009)",
    )
    per_message_deflate: bool = setting(
        "WS_PERMESSAGE_DEFLATE",
        Flag(),
        False,
        CONNECTIONS,
        "negotiate permessage-deflate (~100 KB of zlib state per connection, and off the direct write path)",
    )
    #: Channels one connection may be subscribed to at once.
    max_subscriptions: int = setting(
        "WS_MAX_SUBSCRIPTIONS",
        Whole(1, 100_000),
        200,
        CONNECTIONS,
        "channels one connection may join at once (then `Failed to subscribe` with a `reason`)",
    )
    shutdown_timeout: float = setting(
        "WS_SHUTDOWN_TIMEOUT",
        Number(0.0, 60.0),
        8.0,
        CONNECTIONS,
        "seconds SIGTERM waits for connections to close",
    )
    # -- limits and protection
    #: Origins a browser upgrade may come from (``*`` for one subdomain level); empty: no check.
    allowed_origins: tuple[str, ...] = setting(
        "WS_ALLOWED_ORIGINS",
        Origins(),
        (),
        LIMITS,
        "browser origins allowed to upgrade, `https://*.fonana.me` for one subdomain level; others get HTTP "
        "403, a request without `Origin` (not a browser) passes",
        default_doc="unset (no check)",
        example="https://fonana.me,https://*.fonana.me",
        production="e.g. https://fonana.me: browsers of other sites refused",
    )
    #: Upgrades per client address, in ``limits`` notation (``30/10 seconds``); None: no limit.
    connect_rate: str | None = setting(
        "WS_CONNECT_RATE",
        Rate(),
        None,
        LIMITS,
        "upgrades per client address (`30/10 seconds`); shared by all processes on the Redis broker; "
        "HTTP 429",
        default_doc="unset (no limit)",
        example="30/10 seconds",
        production="e.g. 30/10 seconds: upgrades per client address",
    )
    #: Authenticated connections one user may hold across all processes.
    max_connections_per_user: int = setting(
        "WS_MAX_CONNECTIONS_PER_USER",
        Whole(1, 100_000),
        32,
        LIMITS,
        "authenticated connections of one user on all processes together; then close 4008",
    )
    #: Seconds a process's connection entries outlive its last refresh (refreshed every third of it).
    presence_ttl: float = setting(
        "WS_PRESENCE_TTL",
        Number(1.0, 3600.0),
        60.0,
        LIMITS,
        "seconds after which the connections of a process that died without a word stop counting (and its "
        "users go offline); each process refreshes its own every third of it",
    )
    #: Seconds a user may be without a connection before offline is announced (protocol §7.3).
    offline_grace: float = setting(
        "WS_OFFLINE_GRACE",
        Number(0.0, 600.0),
        5.0,
        LIMITS,
        "seconds without a connection before a user's offline status is sent (a reload within it sends "
        "nothing)",
    )
    #: Users a presence answer lists; above this many present users, counts replace join/leave.
    presence_list_limit: int = setting(
        "WS_PRESENCE_LIST_LIMIT",
        Whole(1, 1000),
        100,
        LIMITS,
        "users a `presence` answer lists (protocol §7.4); a channel with more present users sends "
        "`presence_count` instead of join and leave frames",
    )
    #: Seconds between two presence_count frames of one channel, across all processes.
    presence_count_interval: float = setting(
        "WS_PRESENCE_COUNT_INTERVAL",
        Number(0.1, 3600.0),
        10.0,
        LIMITS,
        "seconds at least between two `presence_count` frames of one channel, on all processes together",
    )
    #: Events kept per channel for recovery (protocol §7.8); 0 turns history off.
    history_size: int = setting(
        "WS_HISTORY_SIZE",
        Whole(0, 100_000),
        100,
        LIMITS,
        "events kept per post, creator, feed, conversation and notifications channel, for a client that "
        "resubscribes with `since` (protocol §7.8); 0 turns history and offsets off",
    )
    #: Seconds an event is kept for recovery; 0 turns history off.
    history_ttl: float = setting(
        "WS_HISTORY_TTL",
        Number(0.0, 86_400.0),
        300.0,
        LIMITS,
        "seconds an event is kept for recovery; a channel idle longer starts a new history (a new epoch); "
        "0 turns history and offsets off",
    )
    #: Inbound frames per connection, in ``limits`` notation.
    client_rate: str = setting(
        "WS_CLIENT_RATE",
        Rate(),
        "50/10 seconds",
        LIMITS,
        "inbound frames per connection; over it a frame is dropped with `Rate limit exceeded`, and past 100 "
        "drops in a minute close 4029",
    )
    #: Seconds a TCP connection has to finish its HTTP headers, or its upgrade and authentication.
    handshake_timeout: float = setting(
        "WS_HANDSHAKE_TIMEOUT",
        Number(0.1, 300.0),
        10.0,
        LIMITS,
        "seconds a TCP connection has to send its request headers, and a WebSocket to be upgraded and "
        "authenticated; then dropped (408 when it sent part of a request)",
    )
    #: Seconds an HTTP request has to deliver its whole body once its headers are in.
    body_timeout: float = setting(
        "WS_BODY_TIMEOUT",
        Number(0.1, 600.0),
        30.0,
        LIMITS,
        "seconds a request has to deliver its body once its headers are in (408)",
    )
    #: Bytes of request line and headers accepted before the request is refused with 414/431.
    max_header_size: int = setting(
        "WS_MAX_HEADER_SIZE",
        Whole(1024, 1 << 20),
        32 * 1024,
        LIMITS,
        "bytes of request line plus headers (414 for a long URL, 431 otherwise)",
    )
    #: Largest request body of ``/api/*`` and largest encoded event, in bytes.
    max_event_size: int = setting(
        "WS_MAX_EVENT_SIZE",
        Whole(1024, 64 << 20),
        1 << 20,
        LIMITS,
        "largest `/api/*` request body and encoded event, in bytes (413, the body is not read past it)",
    )
    # -- logging and tests
    log_level: str = setting(
        "LOG_LEVEL",
        Choice(("trace", "debug", "info", "warning", "error", "critical")),
        "info",
        LOGS,
        "how much the log says; `info`: one line per connection lifecycle event",
    )
    log_json: bool = setting(
        "LOG_JSON", Flag(), False, LOGS, "one JSON object per line, with separate fields (for a log shipper)"
    )
    conformance_echo: bool = setting(
        "WS_CONFORMANCE_ECHO",
        Flag(),
        False,
        LOGS,
        "serve `/conformance/echo` for Autobahn Testsuite (tests only; `doctor` warns)",
        unsafe="/conformance/echo echoes whatever any authenticated user sends (for Autobahn Testsuite only; "
        "turn it off outside tests)",
    )
    #: Where each setting came from (variable -> "env X", ".env X", "default", or the generated file), for
    #: `fonana-ws config`.
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def embedded(self) -> bool:
        """True when running on the embedded SQLite database (demo data and dev secret allowed)."""
        return self.database_url.startswith("sqlite")

    @property
    def broker_kind(self) -> str:
        scheme = urlparse(self.broadcast_url).scheme
        return {"rediss": "redis", "postgres": "postgresql"}.get(scheme, scheme)


#: Every row, in the table's order.
SETTINGS: tuple[Setting, ...] = tuple(
    replace(f.metadata[_ROW], attr=f.name) for f in fields(Settings) if _ROW in f.metadata
)
#: Each row by its variable and by its old names.
BY_NAME: dict[str, Setting] = {name: row for row in SETTINGS for name in row.names}
