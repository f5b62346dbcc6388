"""The ``fonana-ws`` command: thin Typer wrappers over the library's public functions."""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from fonana_ws.auth import create_token
from fonana_ws.config import ConfigError

from .common import err, parse_duration, settings_or_exit

app = typer.Typer(help="Fonana's real-time WebSocket server.", no_args_is_help=True, add_completion=False)


@app.command()
def serve(
    host: str = typer.Option(None, help="Interface to listen on (env WS_HOST, default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (env WS_PORT, default 3002)."),
    broadcast_url: str = typer.Option(
        None, help="memory://, redis://... or postgresql://... (env BROADCAST_URL)."
    ),
    database_url: str = typer.Option(None, help="postgresql://... or sqlite:///... (env DATABASE_URL)."),
    workers: int = typer.Option(
        1,
        min=1,
        max=64,
        help="Processes sharing the port; more than 1 needs a shared broker (Redis/PostgreSQL).",
    ),
) -> None:
    """Run the server (memory broker and a local SQLite file when nothing is configured)."""
    from fonana_ws.server import serve as run

    overrides = {
        "WS_HOST": host,
        "WS_PORT": str(port) if port is not None else None,
        "BROADCAST_URL": broadcast_url,
        "DATABASE_URL": database_url,
    }
    settings = settings_or_exit(**overrides)
    # Worker processes read their settings from the environment: the options must be there too.
    os.environ.update({k: v for k, v in overrides.items() if v is not None})
    if settings.embedded and not settings.log_json:  # JSON logs stay one object per line
        from fonana_ws.db import demo

        err.print(f"[bold]Embedded mode[/bold]: SQLite at {settings.database_url.split(':///', 1)[1]}")
        for user_id, what in demo.DEMO_USERS.items():
            err.print(f"  demo user [cyan]{user_id}[/cyan]: {what}")
        err.print(f"  mint a token:  fonana-ws token --user {demo.SUBSCRIBER}")
        err.print(
            f"  connect:       ws://{settings.host}:{settings.port}/ws?token=TOKEN\n"
            f'  publish:       curl -H "Authorization: Bearer $(cat {settings.data_dir}/dev-api-key)" '
            f'-d \'{{"channel":"post_{demo.OPEN_POST}","event":{{"type":"hello"}}}}\' '
            f"http://{settings.host}:{settings.port}/api/publish"
        )
    from fonana_ws.web.console import url as console_url

    if (where := console_url(settings)) and not settings.log_json:
        err.print(f"[bold]Console[/bold]: {where}")
    try:
        started = run(settings, workers)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    if not started:
        err.print("[red]the server did not start[/red] (see the log above)")
        raise typer.Exit(1)


@app.command()
def token(
    user: str = typer.Option(..., "--user", "-u", help="The user id to put in the token (userId claim)."),
    expires: str = typer.Option("30m", help="Lifetime, e.g. 90s, 30m, 2h, 7d."),
) -> None:
    """Print a JWT this server accepts (same secret as `serve`), and nothing else."""
    settings = settings_or_exit()
    sys.stdout.write(create_token(settings.jwt_secret, user, parse_duration(expires)) + "\n")


from . import disconnect, ops, revoke, send  # noqa: E402  (commands register on the app above)

app.add_typer(send.app, name="send")
app.command("disconnect")(disconnect.disconnect)
app.command("revoke")(revoke.revoke)
ops.register(app)


def main() -> None:
    app()
