"""Meeting rooms: meeting id -> the connections in that room.

Kept apart from the per-user push connections on purpose: a room is a live
conversation among those present, not a delivery guarantee; nothing here is
stored or replayed.
"""

from __future__ import annotations

import asyncio
import logging

from .connection import CLOSE_GOING_AWAY, Connection

log = logging.getLogger(__name__)


class RoomManager:
    def __init__(self) -> None:
        self.rooms: dict[int, set[Connection]] = {}

    def join(self, meeting_id: int, conn: Connection) -> None:
        self.rooms.setdefault(meeting_id, set()).add(conn)

    def leave(self, meeting_id: int, conn: Connection) -> None:
        members = self.rooms.get(meeting_id)
        if members is None:
            return
        members.discard(conn)
        if not members:
            del self.rooms[meeting_id]

    def broadcast(self, meeting_id: int, frame: str, exclude: Connection | None = None) -> int:
        sent = 0
        for conn in list(self.rooms.get(meeting_id, ())):
            if conn is not exclude and conn.push(frame):
                sent += 1
        return sent

    async def close_all(self) -> None:
        conns = [conn for members in list(self.rooms.values()) for conn in list(members)]
        await asyncio.gather(*(conn.close(CLOSE_GOING_AWAY, "server shutdown") for conn in conns), return_exceptions=True)
        self.rooms.clear()
