"""Every setting is documented where operators look, from the one table (``fonana_ws.config.table``): the
README's settings tables, config/.env.example and ``fonana-ws config``. ``python -m fonana_ws.config.docs``
writes the first two; a row added to the table and not written out, or a hand edit, fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fonana_ws.config import BY_NAME, SETTINGS, Setting, docs, load_settings
from fonana_ws_cli.ops import effective

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLE = (ROOT / "config" / ".env.example").read_text()
REWRITE = "stale: run .venv/bin/python -m fonana_ws.config.docs"


def readme_section() -> str:
    start, end = README.find(docs.BEGIN), README.find(docs.END)
    assert 0 <= start < end, "README.md lost its settings markers"
    return README[start : end + len(docs.END)]


def readme_rows() -> dict[str, list[str]]:
    """The settings tables' rows: first variable -> the cells (variables, default, values, meaning)."""
    rows = {}
    for line in readme_section().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0])[0]] = cells
    return rows


def example_lines() -> dict[str, str]:
    return dict(re.findall(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", EXAMPLE, re.M))


def test_readme_and_env_example_are_written_from_the_table() -> None:
    assert readme_section() == docs.readme_section(), f"README.md's settings tables are {REWRITE}"
    assert EXAMPLE == docs.env_example(), f"config/.env.example is {REWRITE}"


@pytest.mark.parametrize("row", SETTINGS, ids=lambda row: row.env)
def test_every_setting_is_in_the_readme_and_env_example_with_its_default(row: Setting) -> None:
    """Read back from the files, not from the renderer: the row is there, under all its names, with the
    default the loader uses (``tests/unit/test_settings_table.py`` holds the loader to ``row.default``)."""
    cells = readme_rows().get(row.env)
    assert cells is not None, f"{row.env} missing from README's settings tables"
    assert re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]) == list(row.names)
    value = example_lines().get(row.env)
    assert value is not None, f"{row.env} missing from config/.env.example"
    if row.default_doc:
        assert cells[1] == row.default_doc
    elif row.default in (None, (), ""):
        assert cells[1] == "unset"
    else:
        assert cells[1] == f"`{row.show(row.default)}`"
        assert value == (row.example or row.show(row.default))


def test_nothing_documented_that_the_table_does_not_have() -> None:
    extra_readme = set(readme_rows()) - BY_NAME.keys()
    extra_example = set(example_lines()) - {row.env for row in SETTINGS}
    assert not extra_readme and not extra_example, (extra_readme, extra_example)
    assert len(readme_rows()) == len(example_lines()) == len(SETTINGS)


def test_fonana_ws_config_shows_every_setting(tmp_path: Path) -> None:
    settings = load_settings({"FONANA_WS_DATA_DIR": str(tmp_path)}, env_file=None)
    shown = effective(settings)
    assert [variable for variable, _, _ in shown] == [row.env for row in SETTINGS]
    by_name = {variable: (value, where) for variable, value, where in shown}
    assert by_name["FONANA_WS_DATA_DIR"] == (str(tmp_path), "env FONANA_WS_DATA_DIR")
    assert by_name["WS_PORT"] == ("3002", "default")
    for row in SETTINGS:
        if row.secret:
            assert getattr(settings, row.attr) not in by_name[row.env][0]
            assert by_name[row.env][0].endswith("characters, not shown)")


def test_settings_are_read_only_through_the_table() -> None:
    """No module reads a variable of its own from the environment: it would be in no table and no doc."""
    read = re.compile(r"""(?:environ\.get|getenv|environ\[)\(?\s*["']([A-Z][A-Z0-9_]*)["']""")
    assert read.findall('os.environ.get("WS_X") os.getenv("WS_Y") os.environ["WS_Z"]') == [
        "WS_X",
        "WS_Y",
        "WS_Z",
    ]
    sources = [*(ROOT / "src").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]
    assert len(sources) > 40
    outside = {name for path in sources for name in read.findall(path.read_text())} - BY_NAME.keys()
    assert not outside, f"read from the environment but not in the settings table: {sorted(outside)}"


def test_reading_the_settings_loads_no_server() -> None:
    """``import fonana_ws.config`` (what ``fonana-ws token`` and ``config`` need) loads no web server,
    ASGI framework or database driver: the package root imports its names lazily. Nor ``limits`` (~80 ms):
    only a rate that is set needs it."""
    import subprocess
    import sys

    code = (
        "import sys, fonana_ws.config; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'uvicorn', 'starlette', 'asyncpg', 'sqlalchemy', 'databases', 'redis', 'websockets', 'limits', "
        "'pydantic'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
