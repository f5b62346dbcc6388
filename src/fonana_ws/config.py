"""Settings from the environment and an optional ``.env`` file.

The old server's names (``WS_PORT``, ``NEXTAUTH_SECRET``, ``DATABASE_URL``, ``REDIS_URL``) keep working.
A bad value stops the start with a ``ConfigError`` that names the setting.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from dotenv import dotenv_values

DEV_SECRET_FILE = "dev-secret"
DEV_API_KEY_FILE = "dev-api-key"


class ConfigError(ValueError):
    """A setting has a value the server cannot run with; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 3002
    jwt_secret: str = ""
    #: Which variable the secret came from: JWT_SECRET, NEXTAUTH_SECRET or the dev secret file.
    jwt_secret_source: str = ""
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway: float = 30.0
    database_url: str = ""
    broadcast_url: str = "memory://"
    api_key: str | None = None
    data_dir: Path = field(default_factory=lambda: Path(".fonana-ws"))
    ping_interval: float = 30.0
    #: Bytes a connection may have waiting (ours plus the kernel-refused part) before it is cut.
    send_buffer: int = 1 << 20
    per_message_deflate: bool = False
    max_message_size: int = 64 * 1024
    log_json: bool = False
    log_level: str = "info"
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    shutdown_timeout: float = 8.0
    #: Channels one connection may be subscribed to at once.
    max_subscriptions: int = 200
    #: Seconds a user found in the database is remembered for later connects (0: ask every time).
    user_cache_ttl: float = 60.0
    #: A second listener for /metrics and /stats only (the old server's METRICS_PORT); None: main port only.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    #: Origins a browser upgrade may come from (``*`` for one subdomain level); empty: no check.
    allowed_origins: tuple[str, ...] = ()
    #: Upgrades per client address, in ``limits`` notation (``30/10 seconds``); None: no limit.
    connect_rate: str | None = None
    #: Authenticated connections one user may hold across all processes.
    max_connections_per_user: int = 32
    #: Seconds a TCP connection has to finish its HTTP headers, or its upgrade and authentication.
    handshake_timeout: float = 10.0
    #: Seconds an HTTP request has to deliver its whole body once its headers are in.
    body_timeout: float = 30.0
    #: Bytes of request line and headers accepted before the request is refused with 414/431.
    max_header_size: int = 32 * 1024
    #: Inbound frames per connection, in ``limits`` notation.
    client_rate: str = "50/10 seconds"
    #: Largest request body of ``/api/*`` and largest encoded event, in bytes.
    max_event_size: int = 1 << 20
    #: Serve ``/conformance/echo`` for Autobahn Testsuite (tests only).
    conformance_echo: bool = False
    #: Where each setting came from (name -> "env", ".env", "default", "generated"), for `fonana-ws config`.
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def embedded(self) -> bool:
        """True when running on the embedded SQLite database (demo data and dev secret allowed)."""
        return self.database_url.startswith("sqlite")

    @property
    def broker_kind(self) -> str:
        scheme = urlparse(self.broadcast_url).scheme
        return {"rediss": "redis", "postgres": "postgresql"}.get(scheme, scheme)


def _env(environ: dict[str, str], dotenv: dict[str, str], sources: dict[str, str], *names: str) -> str | None:
    for name in names:
        if environ.get(name):
            sources[names[0]] = f"env {name}"
            return environ[name]
        if dotenv.get(name):
            sources[names[0]] = f".env {name}"
            return dotenv[name]
    return None


