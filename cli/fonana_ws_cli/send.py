"""``fonana-ws send <event>``: emit any Fonana event through the HTTP API or the broker (issue 4)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Send a Fonana event to connected clients.", no_args_is_help=True)
