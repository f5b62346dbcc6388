"""Every row of the settings table, loaded the way the server loads it: its default, good values, a bad
value's message (exact, naming the variable), its old names; then the rows that depend on each other."""

from __future__ import annotations

import dataclasses
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest

from fonana_ws.config import BY_NAME, SECTIONS, SETTINGS, ConfigError, Setting, Settings, load_settings
from fonana_ws.config import kinds as k

pytestmark = pytest.mark.unit

PG = "postgresql://fonana:pw@db.internal:5432/fonana"
SECRET = "s" * 32


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The embedded default writes its development files under the working directory: keep them here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load(env_file: str | None = None, **env: str) -> Settings:
    return load_settings(env, env_file=env_file)


def good(row: Setting) -> list[tuple[str, Any]]:
    """Raw texts the row accepts and the value each gives."""
    kind = row.kind
    if isinstance(kind, k.Whole):
        return [(str(kind.low), kind.low), (str(kind.high), kind.high), (f" {kind.low + 1}", kind.low + 1)]
    if isinstance(kind, k.Number):
        middle = (kind.low + kind.high) / 2
        return [(f"{kind.low:g}", kind.low), (f"{kind.high:g}", kind.high), (repr(middle), middle)]
    if isinstance(kind, k.Flag):
        return [("true", True), ("1", True), ("YES", True), ("on", True), ("false", False), ("0", False)]
    if isinstance(kind, k.Text):
        return [("x.example", "x.example")]
    if isinstance(kind, k.Choice):
        return [(option.upper(), option) for option in kind.options]
    if isinstance(kind, k.Secret):
        return [("k" * 16, "k" * 16), ("K" * 100, "K" * 100)]
    if isinstance(kind, k.Items):
        return [(" 10.0.0.1 , ::1 ,", ("10.0.0.1", "::1"))]
    if isinstance(kind, k.Origins):
        return [
            ("https://Fonana.me/, https://*.fonana.me", ("https://fonana.me", "https://*.fonana.me")),
            ("http://127.0.0.1:3000", ("http://127.0.0.1:3000",)),
        ]
    if isinstance(kind, k.Rate):
        return [("30/10 seconds", "30/10 seconds"), ("100 per minute", "100 per minute")]
    if isinstance(kind, k.Directory):
        return [("data/here", Path("data/here"))]
    if isinstance(kind, k.DatabaseUrl):
        return [
            (
                PG + "?schema=public&connection_limit=5",
                "postgresql+asyncpg://fonana:pw@db.internal:5432/fonana",
            ),
            ("postgres://h/db?sslmode=require", "postgresql+asyncpg://h/db?sslmode=require"),
            ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ]
    if isinstance(kind, k.BrokerUrl):
        urls = [
            "memory://",
            "redis://h:6379/0",
            "rediss://:pw@h:6380/1",
            "postgresql://h/db",
            "postgres://h/db",
        ]
        return [(url, url) for url in urls]
    raise AssertionError(f"{row.env}: a new kind {type(kind).__name__}: give it cases here")


def bad(row: Setting, name: str) -> list[tuple[str, str]]:
    """Raw texts the row refuses and the whole message, naming ``name`` (the variable it was read from)."""
    kind = row.kind
    if isinstance(kind, k.Whole):
        low, high = kind.low, kind.high
        return [
            ("abc", f"{name} must be a whole number, got 'abc'"),
            ("1.5", f"{name} must be a whole number, got '1.5'"),
            (str(low - 1), f"{name} must be between {low} and {high}, got {low - 1}"),
            (str(high + 1), f"{name} must be between {low} and {high}, got {high + 1}"),
        ]
    if isinstance(kind, k.Number):
        low, high = kind.low, kind.high
        span = f"between {low:g} and {high:g}"
        return [
            ("soon", f"{name} must be a number, got 'soon'"),
            ("nan", f"{name} must be {span}, got 'nan'"),
            ("inf", f"{name} must be {span}, got 'inf'"),
            (f"{low - 0.05:g}", f"{name} must be {span}, got '{low - 0.05:g}'"),
            (f"{high + 1:g}", f"{name} must be {span}, got '{high + 1:g}'"),
        ]
    if isinstance(kind, k.Flag):
        return [("maybe", f"{name} must be true or false, got 'maybe'")]
    if isinstance(kind, k.Choice):
        return [("Loud", f"{name} must be one of {', '.join(kind.options)}, got 'loud'")]
    if isinstance(kind, k.Secret):
        return [("short", f"{name} is too short (5 characters); use at least 16")]
    if isinstance(kind, k.Origins):
        example = "must list origins such as https://fonana.me or https://*.fonana.me"
        return [
            ("fonana.me", f"{name} {example}, got 'fonana.me'"),
            ("https://ok.me,ftp://x", f"{name} {example}, got 'ftp://x'"),
            ("https://a*.fonana.me", f"{name} {example}, got 'https://a*.fonana.me'"),
        ]
    if isinstance(kind, k.Rate):
        return [("fast", f"{name} must be a rate such as '30/10 seconds' or '100 per minute', got 'fast'")]
    if isinstance(kind, k.DatabaseUrl):
        return [("mysql://x", f"{name} must be a postgresql:// or sqlite:// URL, got scheme 'mysql'")]
    if isinstance(kind, k.BrokerUrl):
        schemes = "memory://, redis://, rediss://, redis+cluster://, postgres:// or postgresql://"
        return [("kafka://x", f"{name} must start with {schemes}, got scheme 'kafka'")]
    if isinstance(kind, (k.Text, k.Items, k.Directory)):
        return []  # any text is one
    raise AssertionError(f"{row.env}: a new kind {type(kind).__name__}: give it cases here")