def _int(name: str, raw: str | None, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(name: str, raw: str | None, default: float, low: float, high: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw!r}")
    return value


def _bool(name: str, raw: str | None) -> bool:
    if raw is None:
        return False
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _rate(name: str, raw: str | None) -> str | None:
    """A rate in ``limits`` notation (``50/10 seconds``, ``30 per minute``), checked at start."""
    if raw is None:
        return None
    from limits import parse_many

    try:
        parse_many(raw)
    except ValueError:
        raise ConfigError(
            f"{name} must be a rate such as '30/10 seconds' or '100 per minute', got {raw!r}"
        ) from None
    return raw


def _origins(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    origins = tuple(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())
    for origin in origins:
        scheme, sep, host = origin.partition("://")
        if not sep or scheme not in ("http", "https") or not host or "*" in host.lstrip("*."):
            raise ConfigError(
                f"WS_ALLOWED_ORIGINS must list origins such as https://fonana.me or https://*.fonana.me, "
                f"got {origin!r}"
            )
    return origins


def normalize_database_url(url: str, name: str = "DATABASE_URL") -> str:
    """Accept the URLs people write (Prisma's ``postgresql://...?schema=public`` included)."""
    parsed = urlparse(url)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("postgres", "postgresql"):
        rest = url.split("://", 1)[1]
        # Prisma's `schema` and `connection_limit` query options mean nothing to asyncpg.
        base, _, query = rest.partition("?")
        keep = [p for p in query.split("&") if p and p.split("=")[0] not in ("schema", "connection_limit")]
        return "postgresql+asyncpg://" + base + ("?" + "&".join(keep) if keep else "")
    if scheme == "sqlite":
        return "sqlite+aiosqlite://" + url.split("://", 1)[1]
    raise ConfigError(f"{name} must be a postgresql:// or sqlite:// URL, got scheme {parsed.scheme!r}")


def _broadcast_url(raw: str | None, redis_url: str | None) -> str:
    url = raw or redis_url or "memory://"
    name = "BROADCAST_URL" if raw else "REDIS_URL"
    scheme = urlparse(url).scheme
    if scheme not in ("memory", "redis", "rediss", "postgres", "postgresql"):
        raise ConfigError(
            f"{name} must start with memory://, redis://, rediss://, postgres:// or postgresql://, "
            f"got scheme {scheme!r}"
        )
    if scheme.startswith("postgres"):
        url = url.replace("+asyncpg", "", 1)
    return url


def dev_secret(data_dir: Path, name: str = DEV_SECRET_FILE) -> str:
    """The embedded default's secret: generated once, kept with mode 600 in the data directory."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def load_settings(environ: dict[str, str] | None = None, env_file: str | Path | None = ".env") -> Settings:
    """Read the settings; the process environment wins over the ``.env`` file."""
    environ = dict(os.environ if environ is None else environ)
    dotenv: dict[str, str] = {}
    if env_file and Path(env_file).is_file():
        dotenv = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    src: dict[str, str] = {}

    def get(*names: str) -> str | None:
        return _env(environ, dotenv, src, *names)

    data_dir = Path(get("FONANA_WS_DATA_DIR") or ".fonana-ws").expanduser()
    raw_db = get("DATABASE_URL")
    database_url = (
        normalize_database_url(raw_db) if raw_db else f"sqlite+aiosqlite:///{data_dir / 'fonana.db'}"
    )

    secret, secret_source = None, ""
    if environ.get("JWT_SECRET") or dotenv.get("JWT_SECRET"):
        secret, secret_source = get("JWT_SECRET"), "JWT_SECRET"
    elif environ.get("NEXTAUTH_SECRET") or dotenv.get("NEXTAUTH_SECRET"):
        secret, secret_source = get("NEXTAUTH_SECRET"), "NEXTAUTH_SECRET"
    if secret is not None and len(secret) < 16:
        raise ConfigError(f"{secret_source} is too short ({len(secret)} characters); use at least 16")
    if secret is None:
        if raw_db and not database_url.startswith("sqlite"):
            raise ConfigError(
                "JWT_SECRET (or NEXTAUTH_SECRET) must be set when DATABASE_URL points at PostgreSQL: "
                "use the web app's secret"
            )
        secret, secret_source = dev_secret(data_dir), f"dev secret file {data_dir / DEV_SECRET_FILE}"

    log_level = (get("LOG_LEVEL") or "info").lower()
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise ConfigError(f"LOG_LEVEL must be one of debug, info, warning, error, got {log_level!r}")
    api_key = get("WS_API_KEY")
    if api_key is not None and len(api_key) < 16:
        raise ConfigError(f"WS_API_KEY is too short ({len(api_key)} characters); use at least 16")
    if api_key is None and database_url.startswith("sqlite"):
        api_key = dev_secret(data_dir, DEV_API_KEY_FILE)
        src["WS_API_KEY"] = f"dev key file {data_dir / DEV_API_KEY_FILE}"
    proxies = get("TRUSTED_PROXIES")
    port = _int("WS_PORT", get("WS_PORT", "PORT"), 3002, 0, 65535)
    raw_metrics = get("METRICS_PORT")
    metrics = _int("METRICS_PORT", raw_metrics, 0, 1, 65535) if raw_metrics else None
    if metrics is not None and metrics == port:
        raise ConfigError(
            f"METRICS_PORT must differ from WS_PORT ({port}): /metrics is on the main port already"
        )

    return Settings(
        host=get("WS_HOST") or "127.0.0.1",
        port=port,
        jwt_secret=secret,
        jwt_secret_source=secret_source,
        jwt_issuer=get("JWT_ISSUER"),
        jwt_audience=get("JWT_AUDIENCE"),
        jwt_leeway=_float("JWT_LEEWAY", get("JWT_LEEWAY"), 30.0, 0.0, 300.0),
        database_url=database_url,
        broadcast_url=_broadcast_url(get("BROADCAST_URL"), get("REDIS_URL")),
        api_key=api_key,
        data_dir=data_dir,
        ping_interval=_float("WS_PING_INTERVAL", get("WS_PING_INTERVAL"), 30.0, 0.0, 3600.0),
        send_buffer=_int("WS_SEND_BUFFER", get("WS_SEND_BUFFER"), 1 << 20, 1024, 1 << 30),
        per_message_deflate=_bool("WS_PERMESSAGE_DEFLATE", get("WS_PERMESSAGE_DEFLATE")),
        max_message_size=_int("WS_MAX_MESSAGE_SIZE", get("WS_MAX_MESSAGE_SIZE"), 64 * 1024, 128, 16 << 20),
        log_json=_bool("LOG_JSON", get("LOG_JSON")),
        log_level=log_level,
        trusted_proxies=tuple(p.strip() for p in proxies.split(",") if p.strip())
        if proxies
        else ("127.0.0.1", "::1"),
        shutdown_timeout=_float("WS_SHUTDOWN_TIMEOUT", get("WS_SHUTDOWN_TIMEOUT"), 8.0, 0.0, 60.0),
        max_subscriptions=_int("WS_MAX_SUBSCRIPTIONS", get("WS_MAX_SUBSCRIPTIONS"), 200, 1, 100_000),
        user_cache_ttl=_float("WS_USER_CACHE_TTL", get("WS_USER_CACHE_TTL"), 60.0, 0.0, 3600.0),
        metrics_port=metrics,
        metrics_host=get("METRICS_HOST") or "127.0.0.1",
        allowed_origins=_origins(get("WS_ALLOWED_ORIGINS")),
        connect_rate=_rate("WS_CONNECT_RATE", get("WS_CONNECT_RATE")),
        max_connections_per_user=_int(
            "WS_MAX_CONNECTIONS_PER_USER", get("WS_MAX_CONNECTIONS_PER_USER"), 32, 1, 100_000
        ),
        handshake_timeout=_float("WS_HANDSHAKE_TIMEOUT", get("WS_HANDSHAKE_TIMEOUT"), 10.0, 0.1, 300.0),
        body_timeout=_float("WS_BODY_TIMEOUT", get("WS_BODY_TIMEOUT"), 30.0, 0.1, 600.0),
        max_header_size=_int("WS_MAX_HEADER_SIZE", get("WS_MAX_HEADER_SIZE"), 32 * 1024, 1024, 1 << 20),
        client_rate=_rate("WS_CLIENT_RATE", get("WS_CLIENT_RATE")) or "50/10 seconds",
        max_event_size=_int("WS_MAX_EVENT_SIZE", get("WS_MAX_EVENT_SIZE"), 1 << 20, 1024, 64 << 20),
        conformance_echo=_bool("WS_CONFORMANCE_ECHO", get("WS_CONFORMANCE_ECHO")),
        sources=src,
    )
