"""The database going away under a running server: /ready says so, connects are refused with a reason
that names it, and /health stays up."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
import websockets

from .conftest import PG_URL, fresh_pg_database, make_settings, running


async def test_database_down_is_reported_and_refused(tmp_path: Path) -> None:
    async with fresh_pg_database() as url:
        async with running(make_settings(tmp_path, url)) as srv:
            user = await srv.user()
            client = await srv.connect(user)  # works while the database does
            await client.close()
            assert (await srv.http.get("/ready")).status_code == 200

            admin = await asyncpg.connect(PG_URL)
            try:  # the database disappears under the server (its connections are terminated)
                await admin.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
            finally:
                await admin.close()

            ready = await srv.http.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["database"].startswith("down") and ready.json()["broker"] == "ok"
            assert (await srv.http.get("/health")).status_code == 200
            stranger = srv.token("never-seen-before")  # not in the user cache: must ask the database
            async with websockets.connect(f"{srv.ws_url}?token={stranger}") as ws:
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1008
            assert info.value.rcvd.reason == "Unauthorized: user lookup failed (database unavailable)"
