"""``/console``: the live console, a page the server serves itself (``WS_CONSOLE``).

The page and its few static files ship in the package (``web/console/``): no build step of its own, no
CDN, so it works offline. Its connection is the browser client of ``clients/js``, whose build copies its
one-file IIFE here (the package cannot reach ``clients/js`` at run time; a test keeps the copy exact).
The page itself holds nothing secret and is served to anyone who reaches it; everything it shows comes
from routes with their own rule: ``/stats`` (loopback not proxied, or the API key typed into the page),
``/api/publish`` (the API key) and ``/ws`` (a token). The one route of its own,
``POST /console/token``, mints a token and is served only on the embedded default, only to loopback.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from fonana_ws.auth import create_token
from fonana_ws.config import Settings
from fonana_ws.net import is_local_request
from fonana_ws.web import console_peers, metrics

PATH = "/console"
TOKEN_PATH = "/console/token"
PROCESSES_PATH = "/console/processes"
STATIC = Path(__file__).with_name("console")
#: The files the page loads, and their types; nothing else under the folder is served.
FILES = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "socket.js": "text/javascript; charset=utf-8",
    # The browser client's one-file build, a copy of clients/js/dist/fonana.iife.min.js (its build copies it).
    "fonana.iife.min.js": "text/javascript; charset=utf-8",
}
#: A minted token's lifetime, in seconds: long enough to play, short enough to forget.
TOKEN_SECONDS = 1800
MAX_USER_ID = 200
#: The page may load only its own files and talk only to its own origin.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def page(request: Request) -> Response:
    """``GET /console``: the page (index.html)."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


async def static(request: Request) -> Response:
    """``GET /console/{name}``: one of the page's own files."""
    name = request.path_params["name"]
    media = FILES.get(name)
    if media is None:
        return Response("Not Found", status_code=404, media_type="text/plain")
    return FileResponse(STATIC / name, media_type=media, headers=HEADERS)


async def mint(request: Request) -> Response:
    """``POST /console/token`` ``{"userId": U}``: a token for U, signed with the development secret.

    Only where the secret is the embedded default's own (SQLite: no real user's token can be made) and
    only for loopback, so that the page's "mint" button is no way in from elsewhere.
    """
    settings: Settings = request.app.state.services.settings
    if not settings.embedded:
        return JSONResponse({"error": "tokens are minted only on the embedded default"}, status_code=404)
    if not is_local_request(request.scope):
        return JSONResponse({"error": "tokens are minted only for loopback requests"}, status_code=403)
    try:
        body = await request.json()
    except ValueError:
        body = None
    user_id = body.get("userId") if isinstance(body, dict) else None
    if not isinstance(user_id, str) or not 0 < len(user_id) <= MAX_USER_ID:
        return JSONResponse({"error": f"userId must be 1 to {MAX_USER_ID} characters"}, status_code=400)
    token = create_token(settings.jwt_secret, user_id, TOKEN_SECONDS)
    return JSONResponse({"token": token, "expiresIn": TOKEN_SECONDS}, headers={"Cache-Control": "no-store"})


async def processes(request: Request) -> Response:
    """``GET /console/processes``: this process and the others behind a shared broker (as ``/stats``:
    loopback not proxied, or the API key)."""
    if not metrics.allowed(request):
        return metrics.unauthorized()
    peers = console_peers.peers_of(request.app.state.services)
    rows = await peers.processes()
    return JSONResponse({"shared": peers.shared, "processes": rows}, headers={"Cache-Control": "no-store"})


def routes(settings: Settings) -> list[BaseRoute]:
    """The console's routes when ``WS_CONSOLE`` is on, else none (``/console`` is then a 404)."""
    if not settings.console:
        return []
    return [
        Route(PATH, page, methods=["GET"]),
        Route(TOKEN_PATH, mint, methods=["POST"]),
        Route(PROCESSES_PATH, processes, methods=["GET"]),
        Route(PATH + "/{name}", static, methods=["GET"]),
    ]


def url(settings: Settings) -> str | None:
    """Where the console is, for ``fonana-ws serve`` to print (None when it is off)."""
    if not settings.console or not settings.port:  # port 0: any free one, not known yet
        return None
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}{PATH}"
