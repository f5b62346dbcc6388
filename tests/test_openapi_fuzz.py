"""Schemathesis against the OpenAPI description of a real server process: every documented operation,
valid and invalid inputs (``mode = all``), no 5xx and no traceback or ERROR line in the server's log.

The server runs as ``fonana-ws serve`` (embedded SQLite, memory broker, a clean environment) so that
schemathesis' blocking HTTP client can talk to it while the test loop is idle. Bounded: 20 examples per
operation and generation mode, deterministic, no example database.

The schema is loaded at import from ``openapi_document()``, which ``test_the_server_serves_this_document``
holds equal to what ``GET /api/openapi.json`` serves (and to what ``openapi.from_url`` loads from it):
schemathesis' lazy loader (``schemathesis.pytest.from_fixture``, the way to test a server a fixture
starts) fails on pytest 9 (it sets ``request.node._nodeid``, gone from pytest's nodes).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest
import requests
import schemathesis
from schemathesis import checks

from fonana_ws.web.events_api import openapi_document

from .conftest import API_KEY, SECRET, ServerProcess

pytestmark = pytest.mark.timeout(300)

MAX_EXAMPLES = 20
AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: A traceback, or a line at ERROR or CRITICAL in the text log format (``date time LEVEL logger: ...``).
BAD_LINE = re.compile(r"Traceback \(most recent call last\)|^\S+ \S+ (ERROR|CRITICAL) ", re.M)


def config(max_examples: int) -> Any:
    return schemathesis.Config.from_dict(
        {
            "headers": AUTH,
            "request-timeout": 10,
            "generation": {
                "mode": "all",
                "max-examples": max_examples,
                "deterministic": True,
                "database": "none",
            },
        }
    )


CONFIG = config(MAX_EXAMPLES)
schema = schemathesis.openapi.from_dict(openapi_document(), config=CONFIG)
#: More examples where the rule is hard (no 5xx): the run stays in seconds.
deep = schemathesis.openapi.from_dict(openapi_document(), config=config(3 * MAX_EXAMPLES))
INPUT_CHECKS = [checks.positive_data_acceptance, checks.negative_data_rejection]
OPERATIONS = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}


class LogWatch:
    """New lines of the server's log since the last look."""

    def __init__(self, proc: ServerProcess) -> None:
        self.proc = proc
        self.offset = 0

    def new(self) -> str:
        text = self.proc.log()
        fresh, self.offset = text[self.offset :], len(text)
        return fresh


@pytest.fixture(scope="module")
async def api_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServerProcess]:
    tmp = Path(tmp_path_factory.mktemp("openapi-fuzz"))
    env = {"JWT_SECRET": SECRET, "WS_API_KEY": API_KEY, "FONANA_WS_DATA_DIR": str(tmp / "data")}
    async with ServerProcess(env, tmp, inherit=False) as proc:
        yield proc
    assert not BAD_LINE.search(proc.log()), proc.log()


@pytest.fixture(scope="module")
def server_log(api_server: ServerProcess) -> LogWatch:
    return LogWatch(api_server)


def test_the_server_serves_this_document(api_server: ServerProcess) -> None:
    url = api_server.http_url + "/api/openapi.json"
    served = requests.get(url, timeout=10)
    assert served.status_code == 200
    assert served.json() == orjson.loads(orjson.dumps(openapi_document()))
    loaded = schemathesis.openapi.from_url(url, config=CONFIG)
    assert {
        (op.method.upper(), op.path) for op in (r.ok() for r in loaded.get_all_operations())
    } == OPERATIONS


def test_the_document_lists_every_api_route() -> None:
    paths = {path for _, path in OPERATIONS}
    assert "/api/publish" in paths
    assert len([p for p in paths if p.startswith("/api/events/")]) >= 10, sorted(paths)


def call(case: Any, server: ServerProcess) -> Any:
    with requests.Session() as session:
        return case.call(base_url=server.http_url, session=session)


@deep.parametrize()
def test_no_server_error(case: Any, api_server: ServerProcess, server_log: LogWatch) -> None:
    """Hard rule: no 5xx for any input, valid or not, and nothing alarming in the log; and the answers
    are as documented (status codes, content types, bodies, the key enforced)."""
    response = call(case, api_server)
    curl = case.as_curl_command()
    assert response.status_code < 500, f"{response.status_code} for {curl}: {response.text}"
    fresh = server_log.new()
    assert not BAD_LINE.search(fresh), f"server log after {curl}:\n{fresh}"
    case.validate_response(response, excluded_checks=INPUT_CHECKS)


@schema.parametrize()
def test_validation_matches_the_document(case: Any, api_server: ServerProcess) -> None:
    """Input the document allows is accepted, input it forbids is refused (4xx)."""
    case.validate_response(call(case, api_server), checks=INPUT_CHECKS)


def body_schema(path: str) -> Any:
    return openapi_document()["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


EVENT = {"type": "earnings_updated"}
NOTE = {"userId": "U", "type": "LIKE_POST", "title": "t", "message": "m"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/publish", {"user": "U", "event": EVENT, "channel": None}),
        ("/api/publish", {"channel": "post_P", "event": EVENT, "user": None}),
        ("/api/publish", {"user": "U", "event": EVENT, "id": None}),
        ("/api/publish", {"event": {"type": "0"}}),
        ("/api/publish", {"channel": "", "event": EVENT}),
        ("/api/publish", {"channel": "post_", "event": EVENT}),
        ("/api/publish", {"channel": "post_" + "p" * 201, "event": EVENT}),
        ("/api/publish", {"channel": "notifications_" + "u" * 200 + "\n", "event": EVENT}),
        ("/api/publish", {"user": "u" * 201, "event": EVENT}),
        ("/api/publish", {"user": "U", "event": EVENT, "id": "e" * 101}),
        ("/api/events/notification", {**NOTE, "createdAt": "2024-01-02T03:04:05Z", "persist": True}),
    ],
)
def test_what_the_document_forbids_the_server_refuses(
    path: str, body: dict[str, Any], api_server: ServerProcess
) -> None:
    """The drift schemathesis found, pinned: each body is outside the document and answered 400."""
    assert not jsonschema_rs.Draft202012Validator(body_schema(path)).is_valid(body)
    response = requests.post(api_server.http_url + path, json=body, headers=AUTH, timeout=10)
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    "body",
    [
        {"channel": "post_P", "event": EVENT},
        {"channel": "notifications_" + "u" * 200, "event": EVENT},
        {"channel": "feed_a\nb", "user": "u" * 200, "event": EVENT, "id": "e" * 100},
    ],
)
def test_what_the_document_allows_the_server_publishes(
    body: dict[str, Any], api_server: ServerProcess
) -> None:
    assert jsonschema_rs.Draft202012Validator(body_schema("/api/publish")).is_valid(body)
    response = requests.post(api_server.http_url + "/api/publish", json=body, headers=AUTH, timeout=10)
    assert response.status_code == 202, response.text
