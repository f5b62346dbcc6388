"""What a setting's value may be. Each kind turns the raw text into the value and, when it cannot, raises
a ``ConfigError`` that names the variable it was read from (``PORT`` when the old name was used)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import urlparse


class ConfigError(ValueError):
    """A setting has a value the server cannot run with; the message names the setting."""


class _Kind:
    """A kind's repr shows its bounds (``Whole(1024, 1073741824)``). Plain classes, not dataclasses:
    twelve ``@dataclass`` decorations cost ~5 ms of every ``import fonana_ws.config``."""

    __slots__: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(getattr(self, s)) for s in self.__slots__)})"


class Kind(Protocol):
    def __call__(self, name: str, raw: str) -> Any: ...

    def describe(self) -> str:
        """The accepted values, for the README's table."""
        ...


class Whole(_Kind):
    __slots__ = ("low", "high")

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def __call__(self, name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
        if not self.low <= value <= self.high:
            raise ConfigError(f"{name} must be between {self.low} and {self.high}, got {value}")
        return value

    def describe(self) -> str:
        return f"whole number, {self.low} to {self.high}"


class Number(_Kind):
    __slots__ = ("low", "high")

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __call__(self, name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        # float() takes "nan" and "inf": neither is a timeout or an interval.
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise ConfigError(f"{name} must be between {self.low:g} and {self.high:g}, got {raw!r}")
        return value

    def describe(self) -> str:
        return f"number, {self.low:g} to {self.high:g}"


class Flag(_Kind):
    def __call__(self, name: str, raw: str) -> bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def describe(self) -> str:
        return "true or false"


class Text(_Kind):
    def __call__(self, name: str, raw: str) -> str:
        return raw

    def describe(self) -> str:
        return ""  # anything: nothing worth saying


class Choice(_Kind):
    __slots__ = ("options",)

    def __init__(self, options: tuple[str, ...]) -> None:
        self.options = options

    def __call__(self, name: str, raw: str) -> str:
        value = raw.lower()
        if value not in self.options:
            raise ConfigError(f"{name} must be one of {', '.join(self.options)}, got {value!r}")
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(f"`{o}`" for o in self.options)


class Secret(_Kind):
    """A shared secret: short ones can be guessed offline from one token (HS256), so 16 is the floor."""

    __slots__ = ("min_length",)

    def __init__(self, min_length: int = 16) -> None:
        self.min_length = min_length

    def __call__(self, name: str, raw: str) -> str:
        if len(raw) < self.min_length:
            raise ConfigError(f"{name} is too short ({len(raw)} characters); use at least {self.min_length}")
        return raw

    def describe(self) -> str:
        return f"{self.min_length} or more characters"


class Items(_Kind):
    """A comma-separated list (spaces around the commas ignored)."""

    def __call__(self, name: str, raw: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in raw.split(",") if item.strip())

    def describe(self) -> str:
        return "comma-separated list"


class Origins(_Kind):
    """Browser origins, ``https://*.fonana.me`` for one subdomain level; compared lower-case, no slash."""

    def __call__(self, name: str, raw: str) -> tuple[str, ...]:
        origins = tuple(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())
        for origin in origins:
            scheme, sep, host = origin.partition("://")
            if not sep or scheme not in ("http", "https") or not host or "*" in host.lstrip("*."):
                raise ConfigError(
                    f"{name} must list origins such as https://fonana.me or https://*.fonana.me, "
                    f"got {origin!r}"
                )
        return origins

    def describe(self) -> str:
        return "comma-separated `http(s)://` origins"


class Rate(_Kind):
    """A rate in ``limits`` notation (``50/10 seconds``, ``30 per minute``), checked at start."""

    def __call__(self, name: str, raw: str) -> str:
        # `limits` costs ~80 ms to import: only when a rate is set, not for every `import fonana_ws.config`.
        from limits import parse_many

        try:
            parse_many(raw)
        except ValueError:
            raise ConfigError(
                f"{name} must be a rate such as '30/10 seconds' or '100 per minute', got {raw!r}"
            ) from None
        return raw

    def describe(self) -> str:
        return "rate, `limits` notation"


class Directory(_Kind):
    def __call__(self, name: str, raw: str) -> Path:
        return Path(raw).expanduser()

    def describe(self) -> str:
        return "path"


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


class DatabaseUrl(_Kind):
    def __call__(self, name: str, raw: str) -> str:
        return normalize_database_url(raw, name)

    def describe(self) -> str:
        return "`postgresql://` or `sqlite://` URL"


class BrokerUrl(_Kind):
    SCHEMES: ClassVar[tuple[str, ...]] = (
        "memory",
        "redis",
        "rediss",
        "redis+cluster",
        "postgres",
        "postgresql",
    )

    def __call__(self, name: str, raw: str) -> str:
        scheme = urlparse(raw).scheme
        if scheme not in self.SCHEMES:
            raise ConfigError(
                f"{name} must start with memory://, redis://, rediss://, redis+cluster://, postgres:// or "
                f"postgresql://, got scheme {scheme!r}"
            )
        # The PostgreSQL broker speaks asyncpg itself: a SQLAlchemy-style `+asyncpg` means nothing to it.
        return raw.replace("+asyncpg", "", 1) if scheme.startswith("postgres") else raw

    def describe(self) -> str:
        return "`memory://`, `redis://`, `rediss://`, `redis+cluster://` or `postgresql://` URL"
