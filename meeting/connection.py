"""A server-side WebSocket with its own bounded outbound queue and writer task.

Pushing never awaits the network: `push()` only enqueues, and one writer task
per socket does the sending, so a slow or stuck client delays nobody else. A
client that falls `queue_limit` frames behind is closed with 1013 and catches
up from the database when it reconnects. Only the handler's task reads the
socket; the writer only writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Callable

from aiohttp import web

if TYPE_CHECKING:
    from .metrics import PushStats

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_TOO_MANY_CONNECTIONS = 4029
CLOSE_TIMEOUT = 5.0


class Connection:
    def __init__(self, ws: web.WebSocketResponse, user_id: int, queue_limit: int,
                 on_dead: Callable[["Connection"], None] | None = None, stats: "PushStats | None" = None):
        self.ws = ws
        self.user_id = user_id
        self.id = uuid.uuid4().hex[:16]
        self.stats = stats
        # (frame, commit wall time or None); None wakes the writer to exit
        self._queue: asyncio.Queue[tuple[str, float | None] | None] = asyncio.Queue()
        self._queue_limit = queue_limit
        self._on_dead = on_dead
        self._closing: asyncio.Task[None] | None = None
        self._sending = False
        self._stopped = False
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.id}")
        self.high_water = 0

    @property
    def closed(self) -> bool:
        return self._closing is not None or self.ws.closed

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def push(self, frame: str, committed_at: float | None = None) -> bool:
        """Queue an encoded frame; False if the connection is (now) closing."""
        if self.closed:
            return False
        if self._queue.qsize() >= self._queue_limit:
            log.info("closing connection %s of user %s: %d frames behind", self.id, self.user_id, self._queue.qsize())
            if self.stats is not None:
                self.stats.slow_consumer_closes += 1
            self.close_soon(CLOSE_TRY_AGAIN_LATER, "too slow: reconnect and resync")
            return False
        self._queue.put_nowait((frame, committed_at))
        depth = self._queue.qsize()
        if depth > self.high_water:
            self.high_water = depth
            if self.stats is not None and depth > self.stats.queue_high_water:
                self.stats.queue_high_water = depth
        return True

    async def _write_loop(self) -> None:
        try:
            while (item := await self._queue.get()) is not None and self._closing is None and not self._stopped:
                frame, committed_at = item
                self._sending = True
                await self.ws.send_str(frame)
                self._sending = False
                if self.stats is not None:
                    self.stats.sent(frame)
                    if committed_at is not None:
                        self.stats.push_latency.observe(time.time() - committed_at)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reset, closing transport: the peer is gone
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

    async def _close(self, code: int, reason: str) -> None:
        # Never cancel a writer blocked on drain: aiohttp shares one drain waiter per
        # socket, and cancelling it would abort this close frame too (1006, not `code`).
        # Drop what is queued (the client resyncs from the database) and let the writer
        # exit after the frame it is sending.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode(), drain=False), CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass

    async def close(self, code: int, reason: str) -> None:
        self.close_soon(code, reason)
        assert self._closing is not None
        await asyncio.shield(self._closing)

    async def stop(self) -> None:
        """Called by the handler when its read loop ended: release the writer.

        A writer blocked mid-send is not cancelled (see `_close`): it is woken to
        exit, and cancelled only if the transport still has not moved after the
        close timeout.
        """
        self._mark_dead()
        self._stopped = True
        self._queue.put_nowait(None)
        if not self._sending:
            self._writer.cancel()
        done, _ = await asyncio.wait({self._writer}, timeout=CLOSE_TIMEOUT)
        if not done:
            self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)
