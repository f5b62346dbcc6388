"""The WebSocket endpoint: one socket's life, gluing auth, the protocol session and the hub together.

What a client frame means is ``protocol.session.Session``'s to decide; this driver feeds it the frames and
carries out what it asks for: the access check, the hub's join and leave, the replies, the conversation
lookup and the typing relay (``fonana.typing``, one per process).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.endpoints import WebSocketEndpoint
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket

from fonana_ws.auth import AuthError, fingerprint, token_from_scope, verify_with
from fonana_ws.broker.history import has_history
from fonana_ws.fanout.connection import Connection
from fonana_ws.fanout.deadlines import Deadlines
from fonana_ws.fonana.policy import may_subscribe
from fonana_ws.fonana.presence import topic_key
from fonana_ws.fonana.typing import Typing
from fonana_ws.logs import lifecycle
from fonana_ws.net import client_address
from fonana_ws.protocol import envelope as env
from fonana_ws.protocol import frames as protocol
from fonana_ws.protocol.channels import channel_type
from fonana_ws.protocol.session import (
    Action,
    CatchUp,
    CheckAccess,
    CheckConversation,
    CheckToken,
    Close,
    Expire,
    Join,
    Leave,
    QueryPresence,
    RelayTyping,
    Reply,
    SendStatus,
    SendUnread,
    Session,
    WatchPresence,
)
from fonana_ws.transport.wire import EXTENSION, Wire
from fonana_ws.web.admission import origin_allowed
from fonana_ws.web.services import Services

log = logging.getLogger("fonana_ws.connection")


def typing_of(services: Services) -> Typing:
    """The process's typing states (protocol §7.2): made at the app's start (it needs the running loop);
    made here for an endpoint mounted in an app that did not start ours."""
    typing = services.typing
    if typing is None:
        typing = services.typing = Typing(services.hub, services.stats)
    return typing


@dataclass(frozen=True, slots=True)
class _Announce:
    """The driver's own step after ``subscribed``: the hub tells presence of the join (``Hub.announce``)."""

    key: str


def expiry_of(services: Services) -> Deadlines[Connection]:
    """The process's token deadlines (protocol §7.6), one timer for all connections; made on first use."""
    expiry = services.expiry
    if expiry is None:
        expiry = services.expiry = Deadlines(asyncio.get_running_loop(), partial(tokens_expired, services))
    return expiry


def expire_at(services: Services, conn: Connection, exp: float) -> None:
    """Close ``conn`` with 4001 once ``exp`` (epoch seconds) plus JWT_LEEWAY has passed."""
    expiry = expiry_of(services)
    expiry.set(conn, expiry.clock.time() + exp + services.settings.jwt_leeway - time.time())


def tokens_expired(services: Services, conns: list[Connection]) -> None:
    """Close each connection whose token's ``exp`` plus the leeway passed: 4001, and the client
    reconnects with a fresh token."""
    for conn in conns:
        services.stats.tokens_expired += 1
        lifecycle(logging.INFO, "token expired", conn=conn.id, user=conn.user_id, client=conn.client)
        conn.close_reason = "token expired"
        conn.cut(protocol.CLOSE_TOKEN_EXPIRED, protocol.TOKEN_EXPIRED)


