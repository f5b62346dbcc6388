"""Property-based fuzzing (hypothesis) of frame parsing and of the session rules, with the client's byte
stream split at random points.

Unit level: ``protocol.parse_frame`` and ``channels.channel_key`` on arbitrary input, and websockets'
``ServerProtocol`` (the parser under uvicorn's websockets-sansio protocol, arranged as ``wire.py`` leaves
it after the upgrade) fed masked client frames whole or split.

Server level: a real server and a raw TCP socket with a hand-made handshake; random valid client frames
(subscribe/unsubscribe of channels the user may or may not see, garbage, pings, fragmented messages,
protocol pings) concatenated, split and sent with small delays must get the replies a model predicts,
the same as an unsplit reference run, each exactly once and in order; random bytes after a valid prefix
must end in a 1002/1007/1009 close (or the echo of a close the bytes happen to hold), never a hang, and
never a traceback in the server's log.

Bounded: ``derandomize=True`` (the same examples every run), no example database, fixed example counts.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol
from websockets.server import ServerProtocol

from fonana_ws.protocol import frames as protocol
from fonana_ws.protocol.channels import ChannelError, channel_key, parse_key

from .conftest import Server, make_settings, running, without_history

pytestmark = pytest.mark.timeout(240)

MAX_SIZE = 65536  # WS_MAX_MESSAGE_SIZE's default, the server's uvicorn ws_max_size


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# ---------------------------------------------------------------------------------------------------
# Strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
channel_like = json_values | st.fixed_dictionaries(
    {"type": st.sampled_from(["post", "creator", "notifications", "feed", "bogus"]) | st.text(max_size=5)},
    optional={
        "postId": json_scalars,
        "id": json_scalars,
        "userId": json_scalars,
        "extra": json_values,
    },
)
frame_dicts = st.fixed_dictionaries(
    {"type": st.sampled_from(["ping", "subscribe", "unsubscribe", "pong", "Ping", ""]) | json_scalars},
    optional={"channel": channel_like, "data": json_values, "id": json_scalars},
)


# ---------------------------------------------------------------------------------------------------
# Unit level: parse_frame and channel_key


@pytest.mark.unit
@fuzz_settings(100)  # unit tier: seconds in all; the socket-level fuzz below goes deeper
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200), json_values.map(orjson.dumps)))
def test_parse_frame_raises_only_frame_error(raw: Any) -> None:
    for value in (raw, raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw):
        try:
            frame = protocol.parse_frame(value)
        except protocol.FrameError:
            continue
        assert isinstance(frame, protocol.ClientFrame)
        assert frame.type in ("ping", "subscribe", "unsubscribe", "typing")


@pytest.mark.unit
@fuzz_settings(100)  # unit tier: seconds in all; the socket-level fuzz below goes deeper
@given(frame_dicts, st.booleans())
def test_parse_frame_types_valid_frames(data: dict[str, Any], as_bytes: bool) -> None:
    raw = orjson.dumps(data)
    text: str | bytes = raw if as_bytes else raw.decode()
    kind = data["type"]
    if kind == "ping":
        assert protocol.parse_frame(text) == protocol.ClientFrame("ping")
    elif kind in ("subscribe", "unsubscribe") and "channel" in data:
        frame = protocol.parse_frame(text)
        assert frame.type == kind
        assert frame.channel == data["channel"]
    else:
        with pytest.raises(protocol.FrameError):
            protocol.parse_frame(text)


@pytest.mark.unit
@fuzz_settings(100)  # unit tier: seconds in all; the socket-level fuzz below goes deeper
@given(
    st.fixed_dictionaries(
        {"type": st.just("typing")},
        optional={"conversationId": json_scalars, "isTyping": json_scalars, "extra": json_values},
    )
)
def test_parse_frame_types_typing_frames(data: dict[str, Any]) -> None:
    conversation, is_typing = data.get("conversationId"), data.get("isTyping")
    valid = (
        not isinstance(conversation, bool)
        and isinstance(conversation, str | int)
        and 1 <= len(str(conversation)) <= 200
        and isinstance(is_typing, bool)
    )
    if valid:
        frame = protocol.parse_frame(orjson.dumps(data))
        assert (frame.type, frame.conversation_id, frame.is_typing) == (
            "typing",
            str(conversation),
            is_typing,
        )
    else:
        with pytest.raises(protocol.FrameError):
            protocol.parse_frame(orjson.dumps(data))


@pytest.mark.unit
@fuzz_settings(100)  # unit tier: seconds in all; the socket-level fuzz below goes deeper
@given(channel_like)
def test_channel_key_raises_only_channel_error(channel: Any) -> None:
    try:
        key = channel_key(channel)
    except ChannelError:
        return
    kind, ident = parse_key(key)
    assert kind == channel["type"]
    assert ident == str(channel[{"post": "postId", "creator": "id"}.get(kind, "userId")])


# ---------------------------------------------------------------------------------------------------
# Unit level: websockets' ServerProtocol, whole or split


def _payload(draw: Any, text: bool, big: bool) -> bytes:
    """A data payload: short and drawn, or long (up to the size limit) and seeded."""
    if not big:
        return draw(st.text(max_size=60)).encode() if text else draw(st.binary(max_size=60))
    n = draw(st.sampled_from([125, 126, 127, 65535, MAX_SIZE]) | st.integers(126, 3000))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    if not text:
        return rnd.randbytes(n)
    chars = "".join(rnd.choice('abcé€𝄞 {}"') for _ in range(n))
    return chars.encode()[:n].decode("utf-8", "ignore").encode()  # at most n bytes, valid UTF-8


@st.composite
def messages(draw: Any, max_messages: int = 6) -> list[Frame]:
    """Masked-to-be client frames: data messages (some fragmented, control frames between fragments),
    protocol pings and pongs; every message under ``MAX_SIZE``."""
    frames: list[Frame] = []
    for _ in range(draw(st.integers(1, max_messages))):
        kind = draw(st.sampled_from(["text", "binary", "ping", "pong", "fragmented"]))
        if kind in ("ping", "pong"):
            frames.append(
                Frame(Opcode.PING if kind == "ping" else Opcode.PONG, draw(st.binary(max_size=125)))
            )
            continue
        text = kind == "text" or (kind == "fragmented" and draw(st.booleans()))
        data = _payload(draw, text, draw(st.integers(0, 9)) == 0)
        if kind != "fragmented":
            frames.append(Frame(Opcode.TEXT if text else Opcode.BINARY, data))
            continue
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), min_size=1, max_size=4)))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        for i, part in enumerate(parts):
            opcode = (Opcode.TEXT if text else Opcode.BINARY) if i == 0 else Opcode.CONT
            frames.append(Frame(opcode, part, fin=i == len(parts) - 1))
            if i < len(parts) - 1 and draw(st.booleans()):
                frames.append(Frame(Opcode.PING, draw(st.binary(max_size=20))))
    return frames


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


def handshake_request(path: str = "/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


@dataclass
class Parsed:
    events: list[tuple[int, bytes, bool]] = field(default_factory=list)
    sent: bytes = b""
    close_code: int | None = None
    error: str | None = None


def parser_after_upgrade(handshake_chunks: list[bytes]) -> ServerProtocol:
    """A ServerProtocol that parsed (possibly split) upgrade request and accepted it, then had its parser
    replaced as ``FonanaWSProtocol.send`` does at ``websocket.accept``."""
    conn = ServerProtocol(max_size=MAX_SIZE)
    request = None
    for chunk in handshake_chunks:
        conn.receive_data(chunk)
        for event in conn.events_received():
            assert isinstance(event, Request)
            request = event
    assert request is not None and conn.handshake_exc is None
    conn.send_response(conn.accept(request))
    conn.data_to_send()
    assert not conn.reader.buffer
    conn.parser = Protocol.parse(conn)
    next(conn.parser)
    return conn


def feed(conn: Protocol, chunks: list[bytes]) -> Parsed:
    out = Parsed()
    for chunk in chunks:
        conn.receive_data(chunk)
        for event in conn.events_received():
            assert isinstance(event, Frame)
            out.events.append((int(event.opcode), bytes(event.data), event.fin))
        out.sent += b"".join(conn.data_to_send())
        if conn.parser_exc is not None:
            break
    if conn.close_sent is not None:
        out.close_code = conn.close_sent.code
    if conn.parser_exc is not None:
        out.error = type(conn.parser_exc).__name__
    return out


def serialize(frames: list[Frame]) -> bytes:
    return b"".join(f.serialize(mask=True) for f in frames)


@fuzz_settings(250)
@given(messages(), st.lists(st.integers(0, 10**6), max_size=30), st.lists(st.integers(0, 500), max_size=4))
def test_server_parser_same_events_whole_or_split(
    frames: list[Frame], cuts: list[int], handshake_cuts: list[int]
) -> None:
    request = handshake_request()
    stream = serialize(frames)
    whole = feed(parser_after_upgrade([request]), [stream])
    parts = feed(parser_after_upgrade(split(request, handshake_cuts)), split(stream, cuts))
    assert whole.error is None, whole.error
    assert whole.events == [(int(f.opcode), bytes(f.data), f.fin) for f in frames]
    assert parts.events == whole.events
    assert parts.sent == whole.sent  # the pongs, byte for byte
    # Every byte at once too (the worst split).
    if len(stream) < 400:
        assert feed(parser_after_upgrade([request]), [bytes([b]) for b in stream]).events == whole.events


@fuzz_settings(250)
@given(messages(3), st.binary(min_size=1, max_size=200), st.lists(st.integers(0, 10**6), max_size=20))
def test_server_parser_garbage_same_outcome_whole_or_split(
    frames: list[Frame], garbage: bytes, cuts: list[int]
) -> None:
    """Random bytes after a valid prefix: the same events and the same close, however split; a close
    the parser starts is 1002, 1007 or 1009, or the echo of a close frame the bytes held."""
    stream = serialize(frames) + garbage
    whole = feed(parser_after_upgrade([handshake_request()]), [stream])
    parts = feed(parser_after_upgrade([handshake_request()]), split(stream, cuts))
    assert parts.events == whole.events
    assert (parts.close_code, parts.error) == (whole.close_code, whole.error)
    if whole.error is not None:
        assert whole.close_code in (1002, 1007, 1009), whole
    elif whole.close_code is not None:
        assert any(op == Opcode.CLOSE for op, _, _ in whole.events)


# ---------------------------------------------------------------------------------------------------
# Server level


class ErrorLog(logging.Handler):
    """Every record at ERROR or above, or carrying a traceback, from any logger of the process."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)

    def take(self) -> list[str]:
        found = [f"{r.name} {r.levelname}: {r.getMessage()}\n{self.format(r)}" for r in self.records]
        self.records.clear()
        return found


