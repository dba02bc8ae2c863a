"""Who received each message: remembered in-process, since it never changes.

Only the sender's view shows a message's `recipient_ids` (the sent box, GET
/messages/{id} by its sender; recipients see `recipient_count`, a column). Read
from the database, a list is one row per recipient per message. The list of a
message is fixed when it is stored, so it can be kept without invalidation: the
writer puts it here at commit, readers take it from here, and only what was
evicted (or stored by another instance) is read from the database.

Bounded by the total number of ids kept, least recently used out first.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Sequence

from .lru import SizedLRU

Fetch = Callable[[list[int]], Awaitable[dict[int, list[int]]]]
Ids = tuple[int, ...]


class RecipientLists:
    def __init__(self, max_ids: int = 500_000):
        self._lists: SizedLRU[int, Ids] = SizedLRU(max_ids)  # tuples: shared by every row, never mutated
        self.hits = self.misses = 0

    def remember(self, message_id: int, recipient_ids: Sequence[int]) -> None:
        self._lists.put(message_id, tuple(recipient_ids))

    async def attach(self, rows: list[dict[str, Any]], fetch: Fetch) -> list[dict[str, Any]]:
        """Give each row (by its "id") its sorted `recipient_ids`; one fetch for all the misses."""
        missing = [row["id"] for row in rows if row["id"] not in self._lists]
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        if missing:
            for message_id, ids in (await fetch(missing)).items():
                self.remember(message_id, ids)
        for row in rows:
            ids = self._lists.get(row["id"])
            if ids is None:  # evicted meanwhile (a page larger than the bound): read again
                ids = tuple((await fetch([row["id"]])).get(row["id"], []))
            row["recipient_ids"] = ids
        return rows
