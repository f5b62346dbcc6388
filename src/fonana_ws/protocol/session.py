"""One socket's protocol rules (protocol §1–§2, §7.2, §7.4) as a state machine that does no I/O.

In the manner of websockets' sans-I/O ``Protocol``: the driver (``web.endpoint``) feeds each client frame
to ``Session.receive`` and carries out the actions it returns, in order: a reply to send, an access check
to make, the hub to join or leave, the unread notifications to load, a conversation to look up, a typing
state to relay, a channel's presence to watch or to answer. What that I/O decided comes back in through
``access_decided`` / ``access_failed``, ``joined``, ``unread_loaded`` and ``conversation_found`` /
``conversation_failed``, which return the next actions. Every rule is thus a plain function call in
``tests/unit/test_session.py``, and the endpoint only awaits and moves bytes.

Frames are handled one at a time, in the order they came (protocol §1): a subscribe, or the first typing
frame of a conversation, must be decided before the next frame is fed. Inbound rate limits are the
endpoint's: they come before parsing and are shared with the conformance echo, which has no session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from fonana_ws.protocol.channels import ChannelError, channel_key, has_presence
from fonana_ws.protocol.frames import (
    ACCESS_DENIED,
    CLOSE_UNAUTHORIZED,
    INVALID_FORMAT,
    INVALID_TOKEN,
    OTHER_USER,
    PONG,
    SUBSCRIBE_FAILED,
    FrameError,
    conversation_channel,
    error,
    parse_frame,
    refreshed,
    subscribed,
    unread_notifications,
    unsubscribed,
)


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``text`` to this client."""

    text: str


@dataclass(frozen=True, slots=True)
class CheckAccess:
    """Ask the access policy whether the user may join ``key``; answer ``access_decided``/``_failed``.

    The CHANNEL as sent stays with the session (``Pending``): the policy needs only the key.
    """

    key: str


@dataclass(frozen=True, slots=True)
class Join:
    """Join ``key`` in the hub and wait until the process receives its events; answer ``joined``.

    ``since`` is the subscribe's ``(offset, epoch)`` to recover from (protocol §7.8), or None;
    ``presence`` that it asked for presence frames, which the driver starts to receive before the join
    itself, so that the socket's own arrival is announced to it too (§7.4).
    """

    key: str
    since: tuple[int, str] | None = None
    presence: bool = False


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Send the events recovered for ``key``, then those that arrived during the recovery, then go live:
    right after ``subscribed``, with no I/O in between (so nothing can come between them)."""

    key: str


@dataclass(frozen=True, slots=True)
class Leave:
    """Leave ``key`` in the hub (nothing to answer)."""

    key: str


@dataclass(frozen=True, slots=True)
class SendUnread:
    """Load the user's unread notifications; answer ``unread_loaded`` (nothing, when loading failed)."""


@dataclass(frozen=True, slots=True)
class CheckConversation:
    """Look up conversation ``conversation_id``'s two participants; answer ``conversation_found`` (or
    ``conversation_failed``, when the lookup could not be made)."""

    conversation_id: str


@dataclass(frozen=True, slots=True)
class RelayTyping:
    """This user typed (or stopped) in ``conversation_id``: tell ``to_user``, the other participant.

    The throttle and the server's own ``isTyping: false`` are per (user, conversation) and process-wide,
    shared by the user's connections: ``fonana.typing``'s, not one socket's.
    """

    conversation_id: str
    to_user: str
    is_typing: bool


@dataclass(frozen=True, slots=True)
class SendStatus:
    """Send ``user_id``'s ``user_status`` snapshot (protocol §7.3), right after ``subscribed``."""

    user_id: str


@dataclass(frozen=True, slots=True)
class WatchPresence:
    """Send (``on``) or stop sending this socket ``key``'s presence_join/leave/count (protocol §7.4).

    The latest subscribe of the key decides: with ``"presence": true`` on, without it off.
    """

    key: str
    on: bool


@dataclass(frozen=True, slots=True)
class QueryPresence:
    """Answer a ``presence`` query of joined ``key`` with its present users; ``channel`` as sent."""

    key: str
    channel: Any


@dataclass(frozen=True, slots=True)
class CheckToken:
    """Verify a refresh frame's token as at connect; answer ``token_checked`` (protocol §7.6)."""

    token: str


@dataclass(frozen=True, slots=True)
class Expire:
    """Close this socket with 4001 at ``at`` (epoch seconds, the token's ``exp``; the leeway is the
    driver's), in place of the deadline it had."""

    at: float


@dataclass(frozen=True, slots=True)
class Close:
    """Close this socket with ``code`` and ``reason``."""

    code: int
    reason: str


Action = (
    Reply
    | CheckAccess
    | Join
    | Leave
    | SendUnread
    | CheckConversation
    | RelayTyping
    | SendStatus
    | WatchPresence
    | QueryPresence
    | CheckToken
    | Expire
    | Close
    | CatchUp
)

