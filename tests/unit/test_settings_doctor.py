"""``fonana-ws doctor``'s checks on values come from the settings table: the loader's own messages for a
secret or key that would stop the start, ``unsafe`` rows while on, ``production`` rows left unset."""

from __future__ import annotations

from pathlib import Path

import pytest

from fonana_ws.config import SETTINGS, load_settings
from fonana_ws_cli import doctor

pytestmark = pytest.mark.unit

SECRET = "s" * 32
PG = "postgresql://postgres@127.0.0.1:5432/x"


def lines(report: doctor.Report) -> dict[str, tuple[str, str]]:
    return {c.name: (c.status, c.detail) for c in report.checks}


def test_a_short_secret_or_key_gets_the_loaders_message() -> None:
    report = doctor.Report()
    assert not doctor.check_secret(report, {"NEXTAUTH_SECRET": "short"}, {}, postgres=True)
    assert lines(report)["secret"] == (
        "FAIL",
        "NEXTAUTH_SECRET is too short (5 characters); use at least 16 (set in env)",
    )
    report = doctor.Report()
    assert doctor.check_secret(report, {}, {"JWT_SECRET": SECRET}, postgres=True)
    assert lines(report)["secret"] == ("ok", f"from JWT_SECRET (.env), {len(SECRET)} characters")

    settings = load_settings({"DATABASE_URL": PG, "JWT_SECRET": SECRET}, env_file=None)
    report = doctor.Report()
    doctor.check_api_key(report, settings, "tiny")
    assert lines(report)["api key"] == ("FAIL", "WS_API_KEY is too short (4 characters); use at least 16")


def test_unsafe_rows_warn_while_on(tmp_path: Path) -> None:
    unsafe = [row for row in SETTINGS if row.unsafe]
    assert [row.env for row in unsafe] == ["WS_CONFORMANCE_ECHO"]
    base = {"FONANA_WS_DATA_DIR": str(tmp_path)}
    report = doctor.Report()
    doctor.check_values(report, load_settings({**base, "WS_CONFORMANCE_ECHO": "1"}, env_file=None))
    status, detail = lines(report)["unsafe"]
    assert status == "warn" and detail.startswith("WS_CONFORMANCE_ECHO is on: /conformance/echo echoes")
    report = doctor.Report()
    doctor.check_values(report, load_settings(base, env_file=None))
    assert report.checks == []  # embedded and nothing on: nothing to say


def test_production_rows_warn_when_unset_outside_the_embedded_default() -> None:
    wanted = [row.env for row in SETTINGS if row.production]
    assert wanted == ["WS_ALLOWED_ORIGINS", "WS_CONNECT_RATE"]
    base = {"DATABASE_URL": PG, "JWT_SECRET": SECRET}
    report = doctor.Report()
    doctor.check_values(report, load_settings(base, env_file=None))
    status, detail = lines(report)["production"]
    assert status == "warn"
    assert detail == (
        "not set on a production setup: WS_ALLOWED_ORIGINS (e.g. https://fonana.me: browsers of other sites "
        "refused); WS_CONNECT_RATE (e.g. 30/10 seconds: upgrades per client address)"
    )
    report = doctor.Report()
    env = {**base, "WS_ALLOWED_ORIGINS": "https://fonana.me", "WS_CONNECT_RATE": "30/10 seconds"}
    doctor.check_values(report, load_settings(env, env_file=None))
    assert lines(report)["production"] == (
        "ok",
        "WS_ALLOWED_ORIGINS=https://fonana.me, WS_CONNECT_RATE=30/10 seconds",
    )
