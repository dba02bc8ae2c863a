"""Per-connection ordering: each seq emitted once, in order, whatever the broker did.

Pure logic (no I/O) so that it can be tested exhaustively: the connection feeds
it frames from the broker and rows from the database, and sends what it emits.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class SeqGate(Generic[T]):
    __slots__ = ("last", "_held")

    def __init__(self, last: int = 0):
        self.last = last           # the highest seq emitted: everything up to it was sent
        self._held: dict[int, T] = {}

    def offer(self, seq: int, item: T) -> list[T]:
        """Take one item; return what can now be emitted, in order.
        Duplicates (seq <= last, or already held) are dropped."""
        if seq > self.last and seq not in self._held:
            self._held[seq] = item
        released = []
        while self.last + 1 in self._held:
            self.last += 1
            released.append(self._held.pop(self.last))
        return released

    @property
    def waiting(self) -> bool:
        """True when something is held behind a missing seq: fill the gap from the database."""
        return bool(self._held)
