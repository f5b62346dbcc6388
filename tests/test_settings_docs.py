"""Every setting the server reads is documented where operators look: the README's table,
config/.env.example and ``fonana-ws config``. A setting added to ``config.load_settings`` and forgotten
in one of them fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fonana_ws import config
from fonana_ws_cli.ops import effective

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
#: Names read only as another setting's old spelling (documented next to it).
ALIASES = {"PORT", "NEXTAUTH_SECRET", "REDIS_URL"}


def read_by_the_server() -> set[str]:
    source = Path(config.__file__).read_text()
    return set(re.findall(r'get\("([A-Z][A-Z0-9_]*)"', source))


def test_the_scan_finds_the_settings() -> None:
    names = read_by_the_server()
    assert {"WS_PORT", "WS_CLIENT_RATE", "DATABASE_URL"} <= names and len(names) > 25


@pytest.mark.parametrize("name", sorted(read_by_the_server() - ALIASES))
def test_every_setting_is_in_the_readme_table_and_env_example(name: str) -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "config" / ".env.example").read_text()
    table_rows = [line for line in readme.splitlines() if line.startswith("| `")]
    assert any(f"`{name}`" in row for row in table_rows), f"{name} missing from README's settings table"
    assert re.search(rf"^#?{name}=", example, re.M), f"{name} missing from config/.env.example"


def test_fonana_ws_config_shows_every_setting(tmp_path: Path) -> None:
    settings = config.load_settings({"FONANA_WS_DATA_DIR": str(tmp_path)}, env_file=None)
    shown = " ".join(variable for variable, _, _ in effective(settings))
    missing = [n for n in sorted(read_by_the_server() - ALIASES) if n not in shown]
    assert not missing, f"fonana-ws config leaves out {missing}"


def test_reading_the_settings_loads_no_server() -> None:
    """``import fonana_ws.config`` (what ``fonana-ws token`` and ``config`` need) loads no web server,
    ASGI framework or database driver: the package root imports its names lazily."""
    import subprocess
    import sys

    code = (
        "import sys, fonana_ws.config; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'uvicorn', 'starlette', 'asyncpg', 'sqlalchemy', 'databases', 'redis', 'websockets'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
