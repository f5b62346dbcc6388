"""Operator commands: check-token, find-user, test-client, doctor, config (issue 5)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the operator commands to the main ``fonana-ws`` app."""