def ids(row: Setting) -> str:
    return row.env


#: Values the other rows need for a good value of this one to load.
NEEDS = {"DATABASE_URL": {"JWT_SECRET": SECRET}}


# -- the table itself ---------------------------------------------------------------------------------------


def test_the_table_covers_settings_and_names_each_variable_once() -> None:
    derived = {"jwt_secret_source", "sources"}  # set by the loader, not read from a variable
    assert {f.name for f in dataclasses.fields(Settings)} - derived == {row.attr for row in SETTINGS}
    names = [name for row in SETTINGS for name in row.names]
    assert len(names) == len(set(names)) == len(BY_NAME)
    assert len(SETTINGS) >= 31
    for row in SETTINGS:
        assert row.section in SECTIONS, row.env
        assert row.doc and not row.doc.endswith("."), row.env  # one line; the docs add the full stop
        assert BY_NAME[row.env] is row


# -- every row ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", [r for r in SETTINGS if not (r.derive or r.generate)], ids=ids)
def test_default(row: Setting) -> None:
    settings = load()
    assert getattr(settings, row.attr) == row.default
    assert settings.sources[row.env] == "default"


@pytest.mark.parametrize("row", SETTINGS, ids=ids)
def test_good_values(row: Setting, tmp_path: Path) -> None:
    for raw, value in good(row):
        settings = load(**NEEDS.get(row.env, {}), **{row.env: raw})
        assert getattr(settings, row.attr) == value, raw
        assert settings.sources[row.env] == f"env {row.env}"


@pytest.mark.parametrize("row", [r for r in SETTINGS if bad(r, r.env)], ids=ids)
def test_bad_values_name_the_setting(row: Setting) -> None:
    for raw, message in bad(row, row.env):
        with pytest.raises(ConfigError) as caught:
            load(**{row.env: raw})
        assert str(caught.value) == message


@pytest.mark.parametrize("row", [r for r in SETTINGS if r.aliases], ids=ids)
def test_old_names(row: Setting) -> None:
    (raw, value), *_ = good(row)
    for alias in row.aliases:
        settings = load(**{alias: raw})
        assert getattr(settings, row.attr) == value
        assert settings.sources[row.env] == f"env {alias}"
        # The current name wins over the old one.
        other = "k" * 20 if isinstance(row.kind, k.Secret) else good(row)[-1][0]
        assert getattr(load(**{alias: raw, row.env: other}), row.attr) == row.kind(row.env, other)
        for bad_raw, message in bad(row, alias):
            with pytest.raises(ConfigError) as caught:
                load(**{alias: bad_raw})
            assert str(caught.value) == message  # names the variable the operator set


# -- where values come from ---------------------------------------------------------------------------------


