"""Pure functions behind the hardening of the input paths: nesting limits, log escaping, forwarded
addresses and the access-decision cache. No server, no database."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from fonana_ws.db import store as store_module
from fonana_ws.db.store import AccessCache
from fonana_ws.logs import TextFormatter, escape_controls, field_value
from fonana_ws.net import client_address
from fonana_ws.protocol import frames as protocol
from fonana_ws.protocol.frames import FrameError, nested_deeper_than, parse_frame

pytestmark = pytest.mark.unit

TRUSTED = ("127.0.0.1", "::1")


def nest(depth: int, inner: Any = 1) -> Any:
    """``depth`` levels of objects and lists around ``inner`` (``nest(1)`` is ``{"k": 1}``)."""
    value = inner
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


# -- nesting --------------------------------------------------------------------------------------------


def test_depth_is_counted_in_containers() -> None:
    assert not nested_deeper_than("text", 0)
    assert not nested_deeper_than({}, 1) and nested_deeper_than({}, 0)
    assert not nested_deeper_than({"a": [1, {"b": 2}]}, 3)
    assert nested_deeper_than({"a": [1, {"b": [2]}]}, 3)
    for depth in (1, 32, 64, 65):
        assert not nested_deeper_than(nest(depth), depth)
        assert nested_deeper_than(nest(depth), depth - 1)


def test_depth_of_values_deeper_than_recursion_allows() -> None:
    deep = nest(100_000)  # a recursive walk (or orjson) would fail long before
    assert nested_deeper_than(deep, 64)
    assert not nested_deeper_than(deep, 100_000)


def test_depth_check_follows_every_branch() -> None:
    wide = {"flat": list(range(10_000)), "deep": [[[[[[1]]]]]]}
    assert nested_deeper_than(wide, 6) and not nested_deeper_than(wide, 7)


def test_a_frame_nested_too_deep_is_a_frame_error() -> None:
    ok = {"type": "subscribe", "channel": {"type": "post", "postId": "p", "x": nest(30)}}
    assert parse_frame(orjson.dumps(ok)).channel == ok["channel"]  # 32 levels
    for depth in (33, 300, 1000):  # 1000: parsed by orjson (up to 1024), but not encodable past 254
        inner = "[" * (depth - 1) + "1" + "]" * (depth - 1)
        with pytest.raises(FrameError, match="nested deeper than 32"):
            parse_frame('{"type": "subscribe", "channel": ' + inner + "}")


def test_error_frames_never_echo_what_cannot_be_encoded() -> None:
    assert orjson.loads(protocol.error("Invalid message format", {"type": "x"})) == {
        "type": "error",
        "data": {"message": "Invalid message format", "channel": {"type": "x"}},
    }
    for channel in (nest(300), nest(33), {"type": "post", "postId": object()}):
        frame = orjson.loads(protocol.error(protocol.INVALID_FORMAT, channel, reason="r"))
        assert frame == {"type": "error", "data": {"message": protocol.INVALID_FORMAT, "reason": "r"}}


# -- logs -----------------------------------------------------------------------------------------------


def test_control_characters_are_escaped() -> None:
    assert escape_controls("plain text\tand tab") == "plain text\tand tab"
    assert escape_controls("a\nb\rc\x00d\x1b[31me\x7ff\x85g\u2028h") == (
        "a\\nb\\rc\\x00d\\x1b[31me\\x7ff\\x85g\\u2028h"
    )
    assert len(escape_controls("x\n" * 100).splitlines()) == 1


def test_lifecycle_values_are_quoted_unless_plain() -> None:
    for plain in ("demo-user", "post_p-1", "203.0.113.7", "::1", "42", "True", "https://a.fonana.me"):
        assert field_value(plain) == plain
    assert field_value("6.6.6.6 user=demo-creator") == '"6.6.6.6 user=demo-creator"'
    assert field_value("a=b") == '"a=b"'
    assert field_value('say "hi"') == '"say \\"hi\\""'
    assert field_value("x\nfake line") == '"x\\nfake line"'
    assert field_value("") == '""'
    assert field_value("rate limit") == '"rate limit"'


def test_text_formatter_keeps_every_record_on_one_line() -> None:
    formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord(
        "fonana_ws.connection",
        logging.INFO,
        __file__,
        1,
        "denied key=%s",
        ("post_x\nINFO forged",),
        None,
    )
    line = formatter.format(record)
    assert line == "INFO fonana_ws.connection: denied key=post_x\\nINFO forged"


# -- forwarded addresses --------------------------------------------------------------------------------


def scope(peer: str, *forwarded: str) -> dict[str, Any]:
    return {"client": (peer, 5000), "headers": [(b"x-forwarded-for", v.encode()) for v in forwarded]}


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("127.0.0.1", ("198.51.100.1, 203.0.113.7",), "203.0.113.7"),
        ("127.0.0.1", ("198.51.100.1", "203.0.113.7, 127.0.0.1"), "203.0.113.7"),  # headers joined
        ("127.0.0.1", ("2001:db8:0:0::1",), "2001:db8::1"),  # normalized
        ("127.0.0.1", ("127.0.0.1, ::1",), "127.0.0.1"),  # all trusted: the first
        ("127.0.0.1", (), "127.0.0.1"),
        ("127.0.0.1", ("",), "127.0.0.1"),
        # Anything but IP addresses: the whole header is ignored.
        ("127.0.0.1", ("6.6.6.6 user=demo-creator",), "127.0.0.1"),
        ("127.0.0.1", ("198.51.100.1, 6.6.6.6 user=demo-creator",), "127.0.0.1"),
        ("127.0.0.1", ("203.0.113.7\nfake",), "127.0.0.1"),
        ("127.0.0.1", ("unknown",), "127.0.0.1"),
        ("127.0.0.1", ("203.0.113.7:443",), "127.0.0.1"),
        ("127.0.0.1", ("1.2.3.4", "evil"), "127.0.0.1"),
        # Not a trusted proxy: the header is not looked at.
        ("192.0.2.9", ("203.0.113.7",), "192.0.2.9"),
    ],
)
def test_client_address_trusts_only_well_formed_hops(
    peer: str, forwarded: tuple[str, ...], expected: str
) -> None:
    assert client_address(scope(peer, *forwarded), TRUSTED) == expected


# -- access decisions -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(store_module.time, "monotonic", clock.monotonic)
    return clock


def test_access_decisions_are_remembered_for_the_ttl(clock: Clock) -> None:
    cache = AccessCache(ttl=5, size=100)
    assert cache.get("u", "post_p") is None
    cache.put("u", "post_p", False)
    cache.put("u", "post_q", True)
    assert cache.get("u", "post_p") is False and cache.get("u", "post_q") is True
    assert cache.get("v", "post_p") is None
    clock.now += 4.9
    assert cache.get("u", "post_p") is False
    clock.now += 0.2
    assert cache.get("u", "post_p") is None and len(cache) == 1  # expired, and dropped


def test_access_cache_is_bounded_oldest_first(clock: Clock) -> None:
    cache = AccessCache(ttl=5, size=3)
    for i in range(3):
        cache.put("u", f"post_{i}", True)
        clock.now += 0.1
    cache.put("u", "post_0", False)  # renewed: now the newest
    cache.put("u", "post_3", True)
    assert len(cache) == 3
    assert cache.get("u", "post_1") is None
    assert cache.get("u", "post_0") is False and cache.get("u", "post_3") is True


def test_access_cache_off_and_forget(clock: Clock) -> None:
    off = AccessCache(ttl=0)
    off.put("u", "post_p", True)
    assert off.get("u", "post_p") is None
    cache = AccessCache()
    cache.put("u", "post_p", True)
    cache.put("v", "post_p", True)
    cache.forget("u")
    assert cache.get("u", "post_p") is None and cache.get("v", "post_p") is True
    cache.forget()
    assert len(cache) == 0
