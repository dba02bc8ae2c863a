"""Per-connection ordering: each seq emitted once, in order, whatever the broker did.

Pure logic (no I/O) so that it can be tested exhaustively: the connection feeds
it frames from the broker and rows from the database, and sends what it emits.

Two kinds of items go through a gate:
- a message, with its seq: emitted once, when every seq before it was;
- a follower (a read-sync frame) with the seq it must come after: the highest
  seq among the messages it names. A `message.read` of a message whose
  `message.new` is still held behind a gap must not overtake it, or the device
  would show that message unread at the end. Followers keep their order among
  themselves, so the last `count` a device sees is the newest.

Memory is bounded: at most `cap` messages are held. A message beyond the cap is
dropped but its seq is remembered (`known`), so the gate keeps `waiting` and the
connection fetches it from the database, where it is stored anyway.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class SeqGate(Generic[T]):
    __slots__ = ("last", "known", "_held", "_after", "_cap")

    def __init__(self, last: int = 0, cap: int | None = None):
        self.last = last           # the highest seq emitted: everything up to it was sent
        self.known = last          # the highest seq heard of (held, dropped over the cap, or followed)
        self._held: dict[int, T] = {}
        self._after: deque[tuple[int, T]] | None = None  # followers, in arrival order; made when needed
        self._cap = cap

    def offer(self, seq: int, item: T) -> list[T]:
        """Take one message; return what can now be emitted, in order.
        Duplicates (seq <= last, or already held) are dropped."""
        if seq > self.known:
            self.known = seq
        if seq == self.last + 1:
            self.last = seq
            released = [item]
        elif seq > self.last and seq not in self._held and (self._cap is None or len(self._held) < self._cap):
            self._held[seq] = item
            return []
        else:
            return []
        return self._release(released)

    def follow(self, after: int, item: T) -> list[T]:
        """Take an item that must come after seq `after` (and after earlier followers)."""
        if after > self.known:
            self.known = after
        if self._after is None:
            self._after = deque()
        self._after.append((after, item))
        return self._release([])

    def heard(self, seq: int) -> None:
        """A message exists up to `seq` though its item was not kept: fetch it."""
        if seq > self.known:
            self.known = seq

    def _release(self, released: list[T]) -> list[T]:
        held = self._held
        while self.last + 1 in held:
            self.last += 1
            released.append(held.pop(self.last))
        after = self._after
        if after is not None:
            while after and after[0][0] <= self.last:
                released.append(after.popleft()[1])
            if not after:
                self._after = None
        return released

    @property
    def followers(self) -> int:
        return len(self._after) if self._after is not None else 0

    @property
    def waiting(self) -> bool:
        """True when a seq after `last` is known to exist: fill the gap from the database."""
        return self.known > self.last
