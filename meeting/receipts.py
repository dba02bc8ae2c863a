"""Live read receipts: `message.receipt` frames to a sender's devices, coalesced.

When recipients mark messages read, the MessageService tells `on_receipts` who read
which message and the counts its transaction committed. A notice read by 1,000
people within a minute must not send 1,000 frames to its sender, so reads are
collected for `push.receipt_window` seconds from the first one, then each message
read meanwhile gets one frame: the readers of that window and its read_count
as committed at the moment the frame is sent (read again, one query for all; the
count is monotonic, so a later frame never shows fewer). A frame names at most
`push.receipt_readers_max` readers, the latest (a notice read by 1,000 people in
one window would otherwise be a 70 KB frame): `read_count` is the truth, and
GET /messages/{id}/receipts lists everyone.

At most `push.receipt_pending_max` messages wait for their frames, a hard bound:
reaching it ends the window at once, and while a flush is still under way (its
counts query is slow) a read that finds the next window full waits, in its own
request and after its commit, until that flush is done and the next one has taken
the window. So a burst of reads of many messages costs memory in proportion to
that limit (and to the readers kept per message), not to the burst, and the
frames of one message still go out in order. Each instance coalesces
the reads it served, so with N instances a sender gets at most N frames per
message per window.

The frames are live only (seq 0 on the broker: they follow nothing and are not
replayed by `since`); a device that was away asks GET /messages/{id}/receipts or
the sent box, which read the same counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from . import frames

log = logging.getLogger(__name__)

Counts = Callable[[list[int]], Awaitable[dict[int, int]]]  # message ids -> committed read_count
Publish = Callable[[Iterable[tuple[int, int, str]], float], Awaitable[None]]  # (user, seq, frame) items


@dataclass
class _Pending:
    sender_id: int
    recipient_count: int
    read_count: int
    readers: deque[dict[str, Any]]  # the latest readers_max


class ReceiptCoalescer:
    def __init__(self, window: float, counts: Counts, publish: Publish, pending_max: int = 10_000,
                 reachable: Callable[[int], bool] = lambda sender_id: True, readers_max: int = 100):
        self._window = window
        self._counts = counts
        self._publish = publish
        self._pending_max = pending_max
        self._readers_max = readers_max
        self._reachable = reachable
        self._pending: dict[int, _Pending] = {}
        self._flushing: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # set: flush without waiting for the rest of the window
        self._taken: asyncio.Future[None] | None = None  # only while a read waits for the window to be taken
        self._closing = False
        self.frames = 0

    @property
    def waiting(self) -> bool:
        """A read waits for room in the window (see `_room`)."""
        return self._taken is not None and not self._taken.done()

    async def _room(self) -> None:
        """Until the window has room or no flush runs that would take it (see the module doc)."""
        while len(self._pending) >= self._pending_max and self._flushing is not None and not self._flushing.done():
            self._wake.set()
            if self._taken is None:
                self._taken = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._taken)  # shared: one waiter cancelled must not wake the others

    def _window_taken(self) -> None:
        taken, self._taken = self._taken, None
        if taken is not None and not taken.done():
            taken.set_result(None)

    async def on_receipts(self, reader_id: int, read_at: dt.datetime, counted: list[dict[str, Any]]) -> None:
        """The MessageService's listener: after the commit that marked these read."""
        if counted:
            await self._room()
        for row in counted:
            pending = self._pending.get(row["id"])
            if pending is None:
                pending = self._pending[row["id"]] = _Pending(row["sender_id"], row["recipient_count"], row["read_count"],
                                                             deque(maxlen=self._readers_max))
            pending.read_count = max(pending.read_count, row["read_count"])
            pending.readers.append({"user_id": reader_id, "read_at": read_at})
        if not self._pending:
            return
        if self._window <= 0:
            await self.flush(refresh=False)  # no window: the counts just committed are the latest we know
            return
        if len(self._pending) >= self._pending_max:
            self.flush_soon()
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush_later(), name="receipts-flush")

    def flush_soon(self) -> None:
        """End the current window now (it is full)."""
        self._wake.set()

    async def _flush_later(self) -> None:
        """Window after window while reads keep coming: a read that arrives while a flush
        awaits its counts lands in the next `_pending`, and on_receipts schedules nothing
        then (this task is still running), so this loop must take it."""
        try:
            while self._pending:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._window)
                if not self._closing:
                    self._wake.clear()  # before the flush: a window filled during it ends at once
                try:
                    await self.flush()
                except Exception:
                    log.exception("publishing read receipts failed")
        finally:
            self._window_taken()  # nobody takes the window any more: a waiting read adds to it

    async def flush(self, refresh: bool = True) -> None:
        """Send a frame for every message read since the last flush whose sender may have a
        device online (no counts re-read, no frame built for the others: see
        PushHub.may_reach). A device of that sender connecting during the refresh misses
        the frame: it reads the counts from the sent box or receipts, as any device that
        connects does, and they include these reads (committed before this flush)."""
        pending, self._pending = self._pending, {}
        self._window_taken()
        pending = {message_id: p for message_id, p in pending.items() if self._reachable(p.sender_id)}
        if not pending:
            return
        if refresh:
            try:
                for message_id, count in (await self._counts(list(pending))).items():
                    pending[message_id].read_count = max(pending[message_id].read_count, count)
            except Exception as exc:  # the counts of the reads' own transactions are still true, if older
                log.warning("read receipts: re-reading the counts failed (%s); sending those of the reads", type(exc).__name__)
        items = [(p.sender_id, 0, frames.encode("message.receipt", {
            "message_id": message_id, "read_count": p.read_count, "recipient_count": p.recipient_count, "readers": list(p.readers),
        })) for message_id, p in sorted(pending.items())]
        self.frames += len(items)
        await self._publish(items, time.time())

    async def close(self) -> None:
        """Shutdown: what waits for its window is sent now, not lost."""
        self._closing = True
        self._wake.set()
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self.flush()
