"""Reads: marking messages read, and the sender's view of who read them.

The MessageService delegates here (it stays the one place messages are written
and read); kept apart because marking a message read now also counts its
reader for the sender (messages.read_count, migration 0005) and tells the
sender's devices, which is a concern of its own. Listeners run only after the
commit, like the service's.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .cache import MessageCache
from .db import CommitFailed, snapshot_readers, transaction
from .errors import NotFound, Unavailable
from .recipients import RecipientLists
from .storage import messages as store
from .storage import receipts as receipt_store

log = logging.getLogger(__name__)

Message = dict[str, Any]
ReadListener = Callable[[int, list[int], int, int], Awaitable[None]]  # user, ids, unread count, highest seq read
#: reader, when they read, and per message read: {id, sender_id, read_count, recipient_count} as of that commit
ReceiptListener = Callable[[int, dt.datetime, list[Message]], Awaitable[None]]
Notify = Callable[..., Awaitable[None]]
T = TypeVar("T")


@dataclass(frozen=True)
class _Read:
    """What one transaction marked read: the ids, when, the reader's highest seq among
    them, and each message's counts after it (for its sender's receipts)."""
    changed: list[int]
    at: dt.datetime
    upto_seq: int
    counted: list[Message]


async def _mark(conn: AsyncConnection, user_id: int, ids: list[int] | None) -> _Read:
    """Mark read and count the readers in one transaction: read_count is never off by one."""
    changed, at, upto_seq = await store.mark_read(conn, user_id, ids)
    counted = await receipt_store.count_reads(conn, changed) if changed else []
    return _Read(changed, at, upto_seq, counted)


def page(rows: list[Message], limit: int) -> dict[str, Any]:
    """`limit` rows of `limit + 1` fetched, and the cursor of the next page (None on the last)."""
    page = rows[:limit]
    return {"messages": page, "next_before": page[-1]["id"] if len(rows) > limit else None}


class Reads:
    def __init__(self, engine: AsyncEngine, reads: AsyncEngine, cache: MessageCache, attempts: int,
                 recipients: RecipientLists, on_read: list[ReadListener], on_receipts: list[ReceiptListener],
                 notify: Notify, unread_count: Callable[[int], Awaitable[int]]):
        self._engine = engine
        self._reads = reads
        self._snapshots = snapshot_readers(engine)
        self._cache = cache
        self._attempts = attempts
        self.recipients = recipients  # the service's, shared (MessageService.recipients)
        self._on_read = on_read
        self._on_receipts = on_receipts
        self._notify = notify
        self._unread_count = unread_count

    async def sent(self, user_id: int, limit: int, before: int | None = None) -> dict[str, Any]:
        """The sender's view, newest first, with read counts. Not cached: read_count changes
        with every recipient's read, and a cache entry per sender invalidated by each of
        them would cost more than the one indexed range scan it saves."""
        async with self._reads.connect() as conn:
            return page(await self.attach(conn, await store.sent(conn, user_id, limit + 1, before)), limit)

    async def receipts(self, user_id: int, message_id: int, limit: int = 100, after: int | None = None,
                       unread: bool = False) -> dict[str, Any]:
        """Who read a message the user sent, in user id order. Anyone but its sender gets
        the 404 of a missing message: a recipient must not learn the audience this way.
        The counts and the page are read from one snapshot, so they never contradict
        each other (a reader in the page whom read_count does not count yet)."""
        async with self._snapshots.connect() as conn:
            message = await receipt_store.sent_one(conn, user_id, message_id)
            if message is None:
                raise NotFound("No such message.")
            rows = await receipt_store.receipts(conn, message_id, after, limit + 1, unread)
        page = rows[:limit]
        return {"message_id": message_id, "recipient_count": message["recipient_count"], "read_count": message["read_count"],
                "recipients": page, "next_after": page[-1]["user_id"] if len(rows) > limit else None}

    async def read_counts(self, message_ids: list[int]) -> dict[int, int]:
        async with self._reads.connect() as conn:
            return await receipt_store.read_counts(conn, message_ids)

    async def attach(self, conn: AsyncConnection, rows: list[Message]) -> list[Message]:
        """The sender's view only: a recipient is never shown the other recipients."""
        return await self.recipients.attach(rows, lambda ids: store.recipient_lists(conn, ids))

    async def mark_one(self, user_id: int, message_id: int) -> dict[str, Any]:
        """Idempotent: a second call keeps the first read_at."""
        async def work(conn: AsyncConnection) -> tuple[dt.datetime, _Read | None]:
            is_recipient, read_at = await store.read_at(conn, user_id, message_id)
            if not is_recipient:
                raise NotFound("No such message.")
            if read_at is not None:
                return read_at, None
            read = await _mark(conn, user_id, [message_id])
            if not read.changed:  # another mark won the row lock meanwhile: answer its read_at
                _, read_at = await store.read_at(conn, user_id, message_id)
                return read_at, None
            return read.at, read

        read_at, read = await self._transaction(user_id, work)
        if read is not None and read.changed:
            await self._after_read(user_id, read)
        return {"id": message_id, "read_at": read_at}

    async def mark(self, user_id: int, ids: list[int] | None, *, strict: bool = False) -> dict[str, Any]:
        """Mark `ids` (or, for None, everything) read. Ids the user did not receive
        are ignored, or with `strict` refused all-or-nothing (NotFound naming them)."""
        async def work(conn: AsyncConnection) -> _Read:
            if strict and ids:
                foreign = sorted(set(ids) - await store.received_among(conn, user_id, ids))
                if foreign:
                    raise NotFound("Some of these messages are not yours.", {"ids": foreign})
            return await _mark(conn, user_id, ids)

        read = await self._transaction(user_id, work)
        count = await self._after_read(user_id, read) if read.changed else await self._unread_count(user_id)
        return {"updated": len(read.changed), "count": count}

    async def _transaction(self, user_id: int, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """A mark whose COMMIT failed may or may not have been applied. Marking read is
        idempotent, so it is not settled like a send: the reader's cache is dropped (it
        may be stale either way) and the answer is a retryable 503; the retry finds the
        rows as they are. If it had been applied, its message.read and message.receipt
        frames are not sent (the retry changes nothing): other devices learn the read
        state when they reconnect, the sender from the sent box or receipts."""
        try:
            return await transaction(self._engine, work, self._attempts)
        except CommitFailed as exc:
            log.warning("a COMMIT marking messages read failed (%s); answering 503", exc)
            await self._cache.invalidate([user_id])
            raise Unavailable("The database connection was lost while committing; marking read is safe to retry.",
                              code="commit_failed") from exc

    async def _after_read(self, user_id: int, read: _Read) -> int:
        await self._cache.invalidate([user_id])
        count = await self._unread_count(user_id)
        await self._notify(self._on_read, user_id, read.changed, count, read.upto_seq)
        await self._notify(self._on_receipts, user_id, read.at, read.counted)
        return count