#: Conversations one socket remembers the access check of (protocol §7.2: once per connection and
#: conversation). A client types in a handful; the bound keeps a client that sends typing frames for
#: ever new ids from growing its socket's memory (at WS_CLIENT_RATE's 5 frames a second, without end).
MAX_CONVERSATIONS = 100

# Replies that never change, built once rather than per frame.
_PONG = Reply(PONG)
_INVALID = Reply(error(INVALID_FORMAT))
_INVALID_TOKEN = Reply(error(INVALID_TOKEN))
_SEND_UNREAD = SendUnread()
STATUS_PREFIX = "status_"


class Pending(NamedTuple):
    """The subscribe being decided: its key, the CHANNEL as sent (replies echo it), access granted yet,
    and whether it asked for presence frames."""

    key: str
    channel: Any
    allowed: bool = False
    presence: bool = False
    since: tuple[int, str] | None = None


class PendingTyping(NamedTuple):
    """The typing frame waiting for its conversation's lookup."""

    conversation_id: str
    is_typing: bool


class Session:
    """The protocol state of one authenticated socket."""

    __slots__ = (
        "user_id",
        "max_subscriptions",
        "keys",
        "sent_unread",
        "pending",
        "conversations",
        "watching",
    )

    def __init__(self, user_id: str, max_subscriptions: int, keys: set[str] | None = None) -> None:
        self.user_id = user_id
        #: ``WS_MAX_SUBSCRIPTIONS``: channels this socket may hold at once.
        self.max_subscriptions = max_subscriptions
        #: The keys joined. The endpoint passes the connection's own set (``Connection.keys``, which the hub
        #: changes the same way), so that a socket holds one set rather than two (216 bytes each).
        self.keys: set[str] = set() if keys is None else keys
        #: The unread notifications were sent: once per socket, after its first join of notifications_U.
        self.sent_unread = False
        self.pending: Pending | PendingTyping | None = None
        #: Conversation -> its other participant (None: this user is not one), made at the first typing
        #: frame. A socket that never types or watches presence has only the two slots (96 bytes a Session,
        #: with its GC header, against 80 without them).
        self.conversations: dict[str, str | None] | None = None
        #: The keys whose presence frames this socket asked for (None until it asks for one).
        self.watching: set[str] | None = None

    def receive(self, data: str | bytes) -> list[Action]:
        """One client frame (text, or binary holding the same JSON) -> what to do about it."""
        if self.pending is not None:
            raise RuntimeError(f"frame fed while {self.pending} is being decided")
        try:
            frame = parse_frame(data)
        except FrameError:
            return [_INVALID]
        if frame.type == "ping":
            return [_PONG]
        if frame.type == "typing":
            return self._typing(frame.conversation_id, frame.is_typing)
        if frame.type == "refresh":
            return [CheckToken(frame.token)]
        channel = frame.channel
        try:
            key = channel_key(channel)
        except ChannelError:
            return [Reply(error(INVALID_FORMAT, channel))]
        if frame.type == "presence":
            if not has_presence(key):
                return [Reply(error(INVALID_FORMAT, channel))]
            if key not in self.keys:
                return [Reply(error(ACCESS_DENIED, channel))]
            return [QueryPresence(key, channel)]
        if frame.type == "unsubscribe":
            # Never joined: answered all the same (protocol §2), with nothing to leave.
            if key not in self.keys:
                return [Reply(unsubscribed(channel, key))]
            self.keys.discard(key)
            if self.watching is not None:
                self.watching.discard(key)  # the hub's leave ends the watch too
            return [Leave(key), Reply(unsubscribed(channel, key))]
        limit = self.max_subscriptions
        if key not in self.keys and len(self.keys) >= limit:
            # Any user may join any creator_C: without a cap one socket could make the process hold (and
            # the broker carry) an unbounded number of subscriptions.
            reason = f"subscription limit ({limit}) reached"
            return [Reply(error(SUBSCRIBE_FAILED, channel, reason=reason))]
        # Joined already: asked again all the same, so that a repeat answers as the first one did.
        self.pending = Pending(key, channel, presence=frame.presence, since=frame.since)
        return [CheckAccess(key)]

    def access_decided(self, key: str, allowed: bool) -> list[Action]:
        """The access policy's answer for the pending subscribe."""
        pending = self._expect(key, allowed=False)
        if allowed:
            self.pending = pending._replace(allowed=True)
            return [Join(key, pending.since, pending.presence and has_presence(key))]
        self.pending = None
        return [Reply(error(ACCESS_DENIED, pending.channel))]

    def access_failed(self, key: str) -> list[Action]:
        """The access check could not be made (database down): a server-side failure, not a refusal."""
        pending = self._expect(key, allowed=False)
        self.pending = None
        return [Reply(error(SUBSCRIBE_FAILED, pending.channel))]

    def joined(
        self,
        key: str,
        ok: bool,
        position: tuple[str, int] | None = None,
        recovered: bool | None = None,
        catch_up: bool = False,
    ) -> list[Action]:
        """The hub's join of the pending subscribe succeeded (``ok``) or failed (broker).

        For a channel with history, ``position`` is its (epoch, last offset) and ``recovered`` whether the
        asked ``since`` could be honoured (None: not asked); ``catch_up`` that the driver holds events to
        send right after ``subscribed`` (``CatchUp``).
        """
        pending = self._expect(key, allowed=True)
        self.pending = None
        if not ok:
            return [Reply(error(SUBSCRIBE_FAILED, pending.channel))]
        self.keys.add(key)
        actions: list[Action] = [Reply(subscribed(pending.channel, key, position, recovered))]
        if catch_up:
            actions.append(CatchUp(key))
        watching = self.watching
        if pending.presence and has_presence(key):
            if watching is None:
                watching = self.watching = set()
            watching.add(key)
            actions.append(WatchPresence(key, True))
        elif watching is not None and key in watching:
            watching.discard(key)  # subscribed again without it: the latest subscribe decides
            actions.append(WatchPresence(key, False))
        if not self.sent_unread and key == f"notifications_{self.user_id}":
            self.sent_unread = True  # once, whether or not loading them works
            actions.append(_SEND_UNREAD)
        elif key.startswith(STATUS_PREFIX):
            actions.append(SendStatus(key[len(STATUS_PREFIX) :]))
        return actions

    def token_checked(self, user_id: str | None, expires_at: float | None) -> list[Action]:
        """A refresh token verified: for ``user_id`` (None: it did not verify), expiring at ``expires_at``.

        Good: the new expiry applies. Bad: an error, and the old expiry still applies. Another user's:
        the socket is closed (protocol §7.6), for a connection is one user's for its life.
        """
        if user_id is None:
            return [_INVALID_TOKEN]
        if user_id != self.user_id:
            return [Close(CLOSE_UNAUTHORIZED, OTHER_USER)]
        actions: list[Action] = [Reply(refreshed(expires_at))]
        if expires_at is not None:
            actions.append(Expire(expires_at))
        return actions

    def unread_loaded(self, notifications: list[dict[str, Any]]) -> list[Action]:
        """The user's unread notifications, newest first: sent only when there are some."""
        return [Reply(unread_notifications(notifications))] if notifications else []

    def conversation_found(self, conversation_id: str, participants: tuple[str, str] | None) -> list[Action]:
        """The pending typing frame's conversation: its ``(fromUserId, toUserId)``, or None (no such row).

        Decided once for this socket's life, yes or no (protocol §7.2): a refused user is told again at
        each frame without another lookup.
        """
        pending = self._expect_typing(conversation_id)
        self.pending = None
        other: str | None = None
        if participants is not None and self.user_id in participants:
            first, second = participants
            other = second if first == self.user_id else first
        known = self.conversations
        if known is None:
            known = self.conversations = {}
        elif len(known) >= MAX_CONVERSATIONS:
            del known[next(iter(known))]  # the oldest: asked again if it comes back
        known[conversation_id] = other
        return self._typing(conversation_id, pending.is_typing)

    def conversation_failed(self, conversation_id: str) -> list[Action]:
        """The lookup could not be made (database down): the frame is dropped and nothing remembered.

        Typing is best effort; the client repeats it within seconds, and that frame asks again.
        """
        self._expect_typing(conversation_id)
        self.pending = None
        return []

    def _typing(self, conversation_id: str, is_typing: bool) -> list[Action]:
        known = self.conversations
        if known is None or conversation_id not in known:
            self.pending = PendingTyping(conversation_id, is_typing)
            return [CheckConversation(conversation_id)]
        other = known[conversation_id]
        if other is None:
            # Nobody receives anything: not the other participant, not the sender's other tabs.
            return [Reply(error(ACCESS_DENIED, conversation_channel(conversation_id)))]
        if other == self.user_id:
            return []  # a conversation with oneself: the sender's own connections never get typing
        return [RelayTyping(conversation_id, other, is_typing)]

    def _expect_typing(self, conversation_id: str) -> PendingTyping:
        pending = self.pending
        if not isinstance(pending, PendingTyping) or pending.conversation_id != conversation_id:
            raise RuntimeError(f"no lookup of conversation {conversation_id} is pending (pending: {pending})")
        return pending

    def _expect(self, key: str, *, allowed: bool) -> Pending:
        pending = self.pending
        if not isinstance(pending, Pending) or pending.key != key or pending.allowed is not allowed:
            step = "join" if allowed else "access check"
            raise RuntimeError(f"no {step} of {key} is pending (pending: {pending})")
        return pending
