"""Placeholder until the shared implementation lands: memory only (one process)."""

from __future__ import annotations

from typing import Any


class MemoryUserConnections:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._users: dict[str, set[str]] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._users.clear()

    async def acquire(self, user_id: str, conn_id: str) -> bool:
        held = self._users.setdefault(user_id, set())
        if len(held) >= self.limit:
            return False
        held.add(conn_id)
        return True

    async def release(self, user_id: str, conn_id: str) -> None:
        held = self._users.get(user_id)
        if held is not None:
            held.discard(conn_id)
            if not held:
                del self._users[user_id]

    async def count(self, user_id: str) -> int:
        return len(self._users.get(user_id, ()))


def for_settings(settings: Any) -> MemoryUserConnections:
    return MemoryUserConnections(settings.max_connections_per_user)
