"""The README's settings tables and ``config/.env.example``, written from the settings table.

``python -m fonana_ws.config.docs`` rewrites both (the README only between its two markers);
``tests/test_settings_docs.py`` fails while either differs from what this renders.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from .table import SECTIONS, SETTINGS, Setting

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
ENV_EXAMPLE = ROOT / "config" / ".env.example"
BEGIN = "<!-- settings: written by `python -m fonana_ws.config.docs` from src/fonana_ws/config/table.py -->"
END = "<!-- end of settings -->"

ENV_HEADER = """\
# fonana-ws settings. Copy to .env (next to where you run `fonana-ws serve`) or set them in the
# environment; the environment wins. Nothing here is required for a first run: with no settings at all
# the server uses the memory broker and a SQLite file in ./.fonana-ws/. Uncomment what you set.
# Written by `python -m fonana_ws.config.docs` from src/fonana_ws/config/table.py: edit the table, not this.
"""


def unset(value: object) -> bool:
    return value is None or value == () or value == ""


def default_cell(row: Setting) -> str:
    """The README's default: the row's words for a computed one, else the value."""
    if row.default_doc:
        return row.default_doc
    return "unset" if unset(row.default) else f"`{row.show(row.default)}`"


def names_cell(row: Setting) -> str:
    return ", else ".join(f"`{name}`" for name in row.names)


def example_value(row: Setting) -> str:
    """The value after ``#NAME=`` in .env.example: a useful example, else the default, else nothing."""
    if row.example:
        return row.example
    return "" if unset(row.default) or row.default_doc else row.show(row.default)


def readme_section() -> str:
    lines = [BEGIN]
    for section, intro in SECTIONS.items():
        lines += ["", f"### {section}", ""]
        if intro:
            lines += [*textwrap.wrap(intro, 105), ""]
        lines += ["| setting | default | values | meaning |", "|---|---|---|---|"]
        for row in SETTINGS:
            if row.section == section:
                values = row.kind.describe() or "any"
                lines.append(f"| {names_cell(row)} | {default_cell(row)} | {values} | {row.doc} |")
    return "\n".join([*lines, "", END])


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text.replace("`", ""), 108, initial_indent="# ", subsequent_indent="# ")


def env_example() -> str:
    lines = [ENV_HEADER.rstrip("\n")]
    for section, intro in SECTIONS.items():
        lines += ["", f"# -- {section} ".ljust(110, "-")]
        if intro:
            lines += _comment(intro)
        for row in SETTINGS:
            if row.section != section:
                continue
            text = row.doc[0].upper() + row.doc[1:] + "."
            if row.aliases:
                text += " Also read as " + " or ".join(row.aliases) + "."
            values = [row.kind.describe()]
            if example_value(row) != row.show(row.default):  # the line below does not show the default
                values.append("default " + default_cell(row))
            if values := "; ".join(v for v in values if v):
                text += f" ({values})"
            lines += [*_comment(text), f"#{row.env}={example_value(row)}"]
    return "\n".join(lines) + "\n"


def replace_section(readme: str) -> str:
    """``readme`` with the text from ``BEGIN`` to ``END`` replaced by the rendered tables."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the two markers {BEGIN!r} and {END!r} around its settings tables")
    return readme[:start] + readme_section() + readme[end + len(END) :]


def main() -> int:
    README.write_text(replace_section(README.read_text()))
    ENV_EXAMPLE.write_text(env_example())
    print(f"wrote {README} (settings section) and {ENV_EXAMPLE}: {len(SETTINGS)} settings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