class FonanaEndpoint(WebSocketEndpoint):
    """Authenticate first, read nothing before; then subscribe/unsubscribe/ping/typing frames in order."""

    encoding = None
    #: Named in refusal log lines of endpoints other than /ws.
    log_path: str | None = None
    # An idle connection's endpoint lives as long as its socket: slots, not a 500-byte instance dict.
    __slots__ = (
        "scope", "receive", "send", "services", "wire", "conn", "session", "rate_logged", "holds_slot",
        "expires_at", "allowed_until", "catching", "ended", "inbox", "drainer",
    )  # fmt: skip

    def __init__(self, scope: Any, receive: Any, send: Any) -> None:
        super().__init__(scope, receive, send)
        #: The app's services and the direct write path ``FonanaWSProtocol`` offers in the scope (None
        #: under other servers), read at the start of ``dispatch``: a detached socket keeps no scope.
        self.services: Services = scope["app"].state.services
        self.wire: Wire | None = (scope.get("extensions") or {}).get(EXTENSION)
        self.conn: Connection | None = None
        self.session: Session | None = None
        #: The first frame dropped for the rate is logged; the rest of the connection's are only counted.
        self.rate_logged = False
        #: This connection holds one of its user's WS_MAX_CONNECTIONS_PER_USER slots.
        self.holds_slot = False
        #: The token's ``exp`` (epoch seconds), from ``admit``.
        self.expires_at: float | None = None
        #: The access check just made allows until then (epoch seconds): a subscription's ``validUntil``.
        self.allowed_until: float | None = None
        #: A recovery between its ``Join`` and its ``CatchUp``: (key, live buffer, recovered events, their
        #: last offset).
        self.catching: tuple[str, list[Any], list[str], int] | None = None
        #: The disconnect was handled: nothing after it is.
        self.ended = False
        #: A detached socket's ASGI receive events not handled yet, and the task handling them (None: idle).
        self.inbox: list[dict[str, Any]] | None = None
        self.drainer: asyncio.Task[None] | None = None

    async def dispatch(self) -> None:
        websocket = WebSocket(self.scope, receive=self.receive, send=self.send)
        await self.on_connect(websocket)
        if self.conn is None:
            return  # refused: nothing the client sent is read
        if self.wire is not None and self.wire.detach(self.arrived):
            # From here the protocol hands each event to ``arrived``: an idle socket has no task, no
            # coroutine frames waiting in receive, and no scope.
            self.scope = self.receive = self.send = None  # type: ignore[assignment]
            return
        close_code = 1000
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.receive":
                    data = message.get("text")
                    await self.on_receive(websocket, data if data is not None else message.get("bytes"))
                elif message["type"] == "websocket.disconnect":
                    close_code = int(message.get("code") or 1000)
                    break
        finally:
            await self.on_disconnect(websocket, close_code)

    def arrived(self, message: dict[str, Any]) -> None:
        """A detached socket's receive or disconnect event: handled in order, by one task at a time."""
        if self.inbox is None:
            self.inbox = []
        self.inbox.append(message)
        if self.drainer is None:
            assert self.wire is not None
            self.drainer = self.wire.spawn(self.drain())

    async def drain(self) -> None:
        """What ``dispatch``'s loop does for a socket that is not detached, until the inbox is empty.

        The protocol stops reading after each message until this asks for more: a client cannot make
        the server queue frames faster than they are handled.
        """
        inbox, wire, conn = self.inbox, self.wire, self.conn
        assert inbox is not None and wire is not None and conn is not None
        try:
            while inbox:
                message = inbox.pop(0)
                if self.ended:
                    continue
                if message["type"] == "websocket.receive":
                    data = message.get("text")
                    try:
                        await self.on_receive(None, data if data is not None else message.get("bytes"))
                    except Exception:
                        log.exception("frame handling failed conn=%s", conn.id)
                        conn.close_reason = "internal error"
                        conn.cut(1011, "Internal error")
                elif message["type"] == "websocket.disconnect":
                    self.ended = True
                    await self.on_disconnect(None, int(message.get("code") or 1000))
                if not inbox:
                    wire.resume_reading()
        finally:
            self.drainer = None
            if inbox and not self.ended:  # cancelled (shutdown) with events left: the disconnect still runs
                self.drainer = wire.spawn(self.drain())

    async def refuse_upgrade(
        self, websocket: WebSocket, status: int, cause: str, message: str, **log: Any
    ) -> None:
        """Refused before the upgrade, with an HTTP status (where the server can send one)."""
        self.services.stats.limit_refusals[cause] += 1
        lifecycle(logging.INFO, "refused", cause=cause, **log)
        if "websocket.http.response" in self.scope.get("extensions", {}):
            await websocket.send_denial_response(PlainTextResponse(message, status_code=status))
        else:
            await websocket.close(protocol.CLOSE_UNAUTHORIZED, message)

    async def admit(self, websocket: WebSocket) -> tuple[str, str | None, str] | None:
        """Origin, connect rate, token and user, in that order, before anything the client sends is read.

        Returns (user id, subprotocol to accept, client address), or None once the refusal is sent.
        """
        services = self.services
        settings = services.settings
        raw_headers = self.scope["headers"]
        address = client_address(self.scope, settings.trusted_proxies)
        if settings.allowed_origins:
            origin = next((v.decode("latin-1") for k, v in raw_headers if k == b"origin"), None)
            if not origin_allowed(origin, settings.allowed_origins):
                await self.refuse_upgrade(
                    websocket, 403, "origin", "Origin not allowed", client=address, origin=origin
                )
                return None
        if not await services.rate_limits.connect_allowed(address):
            await self.refuse_upgrade(
                websocket, 429, "connect_rate", "Too many connection attempts", client=address
            )
            return None
        headers = {k.decode(): v.decode("latin-1") for k, v in raw_headers if k == b"authorization"}
        subprotocols = self.scope.get("subprotocols") or []
        token = token_from_scope(self.scope.get("query_string", b""), headers, subprotocols)
        # A browser fails the handshake unless one offered subprotocol is echoed back.
        accept_proto = "bearer" if "bearer" in subprotocols else None
        if accept_proto is None and token:
            accept_proto = next((p for p in subprotocols if p in (token, f"bearer.{token}")), None)
        user_id: str | None = None
        try:
            user_id, claims = verify_with(settings, token)
            self.expires_at = _exp_of(claims)
            try:
                known = await services.store.user_exists(user_id)
            except Exception as exc:
                log.error("user lookup failed for %s: %s", user_id, exc)
                raise AuthError("database", "user lookup failed (database unavailable)") from None
            if not known:
                raise AuthError("unknown_user", "unknown user")
        except AuthError as exc:
            services.stats.auth_failures[exc.cause] += 1
            lifecycle(
                logging.INFO,
                "refused",
                user=user_id,
                client=address,
                cause=exc.cause,
                token=fingerprint(token) if token else "-",
                path=self.log_path,
            )
            await websocket.accept(subprotocol=accept_proto)
            await websocket.close(protocol.CLOSE_UNAUTHORIZED, exc.reason[:120])
            return None
        return user_id, accept_proto, address

    async def accept(self, websocket: WebSocket, admitted: tuple[str, str | None, str]) -> Connection:
        """Accept an admitted socket: its ``Connection``, with the byte-bounded outbound path."""
        user_id, accept_proto, address = admitted
        await websocket.accept(subprotocol=accept_proto)
        # Everything needed from the handshake headers has been read; an idle socket need not keep them.
        self.scope["headers"] = []
        limit = self.services.settings.send_buffer
        outbox = self.services.hub.outbox
        wire = self.wire
        # The direct path never writes through ASGI: the Starlette WebSocket need not outlive the accept.
        asgi = None if wire is not None and wire.usable else websocket
        conn = Connection(asgi, user_id, outbox, limit=limit, client=address, outlet=wire)
        conn.on_slow = self._on_slow
        return conn

    def authenticated(self) -> None:
        """The handshake deadline no longer applies to this socket."""
        wire = self.wire
        if wire is not None:
            wire.authenticated()

    async def on_connect(self, websocket: WebSocket) -> None:
        admitted = await self.admit(websocket)
        if admitted is None:
            return
        user_id, _, address = admitted
        services = self.services
        conn = await self.accept(websocket, admitted)
        admitted_here, came_online = await services.user_connections.admit(user_id, str(conn.id))
        if not admitted_here:
            services.stats.limit_refusals["user_connections"] += 1
            lifecycle(logging.INFO, "refused", user=user_id, client=address, cause="user_connections")
            await websocket.close(protocol.CLOSE_TOO_MANY_CONNECTIONS, "Too many connections")
            return
        self.holds_slot = True
        # Queued before the connection joins its user's channel: `connected` is always the first frame.
        conn.send_text(protocol.connected(user_id, self.expires_at))
        try:
            await services.hub.add_connection(conn)
        except BaseException as exc:  # a broker failure, or cancelled at shutdown: leave nothing behind
            await services.hub.remove_connection(conn)
            if not isinstance(exc, Exception):
                raise
            log.error("could not register connection of %s: %s", user_id, exc)
            await self._release(conn)
            await websocket.close(1011, "Broker unavailable, try again")
            return
        self.session = Session(user_id, services.settings.max_subscriptions, keys=conn.keys)
        self.conn = conn
        if self.expires_at is not None:
            expire_at(services, conn, self.expires_at)
        if came_online and services.status is not None:
            services.status.came_online(user_id)
        self.authenticated()
        lifecycle(logging.INFO, "connected", conn=conn.id, user=user_id, client=address, direct=conn.direct)

    def _on_slow(self, conn: Connection) -> None:
        self.services.stats.slow_consumer_disconnects += 1
        lifecycle(logging.WARNING, "slow consumer cut", conn=conn.id, user=conn.user_id, client=conn.client)

    async def _release(self, conn: Connection) -> None:
        self.services.rate_limits.forget(conn.id)
        if self.holds_slot:
            self.holds_slot = False
            try:
                last = await self.services.user_connections.release(conn.user_id, str(conn.id))
            except Exception as exc:  # its entry expires with the process's next refresh
                log.warning("could not release connection slot of %s: %s", conn.user_id, exc)
                return
            status = self.services.status
            if last and status is not None:
                status.went_offline([conn.user_id])  # announced after WS_OFFLINE_GRACE if still offline

    def _over_rate(self, conn: Connection) -> bool:
        """Over WS_CLIENT_RATE: the frame is dropped with an error; 100 drops a minute close it (4029)."""
        rates = self.services.rate_limits
        if rates.frame_allowed(conn.id):
            return False
        stats = self.services.stats
        if not rates.drop_allowed(conn.id):
            stats.limit_refusals["client_rate_close"] += 1
            lifecycle(logging.INFO, "rate limit close", conn=conn.id, user=conn.user_id, client=conn.client)
            conn.close_reason = "rate limit"
            conn.cut(protocol.CLOSE_RATE_LIMITED, protocol.RATE_LIMITED)
            return True
        stats.limit_refusals["client_rate"] += 1
        if not self.rate_logged:
            self.rate_logged = True
            lifecycle(logging.INFO, "rate limited", conn=conn.id, user=conn.user_id, client=conn.client)
        conn.send_text(protocol.error(protocol.RATE_LIMITED))
        return True

    async def on_receive(self, websocket: WebSocket | None, data: Any) -> None:
        conn, session = self.conn, self.session
        assert conn is not None and session is not None
        if self._over_rate(conn):
            return
        await self.perform(conn, session, session.receive(data))

    async def perform(self, conn: Connection, session: Session, actions: list[Action | _Announce]) -> None:
        """Carry out the session's actions in order; what the I/O decided goes back in for the next ones."""
        todo: deque[Action | _Announce] = deque(actions)
        while todo:
            match todo.popleft():
                case Reply(text):
                    conn.send_text(text)
                case CheckAccess(key):
                    todo.extend(await self._check_access(conn, session, key))
                case Join(key, since, presence):
                    todo.extend(await self._join(conn, session, key, since, presence))
                case CatchUp(key):
                    self._catch_up(conn, key)
                case _Announce(key):
                    self.services.hub.announce(conn, key)
                case Leave(key):
                    self.services.hub.leave(conn, key)
                case SendUnread():
                    todo.extend(await self._load_unread(conn, session))
                case RelayTyping(conversation_id, to_user, is_typing):
                    typing_of(self.services).frame(conn, conversation_id, to_user, is_typing)
                case CheckConversation(conversation_id):
                    todo.extend(await self._check_conversation(conn, session, conversation_id))
                case SendStatus(user_id):
                    await self._send_status(conn, user_id)
                case WatchPresence(key, on):
                    await self._watch_presence(conn, key, on)
                case QueryPresence(key, channel):
                    await self._query_presence(conn, key, channel)
                case CheckToken(token):
                    todo.extend(self._check_token(conn, session, token))
                case Expire(at):
                    expire_at(self.services, conn, at)
                case Close(code, reason):
                    lifecycle(logging.INFO, "closed", conn=conn.id, user=conn.user_id, reason=reason)
                    conn.close_reason = reason
                    conn.cut(code, reason)
                case other:
                    raise TypeError(f"no driver for session action {other!r}")

    async def _check_access(self, conn: Connection, session: Session, key: str) -> list[Action]:
        try:
            allowed = await may_subscribe(self.services.store, conn.user_id, key)
        except Exception as exc:
            log.error("access check failed conn=%s key=%s: %s", conn.id, key, exc)
            return session.access_failed(key)
        if not allowed:
            lifecycle(logging.INFO, "denied", conn=conn.id, user=conn.user_id, client=conn.client, key=key)
        # Allowed until a subscription's end: the join (next) leaves a deadline for the re-check.
        self.allowed_until = allowed if allowed is not True and allowed is not False else None
        return session.access_decided(key, bool(allowed))

    async def _check_conversation(
        self, conn: Connection, session: Session, conversation_id: str
    ) -> list[Action]:
        try:
            participants = await self.services.store.conversation_participants(conversation_id)
        except Exception as exc:
            log.error("conversation lookup failed conn=%s conversation=%s: %s", conn.id, conversation_id, exc)
            return session.conversation_failed(conversation_id)
        if participants is None or conn.user_id not in participants:
            key = f"conversation_{conversation_id}"
            lifecycle(
                logging.INFO,
                "denied",
                conn=conn.id,
                user=conn.user_id,
                client=conn.client,
                key=key,
                frame="typing",
            )
        return session.conversation_found(conversation_id, participants)

    async def _join(
        self,
        conn: Connection,
        session: Session,
        key: str,
        since: tuple[int, str] | None,
        presence: bool = False,
    ) -> list[Action | _Announce]:
        hub = self.services.hub
        limits = self.services.publisher.history
        kept = limits.enabled and has_history(key)
        position: tuple[str, int] | None = None
        recovered: bool | None = None
        catch_up = fresh = False
        if presence:
            await self._watch_presence(conn, key, True)  # listening before the join is announced
        try:
            if kept and since is not None and key not in conn.keys:
                # Live first, into a buffer; then the history; CatchUp merges the two by offset.
                buffer = await hub.catch(conn, key)
                try:
                    replay = await self.services.broker.history_since(key, since[0], since[1], limits)
                except BaseException:
                    hub.uncatch(key, buffer)
                    raise
                self.catching = (key, buffer, replay.events or [], replay.offset)
                position, recovered, catch_up = (replay.epoch, replay.offset), replay.events is not None, True
                if recovered:
                    self.services.stats.recoveries += 1
                else:
                    self.services.stats.recoveries_refused += 1
            else:
                fresh = key not in conn.keys  # a repeated subscribe is no new member
                await hub.join(conn, key, announce=False)  # announced once subscribed is sent (below)
        except Exception as exc:
            log.error("subscribe failed conn=%s key=%s: %s", conn.id, key, exc)
            if presence and key not in conn.keys:
                hub.end_side(conn, key)
            return session.joined(key, False)
        if kept and not catch_up:
            try:
                found = await self.services.broker.history_position(key, limits)
                position = (found.epoch, found.offset)
            except Exception as exc:  # subscribed all the same, without a position to recover from
                log.warning("history position of %s unknown: %s", key, exc)
            if since is not None:  # joined already: what it missed was delivered live
                recovered = False
                self.services.stats.recoveries_refused += 1
        self.services.stats.subscriptions[channel_type(key)] += 1
        until, self.allowed_until = self.allowed_until, None
        revocation = self.services.revocation
        if until is not None and revocation is not None:
            revocation.allowed_until(conn, key, until)
        actions = session.joined(key, True, position, recovered, catch_up)
        if fresh and not catch_up:  # a catch-up announces itself when it goes live
            actions.insert(1, _Announce(key))  # right after subscribed
        return actions

    def _catch_up(self, conn: Connection, key: str) -> None:
        """Send the recovered events, then the live ones caught meanwhile that are newer, then go live.

        No await from here to ``caught_up``: every message of the key is in the buffer or goes live.
        """
        caught, self.catching = self.catching, None
        assert caught is not None and caught[0] == key, "CatchUp without its recovery"
        _, buffer, events, last = caught
        for text in events:
            conn.send_text(text)
        for message in buffer:
            try:
                envelope = env.decode(message)
            except env.EnvelopeError:
                continue
            offset = envelope.event.get("offset")
            if isinstance(offset, int) and offset <= last:
                continue  # in the history already sent
            if envelope.control is not None or (envelope.multi and conn.seen_multi(envelope.id)):
                continue
            conn.send_text(protocol.dumps(envelope.event))
        self.services.hub.caught_up(conn, key, buffer, last)

    async def _send_status(self, conn: Connection, user_id: str) -> None:
        status = self.services.status
        if status is None:
            return
        try:
            frames = await status.snapshot([user_id])
        except Exception as exc:  # the next change frame tells the truth; the subscribe stands
            log.error("status snapshot failed conn=%s user=%s: %s", conn.id, user_id, exc)
            return
        conn.send_text(protocol.dumps(frames[user_id]))

    def _check_token(self, conn: Connection, session: Session, token: str) -> list[Action]:
        """A refresh frame's token, verified as at connect (no user lookup: the user is this socket's)."""
        try:
            user_id, claims = verify_with(self.services.settings, token)
        except AuthError as exc:
            self.services.stats.tokens_refused += 1
            lifecycle(logging.INFO, "refresh refused", conn=conn.id, user=conn.user_id, cause=exc.cause)
            return session.token_checked(None, None)
        if user_id == conn.user_id:
            self.services.stats.tokens_refreshed += 1
        return session.token_checked(user_id, _exp_of(claims))

    async def _watch_presence(self, conn: Connection, key: str, on: bool) -> None:
        hub = self.services.hub
        if not on:
            hub.end_side(conn, key)
            return
        try:
            await hub.add_side(conn, key, topic_key(key))
        except Exception as exc:  # the subscribe stands; its presence frames are what is missing
            log.error("presence watch failed conn=%s key=%s: %s", conn.id, key, exc)

    async def _query_presence(self, conn: Connection, key: str, channel: Any) -> None:
        presence = self.services.presence
        try:
            if presence is None:
                raise RuntimeError("channel presence is not running")
            conn.send_text(await presence.query(key, channel))
        except Exception as exc:
            log.error("presence query failed conn=%s key=%s: %s", conn.id, key, exc)
            conn.send_text(protocol.error(protocol.PRESENCE_FAILED, channel))

    async def _load_unread(self, conn: Connection, session: Session) -> list[Action]:
        try:
            unread = await self.services.store.unread_notifications(conn.user_id)
        except Exception as exc:
            log.error("unread notifications failed conn=%s: %s", conn.id, exc)
            return []
        return session.unread_loaded(unread)

    async def on_disconnect(self, websocket: WebSocket | None, close_code: int) -> None:
        conn = self.conn
        if conn is None:
            return
        typing = self.services.typing
        if typing is not None:
            typing.closed(conn)  # one dict lookup for a connection that never typed
        if self.services.expiry is not None:
            self.services.expiry.discard(conn)
        if self.services.revocation is not None:
            self.services.revocation.forget(conn)
        await self.services.hub.remove_connection(conn)
        await self._release(conn)
        lifecycle(
            logging.INFO,
            "disconnected",
            conn=conn.id,
            user=conn.user_id,
            client=conn.client,
            code=close_code,
            reason=conn.close_reason or None,
        )


def _exp_of(claims: dict[str, Any]) -> float | None:
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