def test_environment_wins_over_the_env_file_and_empty_is_unset(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WS_PORT=4000\nLOG_LEVEL=debug\nWS_HOST=\n")
    settings = load(".env", WS_PORT="4100")
    assert (settings.port, settings.sources["WS_PORT"]) == (4100, "env WS_PORT")
    assert (settings.log_level, settings.sources["LOG_LEVEL"]) == ("debug", ".env LOG_LEVEL")
    assert (settings.host, settings.sources["WS_HOST"]) == ("127.0.0.1", "default")
    assert load(".env", WS_PORT="").port == 4000
    assert load(None, WS_PORT="").port == 3002


def test_the_current_name_in_env_file_wins_over_the_old_name_in_the_environment(tmp_path: Path) -> None:
    """As the web app: JWT_SECRET, wherever it is set, before NEXTAUTH_SECRET."""
    (tmp_path / ".env").write_text(f"JWT_SECRET={SECRET}\n")
    settings = load(".env", NEXTAUTH_SECRET="n" * 40)
    assert settings.jwt_secret == SECRET
    assert (settings.jwt_secret_source, settings.sources["JWT_SECRET"]) == ("JWT_SECRET", ".env JWT_SECRET")
    settings = load(None, NEXTAUTH_SECRET="n" * 40)
    assert (settings.jwt_secret_source, settings.sources["JWT_SECRET"]) == (
        "NEXTAUTH_SECRET",
        "env NEXTAUTH_SECRET",
    )


# -- rows that depend on others -----------------------------------------------------------------------------


def test_embedded_default_database_secret_and_key(tmp_path: Path) -> None:
    settings = load(FONANA_WS_DATA_DIR="data")
    assert settings.embedded and settings.database_url == "sqlite+aiosqlite:///data/fonana.db"
    assert settings.sources["DATABASE_URL"] == "default"
    secret, key = tmp_path / "data" / "dev-secret", tmp_path / "data" / "dev-api-key"
    assert settings.jwt_secret == secret.read_text().strip() and len(settings.jwt_secret) >= 64
    assert settings.api_key == key.read_text().strip() and settings.api_key != settings.jwt_secret
    assert stat.S_IMODE(secret.stat().st_mode) == stat.S_IMODE(key.stat().st_mode) == 0o600
    assert settings.jwt_secret_source == settings.sources["JWT_SECRET"] == "dev secret file data/dev-secret"
    assert settings.sources["WS_API_KEY"] == "dev key file data/dev-api-key"
    again = load(FONANA_WS_DATA_DIR="data")  # a restart keeps them: tokens minted before stay valid
    assert (again.jwt_secret, again.api_key) == (settings.jwt_secret, settings.api_key)


def test_data_dir_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load(FONANA_WS_DATA_DIR="~/fws").data_dir == tmp_path / "home" / "fws"


def test_postgres_needs_the_web_apps_secret_and_generates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(DATABASE_URL=PG)
    assert str(caught.value) == (
        "JWT_SECRET (or NEXTAUTH_SECRET) must be set when DATABASE_URL points at PostgreSQL: "
        "use the web app's secret"
    )
    settings = load(DATABASE_URL=PG, JWT_SECRET=SECRET)
    assert not settings.embedded and settings.api_key is None
    assert settings.sources["WS_API_KEY"] == "default"
    assert not (tmp_path / ".fonana-ws").exists()


def test_metrics_port_must_differ_from_the_main_port() -> None:
    for env, port in [({"METRICS_PORT": "3002"}, 3002), ({"METRICS_PORT": "4000", "PORT": "4000"}, 4000)]:
        with pytest.raises(ConfigError) as caught:
            load(**env)
        assert str(caught.value) == (
            f"METRICS_PORT must differ from WS_PORT ({port}): /metrics is on the main port already"
        )
    assert load(METRICS_PORT="9090").metrics_port == 9090


def test_every_bad_value_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(WS_PORT="abc", LOG_JSON="maybe", WS_API_KEY="short")
    assert str(caught.value) == (
        "WS_PORT must be a whole number, got 'abc'; WS_API_KEY is too short (5 characters); use at least 16; "
        "LOG_JSON must be true or false, got 'maybe'"
    )
    assert not (tmp_path / ".fonana-ws").exists()  # no development secret for a start that fails


# -- the object -------------------------------------------------------------------------------------------


def test_settings_are_immutable_picklable_and_keep_secrets_out_of_repr() -> None:
    settings = load(WS_API_KEY="k" * 40, JWT_SECRET=SECRET, WS_PORT="4000")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    copy = pickle.loads(pickle.dumps(settings))
    assert copy == settings and copy.sources == settings.sources and copy.port == 4000
    assert SECRET not in repr(settings) and "k" * 40 not in repr(settings) and "port=4000" in repr(settings)
    assert Settings(broadcast_url="redis://h", max_connections_per_user=7).broker_kind == "redis"