@dataclass
class Fixture:
    srv: Server
    errors: ErrorLog
    creator: str
    open_post: str
    locked_post: str


@pytest.fixture(scope="module")
async def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fixture]:
    tmp = tmp_path_factory.mktemp("fuzz")
    errors = ErrorLog()
    root = logging.getLogger()
    root.addHandler(errors)
    # No keepalive pings (the raw client does not answer them); no frame rate limit (many frames).
    env = {"WS_PING_INTERVAL": "0", "WS_CLIENT_RATE": "1000000/1 second"}
    try:
        async with running(make_settings(Path(tmp), None, **env)) as srv:
            creator = await srv.user("creator", creator=True)
            yield Fixture(
                srv,
                errors,
                creator,
                await srv.post(creator),
                await srv.post(creator, locked=True),
            )
    finally:
        root.removeHandler(errors)
    assert not errors.take()


class RawWS:
    """A WebSocket client on a bare asyncio stream: the handshake by hand, frames as bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, token: str) -> RawWS:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(handshake_request(f"/ws?token={token}"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b" 101 " in head.split(b"\r\n", 1)[0], head
        return cls(reader, writer)

    async def send(self, chunks: list[bytes], delays: list[float] | None = None) -> None:
        for i, chunk in enumerate(chunks):
            self.writer.write(chunk)
            await self.writer.drain()
            if delays:
                await asyncio.sleep(delays[i % len(delays)])

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next server frame (opcode, payload); None at EOF."""

        async def read() -> tuple[int, bytes] | None:
            try:
                head = await self.reader.readexactly(2)
            except asyncio.IncompleteReadError as exc:
                assert not exc.partial, f"EOF inside a frame header: {exc.partial!r}"
                return None
            assert head[0] & 0x80 and not head[0] & 0x70, f"fragmented or RSV frame from server: {head!r}"
            assert not head[1] & 0x80, "a masked frame from the server"
            n = head[1] & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return head[0] & 0x0F, await self.reader.readexactly(n)

        return await asyncio.wait_for(read(), timeout)

    async def eof(self, timeout: float = 5.0) -> None:
        """The server ends the TCP connection within ``timeout`` (frames before the end are dropped)."""
        while await self.frame(timeout) is not None:
            pass

    def close_transport(self) -> None:
        self.writer.transport.abort()


