"""Prose that quotes a setting's default agrees with the settings table.

The README's settings tables are written from the table; the protocol and deployment docs explain
settings in their own words and quote defaults as ``WS_NAME`` (``value``). This catches the quote that
was right when written and drifted since.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fonana_ws.config.table import SETTINGS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "API_INTEGRATION_GUIDE.md", *sorted((ROOT / "docs").glob("*.md"))]
#: `NAME` (`value` -- the form the docs use to quote a default.
QUOTE = re.compile(r"`([A-Z][A-Z0-9_]+)` \(`([^`]+)`")


ROWS = {name: row for row in SETTINGS for name in row.names}


def quotes() -> list[tuple[str, str, str]]:
    """(document, setting, quoted value); backticked names that are no setting (close codes) are not."""
    found = []
    for path in DOCS:
        for name, value in QUOTE.findall(path.read_text()):
            if name in ROWS:
                found.append((path.name, name, value))
    return found


def test_the_docs_quote_some_defaults() -> None:
    assert len(quotes()) >= 5, "the pattern no longer finds the quoted defaults: update QUOTE"


@pytest.mark.parametrize(("doc", "name", "value"), quotes())
def test_a_quoted_default_is_the_tables(doc: str, name: str, value: str) -> None:
    row = ROWS[name]
    table = row.show(row.default)
    assert value == table, f"{doc} quotes {name} as {value!r}; the table says {table!r}"
