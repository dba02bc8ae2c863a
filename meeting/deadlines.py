"""One timer for the token expiry of every socket, instead of one per socket.

Each socket waits hours for its token to expire (the `token.expiring` notice, then 4001).
A TimerHandle per socket for that, with the context it copies and uvloop's timer behind
it, is about 600 bytes; ten thousand idle sockets held 6 MB of them (tracemalloc,
docs/performance.md). Here a socket holds one `Deadline` (80 bytes) in a heap, and a single
TimerHandle waits for the earliest deadline of all.

A cancelled deadline (the socket closed, or its token was refreshed) stays in the heap
until it comes due, since taking it out is O(n); once cancelled ones are more than half
the heap, the heap is rebuilt without them, so a reconnect storm does not leave hours'
worth of dead entries behind.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Protocol

log = logging.getLogger(__name__)

#: Deadlines due this close to now fire together: a loop timer may wake a little early.
SLACK = 0.001
#: Below this many entries the heap is never rebuilt: it is cheap to keep as it is.
COMPACT_MIN = 64


class Target(Protocol):
    def on_deadline(self, deadlines: "Deadlines") -> None: ...


class Deadline:
    __slots__ = ("when", "target", "owner")

    def __init__(self, when: float, target: Target, owner: "Deadlines"):
        self.when = when  # loop time
        self.target: Target | None = target  # None once fired or cancelled
        self.owner = owner

    def __lt__(self, other: "Deadline") -> bool:
        return self.when < other.when

    def cancel(self) -> None:
        if self.target is not None:
            self.target = None
            self.owner._cancelled_one()


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._cancelled = 0
        self._timer: asyncio.TimerHandle | None = None
        self._firing = False

    def __len__(self) -> int:
        """Deadlines still to come (cancelled ones not counted)."""
        return len(self._heap) - self._cancelled

    def add(self, delay: float, target: Target) -> Deadline:
        """Call `target.on_deadline(self)` in `delay` seconds, unless the Deadline is cancelled."""
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop.time() + delay, target, self)
        heapq.heappush(self._heap, deadline)
        if self._heap[0] is deadline and not self._firing:
            self._arm(loop)
        return deadline

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self.close()
        if self._heap:
            self._timer = loop.call_at(self._heap[0].when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time() + SLACK
        self._firing = True
        try:  # self._heap, not a local: a target may cancel others, and that may rebuild the heap
            while self._heap and self._heap[0].when <= now:
                deadline = heapq.heappop(self._heap)
                target, deadline.target = deadline.target, None
                if target is None:
                    self._cancelled -= 1
                    continue
                try:
                    target.on_deadline(self)
                except Exception:
                    log.exception("deadline of %r failed", target)
        finally:
            self._firing = False
            self._arm(loop)

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        if self._cancelled > len(self._heap) // 2 and len(self._heap) >= COMPACT_MIN:
            self._heap = [d for d in self._heap if d.target is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0
            if not self._firing:
                self._arm(asyncio.get_running_loop())