def close_code(payload: bytes) -> int:
    return Close.parse(payload).code if payload else 1005


class Replies:
    """What the server sent: text frames in order, pong payloads in order."""

    def __init__(self) -> None:
        self.texts: list[Any] = []
        self.pongs: list[bytes] = []


async def collect(ws: RawWS, texts: int, pongs: int, timeout: float = 5.0) -> Replies:
    out = Replies()
    while len(out.texts) < texts or len(out.pongs) < pongs:
        frame = await ws.frame(timeout)
        assert frame is not None, f"server closed the connection; got {out.texts} {out.pongs}"
        opcode, payload = frame
        assert opcode != Opcode.CLOSE, f"server closed with {close_code(payload)}; got {out.texts}"
        if opcode == Opcode.TEXT:
            out.texts.append(without_history(orjson.loads(payload)))
        elif opcode == Opcode.PONG:
            out.pongs.append(payload)
        else:
            raise AssertionError(f"unexpected server frame {opcode}: {payload!r}")
    return out


@dataclass
class Step:
    """One client message of the session, as frames, and the text reply the model predicts (None: no
    text reply, e.g. a protocol ping, which gets a pong with ``pong``)."""

    frames: list[Frame]
    reply: Any = None
    pong: bytes | None = None


def channel_pool(fx: Fixture, user: str) -> list[tuple[Any, str | None]]:
    """(CHANNEL, the answer to subscribing): "ok", "denied", or None for a malformed CHANNEL."""
    return [
        ({"type": "notifications", "userId": user}, "ok"),
        ({"type": "feed", "userId": user}, "ok"),
        ({"type": "creator", "id": fx.creator}, "ok"),
        ({"type": "creator", "id": 12345}, "ok"),
        ({"type": "post", "postId": fx.open_post}, "ok"),
        ({"type": "post", "postId": fx.locked_post}, "denied"),
        ({"type": "post", "postId": "no-such-post"}, "denied"),
        ({"type": "notifications", "userId": "somebody-else"}, "denied"),
        ({"type": "feed", "userId": fx.creator}, "denied"),
        ({"type": "post"}, None),
        ({"type": "bogus", "id": "x"}, None),
        ({"type": "post", "postId": "x" * 201}, None),
        ({"type": "creator", "id": True}, None),
        ("post_" + fx.open_post, None),
        (None, None),
        ([1, 2], None),
    ]


