"""The processes behind a shared broker, for the console's server tab: asked over the broker, on demand.

Each process with the console on watches one broker topic (``KEY``). A console's poll of
``/console/processes`` publishes an ``ask`` there (at most once a second per process); every other
process answers with a one-line summary of its ``/stats``; the asker keeps the answers for a few seconds
and shows them at the next poll. Nothing travels while no console is open. The messages are
``"control"`` envelopes, so no socket ever receives them.

The hub hands a watched key's events to one ``watcher`` (typing's): this module chains in front of it
and passes every other key on unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import weakref
from typing import TYPE_CHECKING, Any

from fonana_ws.broker import BrokerUnavailable
from fonana_ws.protocol import envelope as env

if TYPE_CHECKING:
    from fonana_ws.web.services import Services

log = logging.getLogger("fonana_ws")

KEY = "console:processes"
KIND = "console"
#: Seconds an answer is shown after it arrived (a process that stopped answering drops out).
ANSWER_TTL = 5.0
#: Least seconds between two asks of this process, however many consoles poll it.
ASK_EVERY = 1.0
#: Most other processes kept (a bound, whatever the broker carries).
MAX_PEERS = 64

_installed: weakref.WeakKeyDictionary[Any, Peers] = weakref.WeakKeyDictionary()


def summary(services: Services) -> dict[str, Any]:
    """This process's line in the table (read from the same tables as ``/stats``)."""
    hub = services.hub
    return {
        "connections": len(hub.connections),
        "users": len(hub.by_user),
        "subscriptions": sum(len(conns) for conns in hub.by_key.values()),
        "tasks": len(asyncio.all_tasks()),
        "broker": services.broker.kind,
        "up": bool(services.broker.is_up),
        "deliveries": services.stats.deliveries,
    }


class Peers:
    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings
        self.id = f"{socket.gethostname()}:{os.getpid()}:{settings.port}"
        self.shared = not settings.broadcast_url.startswith("memory")
        self.seen: dict[str, tuple[float, dict[str, Any]]] = {}
        self.last_ask = 0.0
        self.tasks: set[asyncio.Task[None]] = set()

    def install(self) -> None:
        hub = self.services.hub
        previous = hub.watcher

        def watcher(key: str, event: dict[str, Any]) -> None:
            if key == KEY:
                self.on_event(event)
            elif previous is not None:
                previous(key, event)

        hub.watcher = watcher
        hub.watch(KEY)

    def on_event(self, event: dict[str, Any]) -> None:
        sender = event.get("from")
        if not isinstance(sender, str) or sender == self.id:
            return
        if event.get("type") == "ask":
            self._spawn(self._send({"type": "summary", "from": self.id, "summary": summary(self.services)}))
        elif event.get("type") == "summary" and isinstance(event.get("summary"), dict):
            if sender in self.seen or len(self.seen) < MAX_PEERS:
                self.seen[sender] = (time.monotonic(), event["summary"])

    async def processes(self) -> list[dict[str, Any]]:
        """This process first, then every other that answered within ``ANSWER_TTL``; asks again."""
        now = time.monotonic()
        if self.shared and now - self.last_ask >= ASK_EVERY:
            self.last_ask = now
            await self._send({"type": "ask", "from": self.id})
        for sender, (at, _) in list(self.seen.items()):
            if now - at > ANSWER_TTL:
                del self.seen[sender]
        rows = [{"id": self.id, "self": True, **summary(self.services)}]
        rows += [{"id": sender, "self": False, **line} for sender, (_, line) in sorted(self.seen.items())]
        return rows

    async def _send(self, event: dict[str, Any]) -> None:
        try:
            await self.services.broker.publish(
                env.key_channel(KEY), env.encode(event, env.new_event_id(), control=KIND)
            )
        except BrokerUnavailable:
            pass  # the table then shows only who answered before; the broker chart says why

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def install(services: Services) -> None:
    """Watch the console's topic (after ``Typing`` took the hub's watcher slot); shared brokers only."""
    peers = Peers(services)
    if peers.shared:
        peers.install()
    _installed[services.hub] = peers


def peers_of(services: Services) -> Peers:
    found = _installed.get(services.hub)
    if found is None:  # the console turned on without install (a test's app): this process alone
        found = _installed[services.hub] = Peers(services)
        found.shared = False
    return found
