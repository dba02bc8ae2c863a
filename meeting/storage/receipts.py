"""Queries for the sender's view of a message: its read counter and its receipts.

`messages.read_count` is a counter (migration 0005): `count_reads` bumps it in the
transaction that marked the recipient rows read, so the sent box and receipts
never count message_recipients rows.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import message_recipients as mr
from ..db import messages as m
from .messages import _IDS, SENT_COLUMNS, _dicts
from .messages import _LOCK_CHUNK as _CHUNK  # ids per statement, for the same reason (MariaDB's IN lists)


_BUMP_READS = m.update().where(m.c.id.in_(_IDS)).values(read_count=m.c.read_count + 1)
_READ_COUNTS = sa.select(m.c.id, m.c.read_count).where(m.c.id.in_(_IDS))
_RECEIPTS = sa.select(m.c.id, m.c.sender_id, m.c.read_count, m.c.recipient_count).where(m.c.id.in_(_IDS))


async def count_reads(conn: AsyncConnection, message_ids: list[int]) -> list[dict[str, Any]]:
    """Count one more reader of each of these messages (those `mark_read` changed, in the
    same transaction); each one's sender and counts after it, for the sender's receipts.
    Ascending id order in chunks, so concurrent readers lock the rows in one order."""
    ids = sorted(message_ids)
    counted: list[dict[str, Any]] = []
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        await conn.execute(_BUMP_READS, {"ids": chunk})
        counted.extend(_dicts(await conn.execute(_RECEIPTS, {"ids": chunk})))
    return counted


async def sent_one(conn: AsyncConnection, user_id: int, message_id: int) -> dict[str, Any] | None:
    """The message if `user_id` sent it, with its counts."""
    row = (await conn.execute(sa.select(*SENT_COLUMNS).where(m.c.id == message_id, m.c.sender_id == user_id))).first()
    return None if row is None else row._asdict()


async def receipts(conn: AsyncConnection, message_id: int, after: int | None, limit: int, unread: bool) -> list[dict[str, Any]]:
    """Recipients of a message in user id order, after `after`, with when they read it:
    a range scan of the primary key (message_id, recipient_id)."""
    where = [mr.c.message_id == message_id, mr.c.recipient_id > (after or 0)]
    if unread:
        where.append(mr.c.read_at.is_(None))
    query = sa.select(mr.c.recipient_id.label("user_id"), mr.c.read_at).where(*where).order_by(mr.c.recipient_id).limit(limit)
    return _dicts(await conn.execute(query))


async def read_counts(conn: AsyncConnection, message_ids: list[int]) -> dict[int, int]:
    """Each message's committed read_count now; in chunks, like count_reads (up to
    push.receipt_pending_max ids at a time)."""
    ids = sorted(message_ids)
    counts: dict[int, int] = {}
    for start in range(0, len(ids), _CHUNK):
        rows = await conn.execute(_READ_COUNTS, {"ids": ids[start:start + _CHUNK]})
        counts.update((row.id, row.read_count) for row in rows)
    return counts