def subscribe_reply(kind: str, channel: Any, verdict: str | None) -> Any:
    if verdict is None:
        data: dict[str, Any] = {"message": protocol.INVALID_FORMAT}
        if channel is not None:
            data["channel"] = channel
        return {"type": "error", "data": data}
    key = channel_key(channel)
    if kind == "unsubscribe":
        return {"type": "unsubscribed", "data": {"channel": channel, "channelKey": key}}
    if verdict == "denied":
        return {"type": "error", "data": {"message": protocol.ACCESS_DENIED, "channel": channel}}
    return {"type": "subscribed", "data": {"channel": channel, "channelKey": key}}


def not_a_frame(text: str) -> bool:
    try:
        protocol.parse_frame(text)
    except protocol.FrameError:
        return True
    return False


INVALID = {"type": "error", "data": {"message": protocol.INVALID_FORMAT}}
PONG = {"type": "pong"}


@st.composite
def sessions(draw: Any, pool: list[tuple[Any, str | None]], max_steps: int = 12) -> list[Step]:
    steps: list[Step] = []
    for _ in range(draw(st.integers(1, max_steps))):
        kind = draw(
            st.sampled_from(["ping", "subscribe", "unsubscribe", "garbage", "protocol_ping", "pong", "big"])
        )
        if kind == "protocol_ping":
            payload = draw(st.binary(max_size=125))
            steps.append(Step([Frame(Opcode.PING, payload)], pong=payload))
            continue
        if kind == "pong":  # unsolicited: ignored
            steps.append(Step([Frame(Opcode.PONG, draw(st.binary(max_size=20)))]))
            continue
        if kind == "ping":
            payload, reply = orjson.dumps({"type": "ping", **draw(st.sampled_from([{}, {"x": 1}]))}), PONG
        elif kind == "big":  # a ping padded to a size around a length-encoding boundary, up to the limit
            n = draw(st.sampled_from([125, 126, 127, 65535, MAX_SIZE]) | st.integers(24, MAX_SIZE))
            payload, reply = b'{"type":"ping","pad":"' + b"x" * (n - 24) + b'"}', PONG
        elif kind == "garbage":
            text = draw(
                st.sampled_from(["", "null", "[]", "{}", '{"type":"nope"}', '{"type":"subscribe"}', "{"])
                | st.text(max_size=40).filter(not_a_frame)
            )
            payload, reply = text.encode(), INVALID
        else:
            channel, verdict = draw(st.sampled_from(pool))
            payload = orjson.dumps({"type": kind, "channel": channel})
            reply = subscribe_reply(kind, channel, verdict)
        binary = kind != "garbage" and draw(st.integers(0, 4)) == 0  # parse_frame takes bytes too
        opcode = Opcode.BINARY if binary else Opcode.TEXT
        if draw(st.integers(0, 3)) == 0 and len(payload) > 1:  # fragmented, maybe a ping in between
            cut = draw(st.integers(1, len(payload) - 1))
            frames = [Frame(opcode, payload[:cut], fin=False)]
            pong = None
            if draw(st.booleans()):
                pong = draw(st.binary(max_size=16))
                frames.append(Frame(Opcode.PING, pong))
            frames.append(Frame(Opcode.CONT, payload[cut:]))
            steps.append(Step(frames, reply, pong))
        else:
            steps.append(Step([Frame(opcode, payload)], reply))
    return steps


