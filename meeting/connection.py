"""A server-side WebSocket with its own bounded outbound queue and writer task.

Pushing never awaits the network: `push()` writes the frame at once when that
cannot block (nothing queued before it, no compression, the transport not
paused: meeting.direct_write), else enqueues it for a writer task per socket,
so a slow or stuck client delays nobody else. A client that falls
`queue_limit` frames behind is closed with 1013 and catches up from the
database when it reconnects. Only the handler's task reads the socket; the
writer only writes.

Most sockets are idle most of the time, and one process holds ten thousand of
them: the queue is a plain deque and the writer task exists only while there
is something to send (started by `push`, gone once the deque is empty), which
saves about 4 KB per idle connection over an asyncio.Queue and a parked task.
In fan-out, where a socket gets one frame at a time, there is no task at all.

Whoever has a lot to send (a replay of history, a catch-up, a backlog) does not
push it all at once: it pushes a page, then awaits `room()`, which returns once
the writer has brought the queue down to `low_water` (a quarter of the limit).
So a slow device is fed at its own pace without being closed, and the memory a
socket holds depends on the queue limit, not on how much history it is owed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Callable

from aiohttp import web

from . import frames
from .deadlines import Deadline, Deadlines
from .direct_write import write_now

if TYPE_CHECKING:
    from .metrics import PushStats

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_TOO_MANY_CONNECTIONS = 4029
CLOSE_TIMEOUT = 5.0


async def accept(ws: web.WebSocketResponse, request: web.Request) -> None:
    """Upgrade, then drop what only the handshake needed and every socket would otherwise
    hold for its whole life (tracemalloc, docs/performance.md):
    - the 101's headers, written once and never read again (with the security headers of
      meeting.frontend, about 1 KB);
    - aiohttp's HTTP parser (about 1.9 KB: its buffers and its lists of the upgrade
      request's headers). Once the WebSocket reader has taken over the connection aiohttp
      never feeds it again, and it copes with it being None, which is what it sets it to
      itself when the connection is lost (`RequestHandler.connection_lost`). A private
      attribute: tests/test_ws.py checks it is still there and still dropped."""
    await ws.prepare(request)
    ws.headers.clear()
    protocol = request.protocol
    # Only once aiohttp itself took the connection as upgraded: an upgrade request with a body
    # it is still waiting for is answered 101 all the same, and then aiohttp's flow control
    # (pause_reading) still needs the parser.
    if (getattr(protocol, "_upgraded", False) and getattr(protocol, "_payload_parser", None) is not None
            and getattr(protocol, "_parser", None) is not None):
        protocol._parser = None  # the WebSocket reader is in place: the HTTP parser is done


def frame_bytes(frame: str) -> int:
    """Its size in UTF-8; str.isascii is O(1) in CPython, so ASCII frames cost no encoding."""
    return len(frame) if frame.isascii() else len(frame.encode())


class Connection:
    # Slots, not a __dict__, and the deque only while frames wait: per idle connection
    # that is a few hundred bytes each, times ten thousand connections.
    __slots__ = ("ws", "user_id", "session_id", "id", "stats", "_queue", "_queue_limit", "_on_dead", "_closing", "_sending",
                 "_stopped", "_writer", "high_water", "low_water", "_room", "_bytes", "_queue_bytes", "_deadline",
                 "_expires_at")

    def __init__(self, ws: web.WebSocketResponse, user_id: int, queue_limit: int,
                 on_dead: Callable[["Connection"], None] | None = None, stats: "PushStats | None" = None,
                 queue_bytes: int = 1 << 20):
        self.ws = ws
        self.user_id = user_id
        self.session_id: int | None = None  # the login its token belongs to: a logout closes it
        self.id = uuid.uuid4().hex[:16]
        self.stats = stats
        self._queue: deque[tuple[str, float | None, int]] | None = None  # (frame, commit wall time or None, bytes)
        self._queue_limit = queue_limit
        self._queue_bytes = queue_bytes
        self._bytes = 0  # UTF-8 bytes of the frames queued
        self._deadline: Deadline | None = None  # token expiry: the notice, then the close (see expire_at)
        self._expires_at: dt.datetime | None = None  # until the notice went out
        self._on_dead = on_dead
        self._closing: asyncio.Task[None] | None = None
        self._sending = False
        self._stopped = False
        self._writer: asyncio.Task[None] | None = None  # only while there is something to send
        self.high_water = 0
        self.low_water = queue_limit // 4
        self._room: asyncio.Future[None] | None = None  # only while someone awaits room()

    @property
    def closed(self) -> bool:
        return self._closing is not None or self.ws.closed

    @property
    def queued(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    @property
    def ended(self) -> bool:
        """Closing, or its handler is done with it: nothing more is worth sending."""
        return self._stopped or self.closed

    @property
    def waiting_for_room(self) -> bool:
        """Someone (a replay, a catch-up, a backlog) waits for the queue to drain."""
        return self._room is not None and not self._room.done()

    def fits(self, frame: str) -> bool:
        """Whether a bulk sender (replay, catch-up, backlog) may queue `frame` now, leaving a
        quarter of the queue (frames and bytes) for live frames (or into an empty queue,
        whatever its size); else it awaits `room(frame)` first."""
        if not self._queue:
            return True
        return (len(self._queue) < self._queue_limit - self._queue_limit // 4
                and self._bytes + frame_bytes(frame) <= self._queue_bytes - self._queue_bytes // 4)

    @property
    def _has_room(self) -> bool:
        return self.queued <= self.low_water and self._bytes <= self._queue_bytes // 4

    async def room(self, frame: str | None = None) -> bool:
        """Wait until at most `low_water` frames (and a quarter of the byte limit) are
        queued, and `frame` fits (see `fits`: a frame near the byte limit waits for an empty
        queue); False once the connection is closing (then there is nobody to send more to).
        The writer wakes waiters after every frame it sends while there is room."""
        while not self.ended and not (self._has_room and (frame is None or self.fits(frame))):
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)  # shared by every waiter: one cancelled must not wake the others
        return not self.ended

    def _wake(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    def push(self, frame: str, committed_at: float | None = None, droppable: bool = False) -> bool:
        """Send or queue an encoded frame; False if the connection is (now) closing, or if the
        frame was `droppable` (live only: message.sent, message.receipt) and did not fit. Such
        a frame may fill the queue only as far as a bulk sender may (see `fits`): a burst of
        them (a receipt flush of thousands of messages) is dropped, never a reason to close,
        and leaves a quarter of the queue to the frames that must not be lost.

        With nothing queued and no writer running the frame is written at once if that cannot
        block (see meeting.direct_write), which saves a task per frame in fan-out; it never
        overtakes queued frames, since it is only tried when there are none."""
        if self.closed:
            return False
        if droppable and not self.fits(frame):
            if self.stats is not None:
                self.stats.live_frames_dropped += 1
            return False
        if not self._queue and self._writer is None and not self._stopped:
            try:
                written = write_now(self.ws, frame)
            except Exception as exc:  # as in _write_loop: the peer is gone
                self._send_failed(exc)
                return False
            if written:
                self._sent(frame, committed_at)
                self._reached(1)  # it was queued for as long as the write took
                return True
        size = frame_bytes(frame)
        if self._queue is None:
            self._queue = deque()
        elif len(self._queue) >= self._queue_limit or (self._queue and self._bytes + size > self._queue_bytes):
            log.info("closing connection %s of user %s: %d frames (%d bytes) behind", self.id, self.user_id,
                     len(self._queue), self._bytes)
            if self.stats is not None:
                self.stats.slow_consumer_closes += 1
            self.close_soon(CLOSE_TRY_AGAIN_LATER, "too slow: reconnect and resync")
            return False
        self._queue.append((frame, committed_at, size))
        self._bytes += size
        self._reached(len(self._queue))
        if self._writer is None and not self._stopped:
            self._writer = asyncio.create_task(self._write_loop())
        return True

    async def _write_loop(self) -> None:
        """Send until the queue is empty, then end (the next push writes at once or starts a
        new writer).
        No await between the last empty check and `finally`, so no push is missed."""
        try:
            while (queue := self._queue) and self._closing is None and not self._stopped:
                frame, committed_at, size = queue.popleft()
                self._bytes -= size
                if self._room is not None and self._has_room:
                    self._wake()
                self._sending = True
                await self.ws.send_str(frame)
                self._sending = False
                self._sent(frame, committed_at)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reset, closing transport: the peer is gone
            self._send_failed(exc)
        finally:
            self._sending = False
            self._writer = None
            if not self._queue:
                self._queue = None
                self._bytes = 0
            self._wake()  # empty, or failed and closing: a waiter either has room or learns it is closed

    def _reached(self, depth: int) -> None:
        """The outbound queue was `depth` frames deep: this socket's high water, and the process's."""
        if depth > self.high_water:
            self.high_water = depth
            if self.stats is not None and depth > self.stats.queue_high_water:
                self.stats.queue_high_water = depth

    def _sent(self, frame: str, committed_at: float | None) -> None:
        if self.stats is not None:
            self.stats.sent(frame)
            if committed_at is not None:
                self.stats.push_latency.observe(time.time() - committed_at)

    def _send_failed(self, exc: Exception) -> None:
        log.debug("send to %s failed: %s", self.id, type(exc).__name__)
        self._mark_dead()
        self.close_soon(CLOSE_GOING_AWAY, "send failed")

    def _mark_dead(self) -> None:
        if self._on_dead is not None:
            on_dead, self._on_dead = self._on_dead, None
            on_dead(self)

    def close_soon(self, code: int, reason: str) -> None:
        """Close from any task without waiting; idempotent."""
        if self._closing is None:
            self._mark_dead()
            self._closing = asyncio.create_task(self._close(code, reason), name=f"ws-close-{self.id}")
            self._wake()

    async def _close(self, code: int, reason: str) -> None:
        # Never cancel a writer blocked on drain: aiohttp shares one drain waiter per
        # socket, and cancelling it would abort this close frame too (1006, not `code`).
        # Drop what is queued (the client resyncs from the database) and let the writer
        # exit after the frame it is sending.
        self._queue = None
        self._bytes = 0
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode(), drain=False), CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass

    async def close(self, code: int, reason: str) -> None:
        self.close_soon(code, reason)
        assert self._closing is not None
        await asyncio.shield(self._closing)

    def expire_at(self, deadlines: Deadlines, expires_at: dt.datetime, notice: float, keep: bool = False) -> None:
        """One deadline at a time per connection, in the app's shared `deadlines` (one
        timer for ten thousand sockets, see meeting.deadlines): the notice, which then sets
        the close. `keep`: leave a deadline a refresh already set. Nothing for a connection
        that ended (a sync finishing after its socket closed): the heap would keep it alive."""
        if self.ended or (keep and self._deadline is not None):
            return
        self.cancel_timers()
        remaining = (expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
        self._expires_at = expires_at
        self._deadline = deadlines.add(max(0.0, remaining - notice), self)

    def on_deadline(self, deadlines: Deadlines) -> None:
        """The notice (`token.expiring`), and a deadline for the close; or the close itself."""
        expires_at, self._expires_at, self._deadline = self._expires_at, None, None
        if expires_at is None:
            self.close_soon(CLOSE_TOKEN_EXPIRED, "token expired")
            return
        self.push(frames.encode("token.expiring", {"expires_at": expires_at}))
        remaining = (expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
        self._deadline = deadlines.add(max(0.0, remaining), self)

    def cancel_timers(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._expires_at = None

    def end_session(self, revoked: set[int]) -> None:
        """Its login was revoked (logout, logout-all, a reused refresh token): 4001, as for an
        expired token, since the client's remedy is the same: log in again."""
        if self.session_id in revoked:
            self.close_soon(CLOSE_TOKEN_EXPIRED, "logged out")

    async def flush_and_close(self, code: int, reason: str, timeout: float) -> None:
        """Close after what is queued was written (shutdown: the device keeps every frame
        it was promised), or after `timeout` for a client that does not read."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (writer := self._writer) is not None and not self.closed:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await asyncio.wait({writer}, timeout=remaining)
        await self.close(code, reason)

    async def stop(self) -> None:
        """Called by the handler when its read loop ended: release the writer.

        A writer blocked mid-send is not cancelled (see `_close`): it is woken to
        exit, and cancelled only if the transport still has not moved after the
        close timeout.
        """
        self._mark_dead()
        self._stopped = True
        self._queue = None
        self._wake()
        writer = self._writer
        if writer is not None:
            if not self._sending:
                writer.cancel()
            done, _ = await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT)
            if not done:
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)
