"""Meeting rooms: meeting id -> the connections in that room, on every instance.

Kept apart from the per-user push connections on purpose: a room is a live
conversation among those present, not a delivery guarantee; nothing here is
stored or replayed.

One room spans every instance. Frames travel over a broker of their own
(meeting.broker, kind `room`): in process without Redis, otherwise on the
channel `<prefix>:room:<meeting id>`, to which an instance is subscribed while
it has a member of that room. A frame goes to this instance's members at once
and to the other instances through Redis; while Redis is out, only the members
on the same instance hear each other (room frames are never replayed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Coroutine

from .broker_protocol import Broker, InProcessBroker
from .connection import CLOSE_GOING_AWAY, Connection

log = logging.getLogger(__name__)


class RoomManager:
    def __init__(self) -> None:
        self.rooms: dict[int, set[Connection]] = {}
        self.per_user: dict[int, int] = {}  # room sockets of each user on this instance (the cap)
        self.broker: Broker = InProcessBroker(self.deliver_local)
        self._background: set[asyncio.Task[Any]] = set()

    def wants(self, meeting_id: int) -> bool:
        return meeting_id in self.rooms

    def join(self, meeting_id: int, conn: Connection, cap: int) -> bool:
        """Synchronous: the member is in the room (and will be taken out by `leave`) at once.
        False, and not joined, when the user already has `cap` room sockets here."""
        if self.per_user.get(conn.user_id, 0) >= cap:
            return False
        self.per_user[conn.user_id] = self.per_user.get(conn.user_id, 0) + 1
        self.rooms.setdefault(meeting_id, set()).add(conn)
        return True

    async def follow(self, meeting_id: int) -> None:
        """Return once this instance receives the room's frames from other instances."""
        await self.broker.want(meeting_id)

    def leave(self, meeting_id: int, conn: Connection) -> None:
        members = self.rooms.get(meeting_id)
        if members is None or conn not in members:
            return
        members.discard(conn)
        left = self.per_user.pop(conn.user_id) - 1
        if left:
            self.per_user[conn.user_id] = left
        if not members:
            del self.rooms[meeting_id]
            self._spawn(self.broker.want(meeting_id))  # re-evaluated under the broker's lock: unsubscribe

    def broadcast(self, meeting_id: int, frame: str, exclude: Connection | None = None) -> int:
        """To every member on every instance (but `exclude`); returns how many local members got it."""
        sent = 0
        for conn in list(self.rooms.get(meeting_id, ())):
            if conn is not exclude and conn.push(frame):
                sent += 1
        self.broker.post([(meeting_id, 0, frame)], time.time(), local=False)
        return sent

    def deliver_local(self, meeting_id: int, seq: int, frame: str, committed_at: float) -> None:
        """A frame from another instance."""
        for conn in list(self.rooms.get(meeting_id, ())):
            conn.push(frame)

    def sessions_revoked(self, pairs: list[tuple[int, int]]) -> None:
        revoked = {session_id for session_id, _ in pairs}
        for conn in [conn for members in list(self.rooms.values()) for conn in list(members)]:
            conn.end_session(revoked)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close_all(self) -> None:
        conns = [conn for members in list(self.rooms.values()) for conn in list(members)]
        await asyncio.gather(*(conn.close(CLOSE_GOING_AWAY, "server shutdown") for conn in conns), return_exceptions=True)
        self.rooms.clear()

    async def drain_background(self) -> None:
        await asyncio.gather(*list(self._background), return_exceptions=True)