async def run_session(
    fx: Fixture, user: str, steps: list[Step], cuts: list[int] | None, delays: list[float]
) -> Replies:
    """Connect as ``user``, send the steps (whole, or split at ``cuts``), return the replies after
    ``connected``; then a closing handshake that the server must complete."""
    ws = await RawWS.connect(fx.srv.port, fx.srv.token(user))
    try:
        first = await collect(ws, 1, 0)
        assert first.texts[0]["type"] == "connected", first.texts
        stream = serialize([f for s in steps for f in s.frames])
        await ws.send(split(stream, cuts) if cuts is not None else [stream], delays)
        texts = sum(s.reply is not None for s in steps)
        pongs = [s.pong for s in steps if s.pong is not None]
        replies = await collect(ws, texts, len(pongs))
        # Exactly once: a last ping is answered next, with nothing before it.
        await ws.send([Frame(Opcode.TEXT, b'{"type":"ping"}').serialize(mask=True)])
        last = await collect(ws, 1, 0)
        assert (last.texts, last.pongs) == ([PONG], []), "a reply or pong more than once"
        await ws.send([Frame(Opcode.CLOSE, Close(1000, "bye").serialize()).serialize(mask=True)])
        frame = await ws.frame()
        assert frame is not None and frame[0] == Opcode.CLOSE and close_code(frame[1]) == 1000, frame
        await ws.eof()
        return replies
    finally:
        ws.close_transport()


