"""Read the settings: for each row of the table, its variables in the process environment, then in the
``.env`` file; parse, check against the others, and only then write the embedded default's files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .kinds import ConfigError
from .table import SETTINGS, Settings


def read_env_file(env_file: str | Path | None) -> dict[str, str]:
    """The ``.env`` file's variables (none when there is no such file)."""
    if not env_file or not Path(env_file).is_file():
        return {}
    # python-dotenv is ~10 ms of imports (logging, tempfile, ...): only paid when there is a file to read.
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(env_file).items() if v is not None}


def lookup(
    names: tuple[str, ...], environ: Mapping[str, str], dotenv: Mapping[str, str]
) -> tuple[str, str, str] | None:
    """``(raw value, variable, "env" or ".env")`` of the first of ``names`` that is set, each name in the
    environment before the ``.env`` file; an empty value counts as unset."""
    for name in names:
        for where, layer in (("env", environ), (".env", dotenv)):
            if layer.get(name):
                return layer[name], name, where
    return None


def load_settings(environ: dict[str, str] | None = None, env_file: str | Path | None = ".env") -> Settings:
    """Read the settings; the process environment wins over the ``.env`` file.

    Every bad value is named in one ``ConfigError`` (``; ``-separated), so a start that fails on one
    does not hide the next.
    """
    environ = dict(os.environ if environ is None else environ)
    dotenv = read_env_file(env_file)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    read_as: dict[str, str] = {}
    problems: list[str] = []
    for row in SETTINGS:
        found = lookup(row.names, environ, dotenv)
        if found is None:
            values[row.attr], sources[row.env] = row.default, "default"
            continue
        raw, name, where = found
        try:
            values[row.attr] = row.kind(name, raw)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        sources[row.env], read_as[row.env] = f"{where} {name}", name
    _stop_on(problems)

    unset = [row for row in SETTINGS if row.env not in read_as]
    for row in unset:
        if row.derive is not None:
            values[row.attr] = row.derive(values)
    for row in SETTINGS:
        if row.check is not None and (message := row.check(values[row.attr], values)):
            problems.append(message)
    _stop_on(problems)

    # Last, once nothing can fail any more: the development secrets are files written on first use.
    for row in unset:
        if row.generate is not None:
            values[row.attr], sources[row.env] = row.generate(values)
    return Settings(
        **values,
        jwt_secret_source=read_as.get("JWT_SECRET") or sources["JWT_SECRET"],
        sources=sources,
    )


def _stop_on(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))