@pytest.mark.asyncio(loop_scope="session")
@fuzz_settings(200)
@given(data=st.data())
async def test_split_stream_gets_the_unsplit_replies(fuzz_server: Fixture, data: st.DataObject) -> None:
    fx = fuzz_server
    user = await fx.srv.user("fuzz")
    steps = data.draw(sessions(channel_pool(fx, user)), label="steps")
    cuts = data.draw(st.lists(st.integers(0, 10**6), max_size=25), label="cuts")
    delays = data.draw(st.lists(st.sampled_from([0.0, 0.0, 0.001, 0.003]), max_size=5), label="delays")
    reference = await run_session(fx, user, steps, None, [])
    got = await run_session(fx, user, steps, cuts, delays)
    expected = [s.reply for s in steps if s.reply is not None]
    assert reference.texts == expected
    assert got.texts == reference.texts
    assert got.pongs == reference.pongs == [s.pong for s in steps if s.pong is not None]
    assert not (errors := fx.errors.take()), errors


@pytest.mark.asyncio(loop_scope="session")
@fuzz_settings(30)
@given(data=st.data())
async def test_frames_pipelined_with_the_handshake(fuzz_server: Fixture, data: st.DataObject) -> None:
    """A client that sends frames with its upgrade request, before our 101 (RFC 6455 §4.1 says it must
    wait): uvicorn's httptools protocol hands the WebSocket protocol only the request head, so those
    frames are dropped today. Whatever becomes of them, all answered or none, the session goes on: the
    next frame is answered, nothing is closed, nothing is logged as an error."""
    fx = fuzz_server
    user = await fx.srv.user("pipe")
    steps = data.draw(sessions(channel_pool(fx, user), 6).filter(lambda s: len(serialize_steps(s)) < 2000))
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", fx.srv.port), 5)
    writer.write(handshake_request(f"/ws?token={fx.srv.token(user)}") + serialize_steps(steps))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b" 101 " in head.split(b"\r\n", 1)[0], head
    ws = RawWS(reader, writer)
    try:
        assert (await collect(ws, 1, 0)).texts[0]["type"] == "connected"
        await asyncio.sleep(0.05)
        sentinel = {"type": "subscribe", "channel": {"type": "creator", "id": f"sentinel-{user}"}}
        await ws.send([Frame(Opcode.TEXT, orjson.dumps(sentinel)).serialize(mask=True)])
        last = subscribe_reply("subscribe", sentinel["channel"], "ok")
        texts: list[Any] = []
        while last not in texts:
            frame = await ws.frame()
            assert frame is not None and frame[0] != Opcode.CLOSE, (frame, texts)
            if frame[0] == Opcode.TEXT:
                texts.append(without_history(orjson.loads(frame[1])))
        expected = [s.reply for s in steps if s.reply is not None]
        hypothesis.event("pipelined frames " + ("answered" if texts[:-1] else "dropped"))
        assert texts[:-1] in ([], expected), texts
    finally:
        ws.close_transport()
    assert not (errors := fx.errors.take()), errors


def serialize_steps(steps: list[Step]) -> bytes:
    return serialize([f for s in steps for f in s.frames])


def garbage_outcome(garbage: bytes) -> tuple[set[int], int, int]:
    """What websockets' parser makes of ``garbage`` sent after complete messages: the close codes the
    server may answer with (none: the connection stays open), how many complete data messages come
    before, and how many bytes it reads before deciding (the rest is not sent: bytes arriving after the
    server closed would make its kernel answer with a reset, which can discard the close frame before
    the client reads it).

    1007 when a complete text message is not UTF-8 (uvicorn decodes, ``wire.py`` closes), else the
    parser's own close (1002, 1009, 1007 for a close reason, or the echo of a close frame the bytes hold).
    """
    conn = parser_after_upgrade([handshake_request()])
    allowed: set[int] = set()
    messages, buffer, kind = 0, b"", Opcode.BINARY
    for i in range(len(garbage)):
        conn.receive_data(garbage[i : i + 1])
        for event in conn.events_received():
            if event.opcode in (Opcode.TEXT, Opcode.BINARY):
                kind, buffer = event.opcode, b""
            if event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                buffer += event.data
                if event.fin:
                    messages += 1
                    if kind == Opcode.TEXT and not utf8(buffer):
                        allowed.add(1007)
        if conn.close_sent is not None:
            allowed.add(conn.close_sent.code if conn.close_sent.code is not None else 1005)
        if allowed:
            return allowed, messages, i + 1
    return allowed, messages, len(garbage)


def utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.asyncio(loop_scope="session")
@fuzz_settings(300)
@given(data=st.data())
async def test_garbage_after_a_valid_prefix_closes_cleanly(fuzz_server: Fixture, data: st.DataObject) -> None:
    fx = fuzz_server
    user = await fx.srv.user("junk")
    steps = data.draw(sessions(channel_pool(fx, user), 4), label="prefix")
    garbage = data.draw(
        st.binary(min_size=1, max_size=120)
        | st.sampled_from(
            [
                b"\x81\x05hello",  # unmasked
                b"\xc1\x80abcd",  # RSV1 without an extension
                b"\x83\x80abcd",  # reserved opcode
                b"\x09\x80abcd",  # fragmented ping
                b"\x80\x80abcd",  # continuation with nothing to continue
                b"\x81\xff" + struct.pack("!Q", 1 << 40) + b"abcd",  # over max size
                b"\x81\xfe\xff\xff" + b"abcd",  # 65535 bytes declared, a few sent
                b"\x81\x82\x00\x00\x00\x00\xff\xfe",  # invalid UTF-8 text
                b"\x88\x81\x00\x00\x00\x00\x01",  # close with a 1-byte payload
                b"\x88\x82\x00\x00\x00\x00\x03\xe7",  # close 999
                b"\x88\x80abcd",  # a close without a code: echoed
                Frame(Opcode.CLOSE, Close(4000, "bye").serialize()).serialize(mask=True),
                Frame(Opcode.TEXT, b"x" * (MAX_SIZE + 1)).serialize(mask=True),  # one byte too many
                serialize([Frame(Opcode.TEXT, b"x" * 40000, fin=False), Frame(Opcode.CONT, b"x" * 40000)]),
                serialize([Frame(Opcode.TEXT, b"\xe2\x82", fin=False), Frame(Opcode.CONT, b"\xac")]),  # "€"
                serialize([Frame(Opcode.TEXT, b"\xe2\x82", fin=False), Frame(Opcode.CONT, b"\xff")]),
            ]
        ),
        label="garbage",
    )
    cuts = data.draw(st.lists(st.integers(0, 10**6), max_size=8), label="cuts")
    allowed, messages, used = garbage_outcome(garbage)
    garbage, ends = garbage[:used], bool(allowed)

    ws = await RawWS.connect(fx.srv.port, fx.srv.token(user))
    try:
        assert (await collect(ws, 1, 0)).texts[0]["type"] == "connected"
        await ws.send([serialize([f for s in steps for f in s.frames])])
        await collect(ws, sum(s.reply is not None for s in steps), sum(s.pong is not None for s in steps))
        await ws.send(split(garbage, cuts), [0.001])
        if not ends:
            # The bytes may be an unfinished frame: the server waits for the rest, then sees our EOF.
            await asyncio.sleep(0.05)
            ws.writer.write_eof()
        texts: list[Any] = []
        close: int | None = None
        while True:
            frame = await ws.frame(5.0)
            if frame is None:
                break
            opcode, payload = frame
            if opcode == Opcode.CLOSE:
                close = close_code(payload)
                await ws.eof(5.0)  # then the server ends it (aborted CLOSE_GRACE later at most)
                break
            if opcode == Opcode.TEXT:
                texts.append(orjson.loads(payload))
        assert len(texts) <= messages, texts
        assert all(t.get("type") in ("error", "pong") for t in texts), texts
        hypothesis.event(f"garbage: parser closes {sorted(allowed)}, server closes {close}")
        if ends:
            assert close in allowed, f"server closed with {close}, the parser says {allowed}"
        else:  # only our EOF ends it: the server drops the TCP connection, at most with a close frame
            assert close is None or close in (1002, 1007, 1009), close
    finally:
        ws.close_transport()
    assert not (errors := fx.errors.take()), errors
